"""Soak: `strop train` killed with SIGKILL at random moments, half of them while a checkpoint is being
written, 8 times in the suite (each kill is a fresh process start, ~8 s here; STROP_SOAK_KILLS=20 or
more for a longer soak, as before a release); each restart resumes from the newest complete checkpoint, and the finished
run's per-step losses and weights equal a run never interrupted. For SFT and for DPO."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import strop
from conftest import ALPACA_ROWS, tiny_config, write_jsonl
from strop.core.metrics import read_metrics
from strop.training.checkpoint import list_checkpoints
from test_preference import pairs
from test_signals import weights

KILLS = int(os.environ.get("STROP_SOAK_KILLS", "8"))
STEPS = 100


def _config(task: str, model: Path, tmp_path: Path) -> dict:
    rows = ALPACA_ROWS if task == "sft" else pairs(24)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = tiny_config(model, data, tmp_path / "runs", task=task)
    cfg["data"]["template"] = "chatml"
    cfg["model"]["device"] = "cpu"
    cfg["train"] = {
        "batch_size": 2,
        "grad_accum": 2,
        "max_steps": STEPS,
        "eval_every": 20,
        "save_every": 1,
        "log_every": 1,
        "threads": 1,
        "seed": 0,
    }
    if task == "sft":
        cfg["method"]["lora"]["dropout"] = 0.1
    return cfg


def _latest_step(run: Path) -> int:
    ckpts = list_checkpoints(run)
    return int(ckpts[-1].name.split("-")[1]) if ckpts else -1


def _partial(run: Path) -> bool:
    root = run / "checkpoints"
    return root.is_dir() and any(".tmp-" in p.name for p in root.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_sigkill_at_random_moments_loses_nothing(task, tiny_llama, tmp_path):
    cfg = _config(task, tiny_llama, tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**cfg, "name": "killed"}))
    run = tmp_path / "runs" / "killed"
    argv = [sys.executable, "-m", "strop", "-q", "train", str(config), "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rng = random.Random(0)
    kills, mid_checkpoint, resumed_from = 0, 0, []
    while kills < KILLS:
        before = _latest_step(run)
        resumed_from.append(before)
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        deadline = time.time() + 120
        while _latest_step(run) <= before:  # progress since the last kill
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no progress in 120 s"
            time.sleep(0.005)
        if kills % 2:  # mid-checkpoint: wait for the next checkpoint's temporary folder
            while not _partial(run) and proc.poll() is None and time.time() < deadline:
                time.sleep(0.0005)
        else:
            time.sleep(rng.uniform(0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
        kills += 1
        mid_checkpoint += _partial(run)
    final = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert final.returncode == 0, final.stderr

    strop.train({**cfg, "name": "whole"}, show_progress=False)
    whole = tmp_path / "runs" / "whole"
    got, want = read_metrics(run), read_metrics(whole)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
    wa, wb = weights(run), weights(whole)
    assert wa.keys() == wb.keys()
    assert all((wa[k] - wb[k]).abs().max() < 1e-6 for k in wa)
    assert kills >= KILLS and mid_checkpoint >= 1, (kills, mid_checkpoint)
    assert len(set(resumed_from)) == len(resumed_from)  # every restart began further on
    print(f"{task}: {kills} kills, {mid_checkpoint} mid-checkpoint, resumed from steps {resumed_from}")

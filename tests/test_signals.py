"""SIGTERM and SIGINT stop a run at a safe point: the unfinished step is abandoned, a checkpoint is
written, the message says how to continue, and the resumed run equals one never interrupted. A second
signal quits at once without harming the last complete checkpoint. Signals are real: the process sends
them to itself at a chosen moment (deterministic), or the test sends them to a `strop train` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import strop
from conftest import ALPACA_ROWS, assert_user_error, run_cli, tiny_config, write_jsonl
from strop.core.errors import Interrupted
from strop.core.metrics import read_metrics
from strop.training import loop
from strop.training.checkpoint import list_checkpoints
from test_classify import labelled_rows
from test_preference import pairs
from test_rl import rl_config


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r and "val_loss" not in r]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    model = run_dir / "model"
    files = sorted(model.glob("*.safetensors"))
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def assert_same_run(a: Path, b: Path) -> None:
    assert losses(a) == pytest.approx(losses(b), abs=1e-6)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() < 1e-6, k


def signal_at_micro_batch(monkeypatch, m: int, signum=signal.SIGTERM, times: int = 1) -> None:
    """Send `signum` to this process while micro-batch `m` (0-based, in run order) is being built."""
    real = loop.MicroBatches.__call__

    def call(self, k):
        if k == m:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return real(self, k)

    monkeypatch.setattr(loop.MicroBatches, "__call__", call)


def sft_config(tiny_llama, tmp_path, name, **train):
    data = write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS)
    cfg = tiny_config(tiny_llama, data, tmp_path / "runs", name=name)
    cfg["method"]["lora"]["dropout"] = 0.1  # the abandoned step's random draws must be undone
    cfg["train"] = {"batch_size": 2, "grad_accum": 2, "max_steps": 6, "eval_every": 2, "seed": 0, **train}
    cfg["model"]["device"] = "cpu"
    return cfg


def test_sigterm_mid_step_writes_a_checkpoint_and_resumes_exactly(tiny_llama, tmp_path, monkeypatch):
    import strop.methods.sft as sft

    cfg = sft_config(tiny_llama, tmp_path, "cut")
    real, calls = sft.loss, []

    def loss(model, batch):  # the signal arrives during the first of step 4's two micro-batches
        calls.extend([1] if model.training else [])  # validation scores batches with the same loss
        if model.training and len(calls) == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, batch)

    with monkeypatch.context() as m:
        m.setattr(sft, "loss", loss)
        with pytest.raises(Interrupted) as e:
            strop.train(cfg, show_progress=False)
    assert e.value.signum == signal.SIGTERM
    assert len(calls) == 7  # step 4's second micro-batch never ran
    run = tmp_path / "runs" / "cut"
    assert "step 3" in e.value.message and f"strop train --resume {run}" in e.value.message
    assert [p.name for p in list_checkpoints(run)] == ["step-000002", "step-000003"]  # best (eval) + stop
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored after the run

    strop.train(cfg, show_progress=False)  # resumes from step 3
    strop.train({**cfg, "name": "whole"}, show_progress=False)
    assert_same_run(run, tmp_path / "runs" / "whole")


def test_a_second_signal_quits_at_once_and_keeps_the_last_checkpoint(tiny_llama, tmp_path, monkeypatch):
    cfg = sft_config(tiny_llama, tmp_path, "twice", save_every=1)
    with monkeypatch.context() as m:
        signal_at_micro_batch(m, 6, signal.SIGINT, times=2)  # step 4
        with pytest.raises(Interrupted) as e:
            strop.train(cfg, show_progress=False)
    run = tmp_path / "runs" / "twice"
    assert e.value.signum == signal.SIGINT and "step 3" in e.value.message
    assert list_checkpoints(run)[-1].name == "step-000003"
    strop.train(cfg, show_progress=False)
    strop.train({**cfg, "name": "whole"}, show_progress=False)
    assert_same_run(run, tmp_path / "runs" / "whole")


def test_a_signal_before_training_leaves_no_run_folder(tiny_llama, tmp_path, monkeypatch):
    from strop.recipes import sft

    cfg = sft_config(tiny_llama, tmp_path, "early")
    real = sft.build_datasets

    def build(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(sft, "build_datasets", build)
    with pytest.raises(Interrupted) as e:
        strop.train(cfg, show_progress=False, command="strop train early.yaml")
    assert "Nothing was trained yet" in e.value.message and "strop train early.yaml" in e.value.message
    assert not (tmp_path / "runs" / "early").exists()


def test_a_signal_after_the_first_save_keeps_the_folder(tiny_llama, tmp_path, monkeypatch):
    """Stopped during step 1 (the only checkpoint is the stop's own, at step 0): resumable."""
    cfg = sft_config(tiny_llama, tmp_path, "zero")
    with monkeypatch.context() as m:
        signal_at_micro_batch(m, 0)
        with pytest.raises(Interrupted):
            strop.train(cfg, show_progress=False)
    run = tmp_path / "runs" / "zero"
    assert [p.name for p in list_checkpoints(run)] == ["step-000000"]
    strop.train(cfg, show_progress=False)
    strop.train({**cfg, "name": "whole"}, show_progress=False)
    assert_same_run(run, tmp_path / "runs" / "whole")


def dpo(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(24))
    cfg = tiny_config(tiny_llama, data, tmp_path / "runs", task="dpo")
    cfg["data"]["template"] = "chatml"
    cfg["train"] = {"batch_size": 4, "max_steps": 6, "eval_every": 2, "seed": 0}
    return cfg


def classification(tiny_bert, tmp_path):
    data = write_jsonl(tmp_path / "labelled.jsonl", labelled_rows(40))
    cfg = tiny_config(tiny_bert, data, tmp_path / "runs", task="classification")
    cfg["method"] = {"name": "full"}
    cfg["train"] = {"batch_size": 8, "max_steps": 6, "eval_every": 2, "seed": 0}
    return cfg


def reward(tiny_llama, tmp_path):
    cfg = dpo(tiny_llama, tmp_path)
    cfg["task"] = "reward"
    return cfg


def orpo(tiny_llama, tmp_path):
    cfg = dpo(tiny_llama, tmp_path)
    cfg["dpo"] = {"loss": "orpo"}
    return cfg


def kto(tiny_llama, tmp_path):
    cfg = dpo(tiny_llama, tmp_path)  # its pairs, read as a good and a bad row each
    cfg["task"] = "kto"
    return cfg


@pytest.mark.parametrize(
    "task", [dpo, orpo, kto, classification, reward], ids=["dpo", "orpo", "kto", "classification", "reward"]
)
def test_every_fit_task_stops_on_a_signal_and_resumes_exactly(task, request, tmp_path, monkeypatch):
    model = request.getfixturevalue("tiny_bert" if task is classification else "tiny_llama")
    cfg = task(model, tmp_path)
    with monkeypatch.context() as m:
        signal_at_micro_batch(m, 3)
        with pytest.raises(Interrupted) as e:
            strop.train({**cfg, "name": "cut"}, show_progress=False)
    assert "step 3" in e.value.message
    strop.train({**cfg, "name": "cut"}, show_progress=False)
    strop.train({**cfg, "name": "whole"}, show_progress=False)
    assert_same_run(tmp_path / "runs" / "cut", tmp_path / "runs" / "whole")


@pytest.mark.parametrize("task", ["grpo", "ppo"])
def test_rl_stops_after_its_rollout_and_resumes_exactly(task, tiny_llama, tmp_path, monkeypatch):
    from strop.training import rl_loop

    cfg = rl_config(tiny_llama, tmp_path, task, method="lora", steps=4)
    real, calls = rl_loop.sample, []

    def sample(*args, **kwargs):  # the signal comes while step 3's replies are sampled
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(rl_loop, "sample", sample)
        with pytest.raises(Interrupted) as e:
            strop.train({**cfg, "name": "cut"}, show_progress=False)
    assert "step 2" in e.value.message
    cut, whole = tmp_path / "runs" / "cut", tmp_path / "runs" / "whole"
    strop.train({**cfg, "name": "cut"}, show_progress=False)
    strop.train({**cfg, "name": "whole"}, show_progress=False)
    rewards = [[r["reward"] for r in read_metrics(d) if "reward" in r] for d in (cut, whole)]
    assert rewards[0] == pytest.approx(rewards[1], abs=1e-6) and len(rewards[0]) == 4
    wa, wb = weights(cut), weights(whole)
    assert all((wa[k] - wb[k]).abs().max() < 1e-6 for k in wa)


def test_resume_of_a_run_with_no_checkpoint_says_so(tiny_llama, tmp_path, capsys):
    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)
    cfg = sft_config(tiny_llama, tmp_path, "run")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    rc, _, err = run_cli(["train", "--resume", str(run)], capsys)
    assert_user_error(rc, err, "holds no checkpoint", f"strop train {run / 'config.yaml'}")
    assert not list_checkpoints(run)


def test_a_torn_last_metrics_line_is_dropped_on_resume(tiny_llama, tmp_path, caplog):
    cfg = sft_config(tiny_llama, tmp_path, "torn", max_steps=3, save_every=1)
    first = strop.train(cfg, show_progress=False)
    with open(first.run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.12')  # a write cut off by kill -9
    assert [r["step"] for r in read_metrics(first.run_dir)][-1] == 3  # readers skip it too
    more = strop.train(cfg, ["train.max_steps=6"], show_progress=False)
    assert "dropped 1 unreadable line" in caplog.text
    lines = (more.run_dir / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    assert [r["step"] for r in read_metrics(more.run_dir) if "loss" in r] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------- a real `strop` process


def _spawn(config: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "strop", "-q", "train", str(config), "--no-progress", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, proc.communicate()
        if any(r.get("step", 0) >= step for r in read_metrics(run)):
            return
        time.sleep(0.02)
    raise AssertionError(f"no step {step} in {timeout} s")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_strop_train_stops_on_a_signal_and_resumes(signum, tiny_llama, tmp_path, capsys):
    cfg = sft_config(tiny_llama, tmp_path, "run", max_steps=200, log_every=1, eval_every=1000)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "runs" / "run"
    proc = _spawn(config)
    _wait_for_step(run, 5, proc)
    t0 = time.time()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert time.time() - t0 < 10
    name = signal.Signals(signum).name
    assert f"interrupted by {name}" in err and f"strop train --resume {run}" in err, err
    assert "Traceback" not in err, err
    (stopped,) = list_checkpoints(run)
    step = json.loads((stopped / "state.json").read_text())["step"]
    assert step >= 5 and [r["step"] for r in read_metrics(run)] == list(range(1, step + 1))

    rc, out, err = run_cli(["-q", "train", "--resume", str(run), "--no-progress"], capsys)
    assert rc == 0, err
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 201))
    assert "loss nan" not in out and "200 steps" in out

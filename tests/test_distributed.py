"""N processes give the run one process gives at the same global batch (torch.distributed, gloo on CPU):
per-step losses and final weights within 1e-5 for SFT (LoRA and full), DPO and classification, with
accumulation, packed rows and an uneven last micro-batch; resume under N processes and with M != N;
two machines simulated on loopback; a failure on one process ends the run with that process's error.

Every run here is `strop train` in subprocesses, as users start it (`--nproc`, or torchrun itself)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import ALPACA_ROWS, tiny_config, write_jsonl
from strop.core.metrics import read_metrics

pytestmark = pytest.mark.distributed
FAULT = Path(__file__).parent / "dist_fault"  # sitecustomize that fails one rank at a step
TIMEOUT = 240


def strop(args: list[str], cwd: Path, env: dict | None = None, timeout: int = TIMEOUT):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "strop", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(cfg: dict, tmp: Path, name: str, *launch: str, env: dict | None = None, ok: bool = True):
    cfg = {**cfg, "name": name}
    p = strop(["train", str(write_config(cfg, tmp / f"{name}.yaml")), "--no-progress", *launch], tmp, env)
    if ok:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def reference(cfg: dict, tmp: Path, name: str) -> None:
    """The one-process run a distributed run is compared with, trained in this process (`strop.train`):
    the same code `strop train` runs, without a process start (~8 s here) per reference."""
    import strop

    strop.train({**cfg, "name": name}, show_progress=False)


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def weights(run_dir: Path) -> dict:
    out = {}
    for f in sorted((run_dir / "model").glob("*.safetensors")):
        out |= {f"{f.name}:{k}": v for k, v in load_file(str(f)).items()}
    assert out, f"no weights in {run_dir / 'model'}"
    return out


def assert_same_run(a: Path, b: Path, atol: float = 1e-5) -> None:
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) > 0
    assert la == pytest.approx(lb, abs=atol, rel=0)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() <= atol, k


def sft_config(model: Path, tmp: Path, rows=ALPACA_ROWS, **sections) -> dict:
    data = write_jsonl(tmp / "train.jsonl", rows)
    cfg = tiny_config(model, data, tmp / "out", **sections)
    cfg["data"].pop("cache_dir", None)  # two processes tokenize side by side; the cache is tested elsewhere
    cfg["train"] |= {"threads": 1, "log_every": 1}
    return cfg


def with_train(cfg: dict, **train) -> dict:
    return {**cfg, "train": {**cfg["train"], **train}}


@pytest.mark.parametrize(
    "method", [{"name": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}, {"name": "full"}]
)
def test_two_processes_equal_one_at_the_same_global_batch(method, tiny_llama, tmp_path):
    cfg = sft_config(tiny_llama, tmp_path, method=method, train={"max_steps": 4, "eval_every": 2})
    reference(with_train(cfg, batch_size=4), tmp_path, "one")
    two = run(with_train(cfg, batch_size=2), tmp_path, "two", "--nproc", "2")
    assert_same_run(tmp_path / "out" / "one", tmp_path / "out" / "two")
    # one voice: rank 0 prints the result once, validation is logged once per evaluation
    assert two.stdout.count("done in ") == two.stdout.count("run directory: ") == 1, two.stdout
    assert "Traceback" not in two.stderr
    vals = [r for r in read_metrics(tmp_path / "out" / "two") if "val_loss" in r]
    assert [r["step"] for r in vals] == [2, 4]


def test_accumulation_packing_and_an_uneven_last_batch(tiny_llama, tmp_path):
    # 13 rows, 10 train: global micro-batches of 4 leave 2, then with 3 processes x 1 a share is empty
    rows = ALPACA_ROWS[:13]
    cfg = sft_config(tiny_llama, tmp_path, rows, train={"max_steps": 6})
    reference(with_train(cfg, batch_size=4, grad_accum=2), tmp_path, "one")
    run(with_train(cfg, batch_size=2, grad_accum=2), tmp_path, "two", "--nproc", "2")
    assert_same_run(tmp_path / "out" / "one", tmp_path / "out" / "two")

    reference(with_train(cfg, batch_size=3, grad_accum=1), tmp_path, "one3")
    run(with_train(cfg, batch_size=1, grad_accum=1), tmp_path, "three", "--nproc", "3")
    assert_same_run(tmp_path / "out" / "one3", tmp_path / "out" / "three")

    packed = with_train(cfg, batch_size=1, batch_tokens=96)
    reference(with_train(packed, grad_accum=2), tmp_path, "packed1")
    run(with_train(packed, grad_accum=1), tmp_path, "packed2", "--nproc", "2")
    assert_same_run(tmp_path / "out" / "packed1", tmp_path / "out" / "packed2")


def dpo_and_classification(tiny_llama: Path, tiny_bert: Path, tmp_path: Path) -> tuple[dict, dict]:
    from test_classify import labelled_rows
    from test_preference import pairs

    dpo = tiny_config(
        tiny_llama, write_jsonl(tmp_path / "pairs.jsonl", pairs(16)), tmp_path / "out", task="dpo"
    )
    dpo["data"]["template"] = "chatml"
    dpo["train"] = {"max_steps": 3, "seed": 0, "threads": 1}

    data = write_jsonl(tmp_path / "labels.jsonl", labelled_rows(30))
    bert = tmp_path / "bert-nodrop"  # BERT's dropout (0.1) draws differently for other batch shapes
    shutil.copytree(tiny_bert, bert)
    conf = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(
        json.dumps(conf | {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    )
    cls = tiny_config(bert, data, tmp_path / "out", task="classification")
    cls["method"] = {"name": "full"}
    cls["classify"] = {"head_dropout": 0.0}  # each process draws its own dropout masks
    cls["train"] = {"max_steps": 3, "seed": 0, "threads": 1}
    return dpo, cls


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_dpo_and_classification_distribute_exactly(parallel, tiny_llama, tiny_bert, tmp_path):
    dpo, cls = dpo_and_classification(tiny_llama, tiny_bert, tmp_path)
    reference(with_train(dpo, batch_size=4), tmp_path, "dpo1")
    run(with_train(dpo, batch_size=2, parallel=parallel), tmp_path, "dpo2", "--nproc", "2")
    assert_same_run(tmp_path / "out" / "dpo1", tmp_path / "out" / "dpo2")
    assert all("reward_accuracy" in r for r in read_metrics(tmp_path / "out" / "dpo2") if "loss" in r)

    reference(with_train(cls, batch_size=8), tmp_path, "cls1")
    run(with_train(cls, batch_size=4, parallel=parallel), tmp_path, "cls2", "--nproc", "2")
    assert_same_run(tmp_path / "out" / "cls1", tmp_path / "out" / "cls2")


def test_a_failing_process_stops_the_run_with_its_own_error_and_resume_goes_on(tiny_llama, tmp_path):
    cfg = sft_config(tiny_llama, tmp_path, train={"max_steps": 6, "save_every": 3})
    reference(with_train(cfg, batch_size=4), tmp_path, "whole")

    fault = {
        "PYTHONPATH": os.pathsep.join([str(FAULT), os.environ.get("PYTHONPATH", "")]),
        "STROP_TEST_FAIL_RANK": "1",
        "STROP_TEST_FAIL_STEP": "5",
    }
    cut = with_train(cfg, batch_size=2)
    p = run(cut, tmp_path, "cut", "--nproc", "2", env=fault, ok=False)
    assert p.returncode == 2, p.stdout + p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: process 1: injected failure on rank 1 at step 5"], p.stderr
    assert "Traceback" not in p.stderr and "ChildFailedError" not in p.stderr
    run_dir = tmp_path / "out" / "cut"
    assert sorted(x.name for x in (run_dir / "checkpoints").iterdir()) == ["step-000003"]

    # resumed with one process at the same global batch: the uninterrupted run
    one = strop(["train", "--resume", str(run_dir), "--no-progress", "--set", "train.batch_size=4"], tmp_path)
    assert one.returncode == 0, one.stderr
    assert_same_run(tmp_path / "out" / "whole", run_dir)


def test_resume_under_two_processes_and_a_changed_split_is_refused(tiny_llama, tmp_path):
    cfg = sft_config(tiny_llama, tmp_path, train={"max_steps": 6, "save_every": 3})
    reference(with_train(cfg, batch_size=4), tmp_path, "whole")
    fault = {"PYTHONPATH": str(FAULT), "STROP_TEST_FAIL_RANK": "0", "STROP_TEST_FAIL_STEP": "5"}
    run(with_train(cfg, batch_size=2), tmp_path, "cut", "--nproc", "2", env=fault, ok=False)
    run_dir = tmp_path / "out" / "cut"

    wrong = strop(["train", "--resume", str(run_dir), "--no-progress"], tmp_path)  # 1 x 2 != 2 x 2
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr, wrong.stderr
    assert "2 process(es)" in wrong.stderr and "--set train.batch_size=4" in wrong.stderr, wrong.stderr

    again = strop(["train", "--resume", str(run_dir), "--no-progress", "--nproc", "2"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert_same_run(tmp_path / "out" / "whole", run_dir)


def test_two_machines_on_loopback_and_plain_torchrun(tiny_llama, tmp_path):
    cfg = sft_config(tiny_llama, tmp_path, train={"max_steps": 3})
    reference(with_train(cfg, batch_size=4), tmp_path, "one")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write_config({**with_train(cfg, batch_size=2), "name": "nodes"}, tmp_path / "nodes.yaml")
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "strop",
                "train",
                str(path),
                "--no-progress",
                "--nproc",
                "1",
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
            ],
            cwd=tmp_path,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outs = [n.communicate(timeout=TIMEOUT) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs
    assert_same_run(tmp_path / "out" / "one", tmp_path / "out" / "nodes")

    path = write_config({**with_train(cfg, batch_size=2), "name": "torchrun"}, tmp_path / "torchrun.yaml")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "strop",
            "train",
            str(path),
            "--no-progress",
        ],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert p.returncode == 0, p.stderr
    assert_same_run(tmp_path / "out" / "one", tmp_path / "out" / "torchrun")


def test_a_signal_stops_every_process_with_a_checkpoint(tiny_llama, tmp_path):
    cfg = sft_config(tiny_llama, tmp_path, train={"max_steps": 400, "batch_size": 2})
    path = write_config({**cfg, "name": "sig"}, tmp_path / "sig.yaml")
    p = subprocess.Popen(
        [sys.executable, "-m", "strop", "train", str(path), "--no-progress", "--nproc", "2"],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "out" / "sig" / "metrics.jsonl"
    deadline = TIMEOUT
    import time

    while deadline > 0 and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.5)
        deadline -= 0.5
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err, err
    ckpts = list((tmp_path / "out" / "sig" / "checkpoints").iterdir())
    assert len(ckpts) == 1 and (ckpts[0] / "state.json").is_file(), err
    state = json.loads((ckpts[0] / "state.json").read_text())
    assert 2 <= state["step"] < 400 and state["processes"] == 2


@pytest.mark.parametrize(
    ("task", "loss"), [("grpo", "dapo"), ("ppo", None), ("grpo", "grpo"), ("grpo", "rloo")]
)
def test_ppo_and_grpo_two_processes_equal_one(task, loss, tiny_llama, tmp_path):
    """Every objective's unit sums over the processes: reply tokens (ppo, dapo) and replies (grpo, rloo,
    whose leave-one-out baseline stays inside each process's whole groups)."""
    from test_rl import rl_config

    extra = {"loss": loss} if loss else {}
    cfg = rl_config(tiny_llama, tmp_path, task=task, steps=3, mini_batch=4, prompts_per_step=4, **extra)
    cfg["train"] |= {"batch_size": 2, "eval_every": 3}
    reference(cfg, tmp_path, "one")
    two = run(cfg, tmp_path, "two", "--nproc", "2")
    a, b = read_metrics(tmp_path / "runs" / "one"), read_metrics(tmp_path / "runs" / "two")
    for key in ("reward", "reply_tokens", "loss", "grad_norm", "val_reward"):
        va, vb = [r[key] for r in a if key in r], [r[key] for r in b if key in r]
        assert len(va) == len(vb) > 0 and va == pytest.approx(vb, abs=1e-5, rel=0), key
    # 3 steps x 4 epochs x 4 mini-batches = 48 Adam updates at lr 1e-2: rounding reaches ~1e-5 in weights
    assert_same_run(tmp_path / "runs" / "one", tmp_path / "runs" / "two", atol=5e-5)
    assert two.stdout.count("done in") == 1 and two.stdout.count("val_reward") == 1, two.stdout


def test_settings_n_processes_cannot_honour_are_refused_by_name_and_errors_are_said_once(
    tiny_llama, tmp_path
):
    from test_rl import rl_config

    cfg = rl_config(tiny_llama, tmp_path, task="grpo", steps=2, prompts_per_step=3)
    p = run(cfg, tmp_path, "grpo", "--nproc", "2", ok=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert [line for line in p.stderr.splitlines() if line.startswith("error:")] == [
        "error: rl.prompts_per_step: 3 prompts per step cannot be shared by 2 processes; make it a multiple of 2"
    ], p.stderr
    cfg = rl_config(tiny_llama, tmp_path, task="ppo", steps=2, prompts_per_step=4)
    p = run(with_train(cfg, parallel="fsdp"), tmp_path, "ppo", "--nproc", "2", ok=False)
    assert "error: train.parallel: fsdp is not built for ppo/grpo" in p.stderr and p.returncode == 2, p.stderr


SLOW_EXIT = """import atexit, os, time
if os.environ.get("RANK") == os.environ.get("STROP_TEST_SLOW_RANK"):
    atexit.register(time.sleep, 5)  # after main() has said its error, before the process ends
"""


@pytest.mark.parametrize("slow_rank", ["0", "1"])
def test_an_error_every_process_meets_is_said_once_whichever_ends_first(slow_rank, tiny_llama, tmp_path):
    # a config error every process meets (a missing data file) is said once, as one process says it.
    # Rank `slow_rank` lingers after its error: with rank 0 slow, the launcher stops it before it ends
    # (exit -SIGTERM after its error), the order that once printed two lines
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "sitecustomize.py").write_text(SLOW_EXIT)
    env = {"PYTHONPATH": str(tmp_path / "slow"), "STROP_TEST_SLOW_RANK": slow_rank}
    cfg = sft_config(tiny_llama, tmp_path)
    cfg["data"]["train"] = [str(tmp_path / "missing.jsonl")]
    p = run(cfg, tmp_path, "missing", "--nproc", "2", env=env, ok=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, p.stderr
    assert errors[0].startswith("error: data file not found") and "missing.jsonl" in errors[0], p.stderr


def shard_files(ckpt: Path) -> list[str]:
    return sorted(f"{p.parent.name}/{p.name}" for p in ckpt.glob("*/shard-*.safetensors"))


@pytest.mark.parametrize(
    "method", [{"name": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}, {"name": "full"}]
)
def test_fsdp_equals_one_process_and_writes_sharded_checkpoints(method, tiny_llama, tmp_path):
    cfg = sft_config(tiny_llama, tmp_path, method=method, train={"max_steps": 4, "eval_every": 2})
    cfg["optim"] = {**cfg.get("optim", {}), "grad_clip": 0.5}  # clipping over shards and whole tensors
    reference(with_train(cfg, batch_size=4), tmp_path, "one")
    two = run(with_train(cfg, batch_size=2, parallel="fsdp"), tmp_path, "fsdp", "--nproc", "2")
    assert_same_run(tmp_path / "out" / "one", tmp_path / "out" / "fsdp")
    assert "blocks sharded over 2 processes" in two.stderr, two.stderr
    ckpt = sorted((tmp_path / "out" / "fsdp" / "checkpoints").iterdir())[-1]
    assert shard_files(ckpt) == [
        f"{part}/shard-0000{r}-model-00001-of-00001.safetensors"
        for part in ("model", "optimizer")
        for r in (1, 2)
    ]
    assert not (ckpt / "trainable.safetensors").exists()
    assert json.loads((ckpt / "state.json").read_text())["sharded"] == 2
    # each process holds half of a block's weight
    rows = [
        load_file(str(ckpt / "model" / f"shard-0000{r}-model-00001-of-00001.safetensors")) for r in (1, 2)
    ]
    name = next(k for k in rows[0] if ".layers.0." in k and k.endswith("weight") and rows[0][k].dim() == 2)
    whole = load_file(str(tmp_path / "out" / "one" / "checkpoints" / ckpt.name / "trainable.safetensors"))[
        name
    ]
    assert rows[0][name].shape[0] + rows[1][name].shape[0] == whole.shape[0]


def test_fsdp_resumes_with_two_one_or_ddp_and_an_empty_share(tiny_llama, tmp_path):
    cfg = sft_config(tiny_llama, tmp_path, train={"max_steps": 6, "save_every": 3})
    reference(with_train(cfg, batch_size=4), tmp_path, "whole")
    fault = {"PYTHONPATH": str(FAULT), "STROP_TEST_FAIL_RANK": "1", "STROP_TEST_FAIL_STEP": "5"}
    sharded = with_train(cfg, batch_size=2, parallel="fsdp")
    for name, resume in (("again", ["--nproc", "2"]), ("single", ["--set", "train.batch_size=4"])):
        run(sharded, tmp_path, name, "--nproc", "2", env=fault, ok=False)
        run_dir = tmp_path / "out" / name
        assert shard_files(run_dir / "checkpoints" / "step-000003"), name
        p = strop(["train", "--resume", str(run_dir), "--no-progress", *resume], tmp_path)
        assert p.returncode == 0, p.stderr
        assert_same_run(tmp_path / "out" / "whole", run_dir)

    # a plain (DDP) checkpoint goes on sharded: each process takes its rows of every tensor
    run(with_train(cfg, batch_size=2), tmp_path, "ddp", "--nproc", "2", env=fault, ok=False)
    run_dir = tmp_path / "out" / "ddp"
    p = strop(
        ["train", "--resume", str(run_dir), "--no-progress", "--nproc", "2", "--set", "train.parallel=fsdp"],
        tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert_same_run(tmp_path / "out" / "whole", run_dir)

    # 10 training rows, 3 processes x 1, accumulation 2: the last micro-batch of an epoch leaves two
    # processes nothing, and they run a filler with no weight to join every block's collectives
    small = sft_config(tiny_llama, tmp_path, ALPACA_ROWS[:13], train={"max_steps": 5})
    reference(with_train(small, batch_size=3, grad_accum=2), tmp_path, "one3")
    run(with_train(small, batch_size=1, grad_accum=2, parallel="fsdp"), tmp_path, "fsdp3", "--nproc", "3")
    assert_same_run(tmp_path / "out" / "one3", tmp_path / "out" / "fsdp3")

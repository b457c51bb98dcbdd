"""train.memory_limit: the micro-batch lowered and accumulation raised at the same global batch, from a
measured probe (training/memory.py); the same losses as the manual setting; the choice kept for resume;
refused by name where it cannot act; the data check states the margin."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from conftest import ALPACA_ROWS, run_cli, tiny_config, write_jsonl
from strop.core.config import RunConfig, TrainConfig
from strop.core.errors import ConfigError
from strop.core.sizes import parse_bytes
from strop.recipes.run import train
from strop.training import memory

GB = 10**9


def test_sizes_as_people_write_them():
    assert parse_bytes("12GB") == 12 * GB and parse_bytes("16 GiB") == 16 * 2**30 and parse_bytes(800) == 800
    assert parse_bytes("auto") is None and parse_bytes("1.5gb") == int(1.5 * GB)
    with pytest.raises(ValidationError, match=r"memory_limit\n.*expected a size such as 12GB"):
        TrainConfig(memory_limit="lots")
    with pytest.raises(ValidationError, match="memory_limit: packed rows"):
        TrainConfig(memory_limit="8GB", batch_tokens=512)


def test_the_largest_divisor_under_the_limit_is_chosen_by_hand():
    def peak_of(m):  # 1 GB for one example, 0.5 GB more per example
        return GB + (m - 1) * GB // 2

    got = memory.choose(8, 8, peak_of, fixed=GB // 5, limit=3 * GB)  # 0.9 x 3 = 2.7 >= 1.2 + 0.5 (m - 1)
    assert (got["micro_batch"], got["grad_accum"]) == (4, 2)  # m <= 4, and 4 divides 8
    assert memory.choose(12, 12, peak_of, fixed=GB // 5, limit=3 * GB)["micro_batch"] == 4
    assert (
        memory.choose(10, 10, peak_of, fixed=GB // 5, limit=3 * GB)["micro_batch"] == 2
    )  # 3, 4 do not divide
    with pytest.raises(ConfigError, match="train.memory_limit: one example.*gradient_checkpointing"):
        memory.choose(8, 8, peak_of, fixed=GB, limit=2 * GB)


def test_a_real_probe_measures_a_peak_that_grows_with_the_micro_batch(tiny_llama, tmp_path, monkeypatch):
    seen = {}
    real_probe = memory.probe

    def watching(*args):
        peak_of = real_probe(*args)

        def measured(m):
            seen[m] = peak_of(m)
            return seen[m]

        return measured

    monkeypatch.setattr(memory, "probe", watching)
    data = write_jsonl(tmp_path / "t.jsonl", ALPACA_ROWS)
    run = train(
        tiny_config(tiny_llama, data, tmp_path / "out", train={"memory_limit": "auto"}), show_progress=False
    )
    assert seen[1] > 50 * 2**20 and seen[2] >= seen[1]  # the process's own resident peak (VmHWM)
    chosen = json.loads((run.run_dir / "memory.json").read_text())
    assert (chosen["micro_batch"], chosen["grad_accum"]) == (4, 1)  # plenty of room: as configured


def test_a_lowered_micro_batch_trains_as_the_manual_setting_and_a_resume_keeps_it(
    tiny_llama, tmp_path, monkeypatch
):
    data = write_jsonl(tmp_path / "t.jsonl", ALPACA_ROWS)
    monkeypatch.setattr(memory, "probe", lambda *a: lambda m: GB + m * GB)  # 2 fit in 3.4 GB, not 4
    auto = train(
        tiny_config(
            tiny_llama, data, tmp_path / "a", train={"batch_size": 8, "memory_limit": "3.9GB", "max_steps": 3}
        ),
        show_progress=False,
    )
    assert json.loads((auto.run_dir / "memory.json").read_text())["micro_batch"] == 2
    manual = train(
        tiny_config(
            tiny_llama, data, tmp_path / "m", train={"batch_size": 2, "grad_accum": 4, "max_steps": 3}
        ),
        show_progress=False,
    )

    def losses(run):
        rows = [json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    assert losses(auto) == losses(manual) and len(losses(auto)) == 3
    monkeypatch.setattr(memory, "probe", lambda *a: pytest.fail("a resumed run must not probe again"))
    more = tiny_config(
        tiny_llama, data, tmp_path / "a", train={"batch_size": 8, "memory_limit": "3.9GB", "max_steps": 5}
    )
    again = train(more, show_progress=False)
    assert json.loads((again.run_dir / "memory.json").read_text())["micro_batch"] == 2


def test_rollout_tasks_refuse_it_by_name(tiny_llama, tmp_path):
    cfg = tiny_config(
        tiny_llama, write_jsonl(tmp_path / "t.jsonl", ALPACA_ROWS), tmp_path, train={"memory_limit": "8GB"}
    )
    cfg.update(task="grpo", rl={"reward": "length", "group_size": 2})
    with pytest.raises(ValidationError, match="train.memory_limit: task grpo does not use it"):
        RunConfig(**cfg)


def test_data_check_states_the_margin_and_warns_when_it_may_not_fit(tiny_llama, tmp_path, capsys):
    import yaml

    cfg = tiny_config(
        tiny_llama, write_jsonl(tmp_path / "t.jsonl", ALPACA_ROWS), tmp_path, train={"memory_limit": "10MB"}
    )
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    rc, out, err = run_cli(["data", "check", str(tmp_path / "c.yaml")], capsys)
    assert "memory margin:" in out and "to train.memory_limit (0.01 GB)" in out
    assert "the run measures and lowers its micro-batch" in out
    cfg["train"]["memory_limit"] = None
    cfg["train"]["batch_size"] = 10**6  # far past this machine's memory by the estimate
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    rc, out, err = run_cli(["data", "check", str(tmp_path / "c.yaml")], capsys)
    assert "warning: the run may not fit in this machine's memory: set train.memory_limit" in out


def test_optimizer_state_counts_three_numbers_per_trainable_weight():
    model = torch.nn.Linear(4, 3)
    model.bias.requires_grad_(False)
    assert memory.optimizer_bytes(model) == 3 * 12 * 4

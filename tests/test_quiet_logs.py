"""Quiet, readable logs: a training run piped to a file (CI, nohup, a scheduler) logs its progress as a
plain line each tenth of the way, with rate and ETA, never a line per step; `-q` silences progress and
info lines but not errors; libraries' warnings and bars stay out, even from a library that speaks up
in the middle of a run (as torchao does when peft imports it)."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ALPACA_ROWS, run_cli, tiny_config, write_jsonl
from strop.core import progress

STEPS = 120
LINE = re.compile(
    rf"^train: (\d+)/{STEPS} \((\d+)%\) [\d.,]+ (?:step/s|s/step), (ETA [\d:]+|[\d:]+ in all), loss=\d"
)
# What torchao and torch write when peft imports torchao (seen in the dashboard's run logs), plus the
# library bars strop users met. Runs in the strop process at peft's first import, after strop has set
# up its logging, as the real chatter does.
CHATTY = """
import builtins, logging, sys, warnings

_import = builtins.__import__

def chatter():
    logging.getLogger("torchao.kernel.intmm").warning("Warning: Detected no triton, kernels will not work")
    logging.getLogger("torch.utils._pytree").warning("<enum 'KernelPreference'> is an Enum subclass")
    warnings.warn("a library's UserWarning", UserWarning)
    from transformers.utils import logging as hf_logging
    from huggingface_hub.utils import tqdm as hub_tqdm
    list(hf_logging.tqdm(range(3), desc="Loading weights"))
    list(hub_tqdm(range(3), desc="Fetching 3 files"))
    print("chatter: said", flush=True)

def hooked(name, *args, **kwargs):
    module = _import(name, *args, **kwargs)
    if name == "peft" and not getattr(hooked, "done", False):
        hooked.done = True
        chatter()
    return module

builtins.__import__ = hooked
from strop.cli.main import main
sys.exit(main(sys.argv[1:]))
"""
THIRD_PARTY = ("triton", "Enum subclass", "UserWarning", "Loading weights", "Fetching", "it/s")


def _config(tmp_path: Path, model: Path, steps: int = STEPS) -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS)
    cfg = tiny_config(model, data, tmp_path / "runs", train={"batch_size": 2, "max_steps": steps, "seed": 0})
    cfg["data"]["max_length"] = 32
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _piped(tmp_path: Path, argv: list[str], name: str = "log.txt") -> tuple[int, str]:
    """`strop ARGV` (through the chatty start above) with stdout and stderr piped into one file."""
    log = tmp_path / name
    with open(log, "wb") as out:
        done = subprocess.run(
            [sys.executable, "-c", CHATTY, *argv],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=300,
        )
    return done.returncode, log.read_text()


def test_a_piped_run_logs_a_line_per_tenth_and_no_library_chatter(tmp_path, tiny_llama):
    rc, log = _piped(tmp_path, ["train", str(_config(tmp_path, tiny_llama))])
    assert rc == 0, log
    assert "\r" not in log and "chatter: said" in log, log  # no bar redrawn; the chatter was spoken
    lines = log.splitlines()
    shown = [LINE.match(line) for line in lines if line.startswith("train:")]
    assert all(shown), log  # every progress line has the count, the rate and an ETA (the last: the time)
    steps = [int(m.group(1)) for m in shown if m]
    assert set(range(STEPS // 10, STEPS + 1, STEPS // 10)) <= set(steps), log  # each tenth, in order
    assert shown[-1] and shown[-1].group(3).endswith("in all"), log
    minutes, seconds = shown[-1].group(3).split()[0].split(":")[-2:]
    took = 60 * int(minutes) + int(seconds)  # on a busy machine a tenth can take over 30 s: a line more
    assert len(steps) <= 10 + took // 30 and steps == sorted(steps), log  # never one per step
    assert any(line.startswith("loaded ") for line in lines), log  # strop's own info lines stay
    assert not [line for line in lines if any(t in line for t in THIRD_PARTY)], log
    assert not [line for line in lines if re.match(r"^\[?[IWE]\d{4} ", line)], log  # glog-style lines


def test_quiet_silences_progress_and_info_but_not_errors(tmp_path, tiny_llama, capsys):
    config = _config(tmp_path, tiny_llama, steps=20)
    rc, log = _piped(tmp_path, ["-q", "train", str(config)])
    assert rc == 0, log
    assert log.startswith("chatter: said\ndone in "), log  # the result, and nothing before it
    assert not re.search(r"^(train|data|loaded|sft|step \d+):", log, re.M), log
    rc, out, err = run_cli(
        ["-q", "train", str(config), "--set", "name=b", "--set", "model.name=nowhere"], capsys
    )
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "nowhere" in err, err


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress, "clock", c)
    yield c
    progress.silence(False)


def test_plain_lines_come_each_tenth_with_the_rate_since_the_last_one(clock):
    out = io.StringIO()  # not a terminal
    bar = progress.tqdm(total=1000, desc="train", unit="step", file=out)
    for i in range(1000):
        clock.now += 0.125 if i < 500 else 0.25  # 8 steps/s, then 4 (exact in binary)
        bar.set_postfix(loss=f"{5 - i / 1000:.2f}")
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10, lines
    assert lines[0] == "train: 100/1000 (10%) 8 step/s, ETA 01:52, loss=4.90"
    assert lines[5] == "train: 600/1000 (60%) 4 step/s, ETA 01:40, loss=4.40"
    assert lines[-1] == "train: 1000/1000 (100%) 5.33 step/s, 03:07 in all, loss=4.00"  # closing: overall


def test_a_batch_finishing_at_once_shows_the_rate_since_the_start(clock):
    out = io.StringIO()
    bar = progress.tqdm(total=24, desc="generate", unit="ex", file=out)
    clock.now += 3
    bar.update(3)  # a batch of replies ends after 3 s, each reported as it is written
    clock.now += 0.001
    bar.update(2)  # a tenth passed a millisecond later: no line may claim 2,000 ex/s
    bar.close()
    assert out.getvalue().splitlines()[:2] == [
        "generate: 3/24 (12%) 1 ex/s, ETA 00:21",
        "generate: 5/24 (20%) 1.67 ex/s, ETA 00:11",
    ]


def test_a_postfix_set_before_each_update_does_not_skew_the_rate(clock):
    out = io.StringIO()
    bar = progress.tqdm(total=30, desc="dapo", unit="step", file=out)
    for _ in range(15):  # the RL loop: a step's work, its postfix, then update(1)
        clock.now += 19
        bar.set_postfix(reward="0.25")
        bar.update(1)
    lines = out.getvalue().splitlines()
    assert lines[:3] == [
        "dapo: 2/30 (6%) 19 s/step, ETA 08:52, reward=0.25",  # 30 s passed: 2 steps in 38 s
        "dapo: 3/30 (10%) 19 s/step, ETA 08:33, reward=0.25",  # a tenth
        "dapo: 5/30 (16%) 19 s/step, ETA 07:55, reward=0.25",
    ], lines
    assert all(" 19 s/step" in line for line in lines), lines


def test_plain_lines_come_every_30_seconds_without_a_total_or_when_slow(clock):
    out = io.StringIO()
    bar = progress.tqdm(desc="tokenize", unit="ex", file=out)
    for _ in range(100):
        clock.now += 1
        bar.update(10)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[:3] == [
        "tokenize: 300 ex, 10 ex/s",
        "tokenize: 600 ex, 10 ex/s",
        "tokenize: 900 ex, 10 ex/s",
    ]
    assert lines[3:] == ["tokenize: 1000 ex, 10 ex/s, 01:40 in all"] and len(lines) == 4
    slow = io.StringIO()
    bar = progress.tqdm(total=1000, desc="trials", unit="trial", file=slow)
    for _ in range(3):
        clock.now += 45
        bar.update(1)  # far from a tenth, but 30 s have passed
    assert slow.getvalue().splitlines() == [
        f"trials: {n}/1000 (0%) 45 s/trial, ETA {progress.tqdm.format_interval(45 * (1000 - n))}"
        for n in (1, 2, 3)
    ]


def test_quiet_and_disable_none_off_a_terminal_write_nothing(clock, monkeypatch):
    out = io.StringIO()
    with progress.tqdm(total=10, desc="tokenize", file=out, disable=None) as bar:  # tqdm's "a terminal only"
        bar.update(10)
    assert out.getvalue() == ""
    progress.silence(True)  # -q
    with progress.tqdm(total=10, desc="train", file=out) as bar:
        bar.update(10)
        bar.write("step 10: val_loss 1.0", file=out)
    assert out.getvalue() == ""
    progress.silence(False)  # the next command, without -q
    with progress.tqdm(total=10, desc="train", file=out) as bar:
        bar.update(10)
        bar.write("step 10: val_loss 1.0", file=out)
    assert out.getvalue().splitlines() == ["train: 10/10 (100%), 00:00 in all", "step 10: val_loss 1.0"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_it_is_tqdms_bar_and_quiet_hides_it_too(clock):
    out = Terminal()
    with progress.tqdm(total=3, desc="train", unit="step", file=out) as bar:
        bar.update(3)
    assert out.getvalue().startswith("\r") and "train: 100%" in out.getvalue() and "3/3" in out.getvalue()
    progress.silence(True)
    with progress.tqdm(total=3, desc="train", file=(quiet := Terminal())) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""

"""`strop tune`: trials are real `strop train` child processes on a tiny model, so these tests check the
search as users run it: the planted optimum is found, the pruner really stops trials, a killed search
resumes without repeating finished trials, two worker processes share one study, bad spaces name the key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import ALPACA_ROWS, assert_user_error, run_cli, tiny_config, write_jsonl
from strop.core.device import usable_cores

LRS = [1e-2, 1e-6, 1e-7]  # one rate that learns in 12 steps, two that leave the model where it started


@pytest.fixture
def base(tiny_llama, tmp_path) -> dict:
    data = write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS)
    return tiny_config(
        tiny_llama,
        data,
        tmp_path / "runs",
        name="search",
        optim={"lr": 1e-6, "schedule": "constant"},  # the default config: learns almost nothing
        train={"batch_size": 4, "max_steps": 12, "eval_every": 2, "seed": 0, "threads": 1},
    )


def write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def study_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "study.json").read_text())


def strop(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "strop", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def test_grid_finds_the_planted_optimum_and_beats_the_default(base, tmp_path, capsys):
    base["search"] = {"sampler": "grid", "pruner": "none", "space": {"optim.lr": LRS}}
    rc, out, err = run_cli(["tune", str(write(tmp_path / "c.yaml", base)), "--no-progress"], capsys)
    assert rc == 0, err
    run_dir = tmp_path / "runs" / "search"
    data = study_json(run_dir)
    assert [t["state"] for t in data["trials"]] == ["complete"] * 3  # the grid, once each, no more
    assert sorted(t["params"]["optim.lr"] for t in data["trials"]) == sorted(LRS)
    assert data["best"]["params"] == {"optim.lr": 1e-2}
    default = next(t for t in data["trials"] if t["params"]["optim.lr"] == 1e-6)
    assert data["best"]["value"] < default["value"] - 0.05
    # every trial is an ordinary run: its own config, metrics, result and report, and no test data
    trial = run_dir / data["best"]["folder"]
    cfg = yaml.safe_load((trial / "config.yaml").read_text())
    assert cfg["optim"]["lr"] == 1e-2 and cfg["data"]["test"] == [] and "search" not in cfg
    assert (
        json.loads((trial / "result.json").read_text())["metrics"]["best_val_loss"] == data["best"]["value"]
    )
    assert (trial / "report.html").is_file() and not (trial / "checkpoints").exists()
    best = yaml.safe_load((run_dir / "best.yaml").read_text())
    assert best["optim"]["lr"] == 1e-2 and best["name"] == "search-best" and "search" not in best
    assert best["train"]["threads"] == 1 and best["data"]["train"][0]["path"] == base["data"]["train"][0]
    report = (run_dir / "report.md").read_text()
    assert "best: trial" in report and "Parameter importances" in report
    assert "best: trial" in out and "best.yaml" in out


def test_median_pruner_stops_lagging_trials_early(base, tmp_path, capsys):
    # long enough that a trial is still training when its first validation is judged
    base["train"].update(max_steps=300, eval_every=10)
    base["search"] = {"sampler": "grid", "pruner": "median", "startup_trials": 1, "space": {"optim.lr": LRS}}
    rc, _, err = run_cli(["tune", str(write(tmp_path / "c.yaml", base)), "--no-progress"], capsys)
    assert rc == 0, err
    run_dir = tmp_path / "runs" / "search"
    data = study_json(run_dir)
    states = {t["params"]["optim.lr"]: t for t in data["trials"]}
    assert states[1e-2]["state"] == "complete"
    for lr in (1e-6, 1e-7):
        t = states[lr]
        assert t["state"] == "pruned", t
        assert t["total_steps"] == 300 and t["steps"] < 150  # really stopped, not just labelled
        logged = [json.loads(x) for x in (run_dir / t["folder"] / "metrics.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in logged) == t["steps"]
        assert not (run_dir / t["folder"] / "model").exists()
        assert list(t["intermediate"])  # the validation values the pruner compared are kept
    c = data["compute"]
    assert c["steps_planned"] == 900 and c["steps_saved"] == 900 - c["steps_run"] > 300
    assert "pruning saved" in (run_dir / "report.md").read_text()


def _finished(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name) for p in (run_dir / "trials").glob("*/result.json"))


def test_a_killed_search_resumes_without_repeating_finished_trials(base, tmp_path):
    base["search"] = {
        "sampler": "random",
        "pruner": "none",
        "trials": 3,
        "space": {"optim.lr": {"low": 1e-4, "high": 1e-2, "log": True}},
    }
    config = write(tmp_path / "c.yaml", base)
    run_dir = tmp_path / "runs" / "search"
    first = strop("tune", str(config), "--no-progress")
    deadline = time.time() + 240
    while len(_finished(run_dir)) < 2 and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert len(_finished(run_dir)) >= 2, first.communicate()[0]
    first.send_signal(signal.SIGKILL)  # no chance to clean up: as a lost machine or the OOM killer
    first.wait()
    kept = {
        n: (run_dir / "trials" / f"{n:03d}" / "result.json").stat().st_mtime_ns for n in _finished(run_dir)
    }
    time.sleep(1.5)  # the running trial dies with its parent (PR_SET_PDEATHSIG)

    again = strop("tune", str(config), "--no-progress")
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out
    data = study_json(run_dir)
    complete = [t for t in data["trials"] if t["state"] == "complete"]
    assert len(complete) == 3
    for n, mtime in kept.items():  # finished trials were kept, not trained again
        assert (run_dir / "trials" / f"{n:03d}" / "result.json").stat().st_mtime_ns == mtime
        assert any(t["number"] == n for t in complete)
    interrupted = [t for t in data["trials"] if t["interrupted"]]
    for t in interrupted:  # the trial the kill cut short ran again, with its parameters
        retry = next(u for u in complete if u["retry_of"] == t["number"])
        assert retry["params"] == t["params"]
    assert len(data["trials"]) == 3 + len(interrupted)


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_two_worker_processes_share_one_study(base, tmp_path, storage):
    base["search"] = {
        "sampler": "random",
        "pruner": "none",
        "trials": 3,
        "space": {"optim.lr": {"low": 1e-4, "high": 1e-2, "log": True}},
    }
    config = write(tmp_path / "c.yaml", base)
    url = (
        f"journal:{tmp_path / 'study.log'}" if storage == "journal" else f"sqlite:///{tmp_path / 'shared.db'}"
    )
    workers = [strop("tune", str(config), "--no-progress", "--storage", url) for _ in range(2)]
    outs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outs
    if storage == "journal":
        from optuna.storages.journal import JournalFileBackend

        store = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "study.log")))
    else:
        store = optuna.storages.RDBStorage(url)
    study = optuna.load_study(study_name="search", storage=store)
    trials = study.get_trials()
    finished = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 3 <= len(finished) <= 4  # two processes may each start a trial for the last slot
    assert len({t.number for t in trials}) == len(trials)
    assert len({t.user_attrs["worker"] for t in finished}) == 2  # both did work
    run_dir = tmp_path / "runs" / "search"
    assert sorted(_finished(run_dir)) == sorted(t.number for t in finished)


def test_refit_compares_base_default_and_best_on_the_test_set(base, tmp_path, capsys):
    held_out = [
        {"instruction": f"What is {a} times {b}?", "output": f"Arr! {a * b}, matey."}
        for a in (8, 9)
        for b in (7, 8, 9)
    ]
    test = write_jsonl(tmp_path / "test.jsonl", held_out)
    base["data"]["test"] = [str(test)]
    base["eval"] = {"enabled": True, "max_new_tokens": 4, "forgetting": False, "samples": 1, "bootstrap": 100}
    base["search"] = {"sampler": "grid", "pruner": "none", "space": {"optim.lr": [1e-2, 1e-7]}}
    rc, out, err = run_cli(
        ["tune", str(write(tmp_path / "c.yaml", base)), "--refit", "--no-progress"], capsys
    )
    assert rc == 0, err
    run_dir = tmp_path / "runs" / "search"
    refit = json.loads((run_dir / "refit.json").read_text())
    assert refit["examples"] == 6
    assert {"default", "best"} <= set(refit["runs"])
    for name in ("default", "best"):
        summary = json.loads((run_dir / "refit" / name / "eval" / "summary.json").read_text())
        assert summary["set"] == "test"
    best_cfg = yaml.safe_load((run_dir / "refit" / "best" / "config.yaml").read_text())
    assert best_cfg["optim"]["lr"] == 1e-2
    metrics = {m["name"]: m for m in refit["metrics"]}
    assert {"rouge_l", "bleu", "test loss"} <= set(metrics)
    assert metrics["test loss"]["best"] < metrics["test loss"]["default"]
    lo, hi = metrics["rouge_l"]["best_vs_default"]["ci"]
    assert lo <= metrics["rouge_l"]["best_vs_default"]["diff"] <= hi
    assert "Held-out test" in (run_dir / "report.md").read_text()
    assert "test rouge_l" in out


BAD_SPACES = [
    ({"optim.lrr": [1e-3]}, "search.space.optim.lrr: unknown config key"),
    ({"optim": [1e-3]}, "search.space.optim: optim is a section"),
    ({"optim.lr": {"low": 1e-2, "high": 1e-4}}, "search.space.optim.lr: an empty range"),
    ({"optim.lr": {"low": 0, "high": 1e-2, "log": True}}, "search.space.optim.lr: a log range needs low > 0"),
    ({"optim.lr": {"low": 1e-4}}, "search.space.optim.lr.high: required key is missing"),
    ({"optim.lr": {"low": 1e-4, "high": 1e-2, "logg": True}}, "search.space.optim.lr.logg: unknown key"),
    ({"method.lora.r": []}, "search.space.method.lora.r: an empty list of choices"),
    ({"method.lora.r": [0, 4]}, "search.space.method.lora.r: the value 0 made the config invalid"),
    ({"optim.lr": 1e-3}, "search.space.optim.lr: expected {low, high}"),
    ({"name": ["a", "b"]}, "search.space.name: name cannot be searched"),
    ({}, "search.space: nothing to search"),
    # bounds held to the field's type and ceiling (tune/bounds.py)
    (
        {"train.max_steps": {"low": 1, "high": 1e12}},
        "search.space.train.max_steps.high: train.max_steps is an integer",
    ),
    (
        {"train.max_steps": {"low": 1, "high": 10**11}},
        "search.space.train.max_steps.high: 100000000000 is beyond",
    ),
    (
        {"train.max_steps": {"low": 2, "high": 8, "step": 2.0}},
        "search.space.train.max_steps.step: train.max_steps is an integer",
    ),
    (
        {"train.max_steps": [4, 2.5]},
        "search.space.train.max_steps: train.max_steps is an integer, got the choice 2.5",
    ),
    (
        {"train.max_steps": [4, True]},
        "search.space.train.max_steps: train.max_steps is a number, got the choice True",
    ),
    (
        {"train.batch_size": {"low": 1, "high": 100000}},
        "search.space.train.batch_size.high: 100000 is beyond what a search tries for train.batch_size (at most 4,096",
    ),
    ({"train.epochs": [1, 1e5]}, "search.space.train.epochs: 100000.0 is beyond"),
    ({"train.seed": [2**70]}, "search.space.train.seed: 1180591620717411303424 is beyond"),
    ({"optim.lr": {"low": 1e-4, "high": 1e300}}, "search.space.optim.lr.high: 1e+300 is beyond"),
    (
        {"train.gradient_checkpointing": {"low": 0, "high": 1}},
        "search.space.train.gradient_checkpointing: train.gradient_checkpointing is true or false",
    ),
    (
        {"optim.schedule": {"low": 0, "high": 2}},
        "search.space.optim.schedule: optim.schedule takes one of constant, linear, cosine",
    ),
    ({"optim.betas": {"low": 0, "high": 1}}, "search.space.optim.betas: optim.betas is not a number"),
    # the schema's own ceiling (data.val_fraction < 1): the end is validated as the config
    (
        {"data.val_fraction": {"low": 0.1, "high": 1.0}},
        "search.space.data.val_fraction: the value 1.0 made the config invalid",
    ),
]


@pytest.mark.parametrize(
    "space,message", BAD_SPACES, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD_SPACES)]
)
def test_bad_search_spaces_name_the_key(base, tmp_path, capsys, space, message):
    base["search"] = {"space": space}
    rc, _, err = run_cli(["tune", str(write(tmp_path / "c.yaml", base))], capsys)
    assert_user_error(rc, err, message)
    assert not (tmp_path / "runs" / "search").exists()  # refused before any study or trial


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--space", "optim.lr"], "--space 'optim.lr': expected KEY=SPEC"),
        (["--space", "optim.lr={low: 1e-4, high: 1e-2}", "--sampler", "grid"], "grid sampler needs a list"),
        (
            ["--space", "optim.lr=[1e-3]", "--objective", "exact_match"],
            "search.objective: exact_match is not among",
        ),
        (["--space", "optim.lr=[1e-3]", "--set", "train.eval_every=null"], "search.pruner: median prunes"),
        (
            ["--space", "optim.lr=[1e-3]", "--storage", "nowhere"],
            "search.storage: expected an SQLAlchemy URL",
        ),
        (["--space", "optim.lr=[1e-3]", "--refit"], "--refit: the refit is evaluated on data.test"),
        (["--space", "train.max_steps={low: 1, high: 1e12}"], "search.space.train.max_steps.high: "),
        (
            ["--space", "train.max_steps={low: 1, high: 5000}", "--sampler", "grid"],
            "search.space.train.max_steps: the grid over train.max_steps has more than 1,000 points",
        ),
        (  # each value passes alone, one grid point does not: every point is checked first
            [
                "--space",
                "train.batch_tokens=[64, 128]",
                "--space",
                "data.max_length=[64, 128]",
                "--sampler",
                "grid",
            ],
            "search.space.train.batch_tokens: the value 64 made the config invalid: train.batch_tokens (64) "
            "must be at least data.max_length (128)",
        ),
    ],
)
def test_bad_search_settings_are_refused_before_any_trial(base, tmp_path, capsys, extra, message):
    rc, _, err = run_cli(["tune", str(write(tmp_path / "c.yaml", base)), *extra], capsys)
    assert_user_error(rc, err, message)
    assert not (tmp_path / "runs" / "search" / "trials").exists()


def test_a_failing_first_trial_stops_the_search_with_its_error(base, tmp_path, capsys):
    base["data"]["train"] = [str(tmp_path / "gone.jsonl")]
    (tmp_path / "gone.jsonl").write_text(json.dumps(ALPACA_ROWS[0]) + "\n" + "{not json\n" * 20)
    base["search"] = {"space": {"optim.lr": [1e-3, 1e-2]}}
    rc, _, err = run_cli(["tune", str(write(tmp_path / "c.yaml", base)), "--no-progress"], capsys)
    assert_user_error(rc, err, "trial 000 failed:", "gone.jsonl", "log.txt")
    data = study_json(tmp_path / "runs" / "search")
    assert [t["state"] for t in data["trials"]] == ["fail"]


def test_values_the_config_refuses_together_stop_the_search_naming_the_key(base, tmp_path, capsys):
    # each value passes alone against the config; the random sampler's first trial holds both
    base["search"] = {"sampler": "random", "space": {"train.batch_tokens": [64], "data.max_length": [128]}}
    rc, _, err = run_cli(["tune", str(write(tmp_path / "c.yaml", base)), "--no-progress"], capsys)
    assert_user_error(
        rc,
        err,
        "error: search.space.train.batch_tokens: the value 64 made the config invalid: train.batch_tokens",
    )
    assert err.count("error:") == 1
    [trial] = study_json(tmp_path / "runs" / "search")["trials"]
    assert trial["state"] == "fail" and trial["error"].startswith("search.space.train.batch_tokens")
    assert not (tmp_path / "runs" / "search" / "trials").exists()  # no run was started


def test_a_run_failing_on_a_searched_key_stops_the_search_naming_it(base, tmp_path, capsys):
    # the config takes any module name; the run itself finds none such: the space's fault, said at once
    base["search"] = {"sampler": "grid", "space": {"method.lora.target_modules": ["no_such_proj", "q_proj"]}}
    rc, _, err = run_cli(["tune", str(write(tmp_path / "c.yaml", base)), "--no-progress"], capsys)
    assert_user_error(
        rc,
        err,
        "error: search.space.method.lora.target_modules: the value 'no_such_proj' failed trial 000 (log: ",
        ": method.lora.target_modules: ",
    )
    data = study_json(tmp_path / "runs" / "search")
    assert [t["state"] for t in data["trials"]] == ["fail", "waiting"], err  # the grid's next never ran


def test_only_an_error_that_begins_with_a_searched_key_blames_the_space():
    from strop.tune.space import blamed_key, space_error

    values = {"optim.lr": 0.5, "method.lora.r": 8}
    assert blamed_key("method.lora.r: 8 is above the width", values) == "method.lora.r"
    assert blamed_key("method.lora.rank_pattern: unknown", values) is None
    # a diverged run's advice names optim.lr: an ordinary trial failure, not the space's
    diverged = "3 consecutive steps had a non-finite loss; stopped at step 9. Lower optim.lr or use float32."
    assert blamed_key(diverged, values) is None
    assert space_error(values, "data.train: gone").startswith(
        "search.space (optim.lr, method.lora.r): the values optim.lr=0.5, method.lora.r=8 made"
    )


def test_a_fault_inside_a_worker_is_raised_not_lost(base, tmp_path, capsys, monkeypatch):
    from strop.tune.search import Search

    def broken(self, values, number):
        raise RuntimeError("a bug in strop")

    monkeypatch.setattr(Search, "_trial_config", broken)
    base["search"] = {"space": {"optim.lr": [1e-3]}}
    with pytest.raises(RuntimeError, match="a bug in strop"):  # a traceback and exit 1, never exit 0
        run_cli(["tune", str(write(tmp_path / "c.yaml", base)), "--no-progress"], capsys)


def test_train_of_a_config_with_a_search_section_trains_the_default(base, tmp_path, capsys):
    base["search"] = {"space": {"optim.lr": [1e-3]}}
    base["train"]["max_steps"] = 2
    rc, _, err = run_cli(["train", str(write(tmp_path / "c.yaml", base)), "--no-progress"], capsys)
    assert rc == 0, err
    saved = yaml.safe_load((tmp_path / "runs" / "search" / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 1e-6
    assert os.path.exists(tmp_path / "runs" / "search" / "model")


def test_workers_run_trials_side_by_side_in_one_process(base, tmp_path, capsys):
    base["search"] = {
        "sampler": "random",
        "pruner": "none",
        "trials": 2,
        "space": {"optim.lr": {"low": 1e-4, "high": 1e-2, "log": True}},
    }
    del base["train"]["threads"]  # each of the two trials then gets half the cores
    rc, _, err = run_cli(
        ["tune", str(write(tmp_path / "c.yaml", base)), "--workers", "2", "--no-progress"], capsys
    )
    assert rc == 0, err
    run_dir = tmp_path / "runs" / "search"
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{run_dir / 'study.db'}")
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))  # two ran at once
    for t in trials:
        cfg = yaml.safe_load((run_dir / t.user_attrs["folder"] / "config.yaml").read_text())
        assert cfg["train"]["threads"] == max(1, usable_cores() // 2)


def test_hyperband_prunes_too_and_report_rewrites_a_study(base, tmp_path, capsys):
    base["train"].update(max_steps=300, eval_every=10)
    base["search"] = {
        "sampler": "grid",
        "pruner": "hyperband",
        "space": {"optim.lr": [1e-2, 3e-3, 1e-6, 1e-7]},
    }
    rc, _, err = run_cli(["tune", str(write(tmp_path / "c.yaml", base)), "--no-progress"], capsys)
    assert rc == 0, err
    run_dir = tmp_path / "runs" / "search"
    data = study_json(run_dir)
    pruned = [t for t in data["trials"] if t["state"] == "pruned"]
    assert pruned and all(t["steps"] < t["total_steps"] for t in pruned)
    assert data["best"]["params"]["optim.lr"] in (1e-2, 3e-3)
    (run_dir / "report.md").unlink()
    rc, out, err = run_cli(["report", str(run_dir)], capsys)
    assert rc == 0, err
    assert "| trial | state |" in (run_dir / "report.md").read_text()


def _strop_children(config_dir: Path) -> list[int]:
    """Processes whose command line names a config under `config_dir` (trials still running)."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(config_dir).encode() in cmdline.read_bytes():
                out.append(int(cmdline.parent.name))
        except OSError:
            continue
    return out


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
def test_sigterm_stops_the_running_trial_and_queues_it_again(base, tmp_path):
    base["train"].update(max_steps=3000, eval_every=100)
    base["search"] = {"sampler": "random", "pruner": "none", "trials": 3, "space": {"optim.lr": [1e-3, 1e-2]}}
    config = write(tmp_path / "c.yaml", base)
    run_dir = tmp_path / "runs" / "search"
    search = strop("tune", str(config), "--no-progress")
    metrics = run_dir / "trials" / "000" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.1)
    search.send_signal(signal.SIGTERM)
    out = search.communicate(timeout=120)[0]
    assert search.returncode == 128 + signal.SIGTERM, out
    assert "interrupted by SIGTERM" in out and "run the same strop tune command to resume it" in out
    assert "Traceback" not in out
    assert _strop_children(run_dir / "trials") == []  # the trial stopped with its search
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert max(steps) < 3000
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{run_dir / 'study.db'}")
    first, *rest = study.get_trials()
    assert first.state == optuna.trial.TrialState.FAIL and first.user_attrs["interrupted"]
    assert [t.state for t in rest] == [optuna.trial.TrialState.WAITING]  # queued again, same parameters
    assert rest[0].params == first.params or rest[0].system_attrs["fixed_params"] == first.params


EXAMPLES = sorted((Path(__file__).parents[1] / "examples").rglob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_example_configs_load_and_their_search_spaces_check(path):
    from strop.core.config import load_config
    from strop.tune.search import prepare

    cfg = load_config(str(path))
    assert path.read_text().startswith("#"), "an example config starts with a comment saying what it does"
    if cfg.search is not None:
        params, objective, base = prepare(cfg, cfg.search)
        assert {p.key for p in params} == set(cfg.search.space) and "search" not in base

"""The `strop` command line: help, training from YAML, resuming, user errors (status 2, one clear line,
no traceback), and the shipped configs."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

import strop.recipes
from conftest import ALPACA_ROWS, assert_user_error, run_cli, tiny_config, write_jsonl
from strop.cli.main import build_parser
from strop.core.config import load_config
from strop.core.metrics import read_metrics
from strop.models.catalogue import CATALOGUE

CONFIG_DIR = Path(strop.recipes.__file__).parent / "configs"
SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------ help


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _commands() -> list[tuple[str, ...]]:
    out = []
    for name, sub in _subparsers(build_parser()).items():
        out.append((name,))
        if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
            out += [(name, child) for child in _subparsers(sub)]
    return out


def _leaves(parser=None, path=()) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command that runs something: (its words, its parser)."""
    out = []
    for name, sub in _subparsers(parser or build_parser()).items():
        if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
            out += _leaves(sub, (*path, name))
        else:
            out.append(((*path, name), sub))
    return out


def test_every_command_names_its_handler_in_the_module_that_declares_it():
    """No dispatch by string: each command's parser carries its handler, a function of the command
    group's own module (not main, which only builds the parser and handles errors)."""
    for words, parser in _leaves():
        handler = parser.get_default("handler")
        assert callable(handler), words
        assert handler.__module__.startswith("strop.cli.") and handler.__module__ != "strop.cli.main", words
        assert parser.get_default("func") is None, words


def test_cli_modules_import_each_other_without_a_circle():
    """The cli modules import each other only downwards (main -> command groups -> options, configs)."""
    import ast

    import strop.cli

    folder = Path(strop.cli.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]  # module level only
        names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in top if isinstance(n, ast.ImportFrom) and n.module}
        names |= {
            f"strop.cli.{a.name}"
            for n in top
            if isinstance(n, ast.ImportFrom) and n.module == "strop.cli"
            for a in n.names
        }
        graph[path.stem] = {n.split(".")[2] for n in names if n.startswith("strop.cli.")}
    assert all("main" not in deps for deps in graph.values())

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(
            d == goal or (d not in seen and reaches(d, goal, seen | {d})) for d in graph.get(start, ())
        )

    circles = [m for m in graph if reaches(m, m, set())]
    assert not circles, f"import circle through {circles}"


def test_building_the_parser_imports_no_heavy_library():
    """torch and transformers are imported inside handlers, so `strop --help` stays fast."""
    import subprocess
    import sys

    code = (
        "import sys; from strop.cli.main import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_top_level_help_lists_every_command(capsys):
    rc, out, _ = run_cli(["--help"], capsys)
    assert rc == 0
    for name in _subparsers(build_parser()):
        assert name in out
    assert "--quiet" in out


def test_every_command_is_covered():
    names = {c[0] for c in _commands()}
    assert {"quickstart", "train", "chat", "generate", "merge", "models", "configs"} <= names


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_every_command_help_exits_0_and_names_its_options(command, capsys):
    parser = build_parser()
    for name in command:
        parser = _subparsers(parser)[name]
    rc, out, err = run_cli([*command, "--help"], capsys)
    assert rc == 0 and not err
    assert out.startswith("usage: strop " + " ".join(command))
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:  # an old name kept working (data prepare --overwrite)
            continue
        for option in action.option_strings:
            assert option in out
        if not action.option_strings and action.metavar:
            assert action.metavar in out
        if action.help and action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction):
            assert action.help.split()[0] in out


def test_no_command_is_a_usage_error(capsys):
    rc, _, err = run_cli([], capsys)
    assert rc == 2 and "usage: strop" in err and "Traceback" not in err


def test_unknown_option_is_a_usage_error(capsys):
    rc, _, err = run_cli(["train", "x.yaml", "--max-steps", "3"], capsys)
    assert rc == 2 and "unrecognized arguments: --max-steps" in err


# ----------------------------------------------------------------------------------------- train


@pytest.fixture
def tiny_yaml(tiny_llama, tmp_path) -> Path:
    """A run config in a YAML file whose data path is relative to the YAML file."""
    folder = tmp_path / "project"
    folder.mkdir()
    write_jsonl(folder / "pirate.jsonl", ALPACA_ROWS)
    cfg = tiny_config(tiny_llama, Path("pirate.jsonl"), tmp_path / "runs", train={"max_steps": 6})
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    cfg["model"]["device"] = "cpu"  # resumed == uninterrupted to 1e-6 is a CPU (deterministic) claim
    return write_config(folder / "tiny.yaml", cfg)


def test_train_from_a_yaml_file_with_overrides(tiny_yaml, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # not the YAML's folder: data paths are relative to the YAML file
    rc, out, err = run_cli(
        [
            "train",
            str(tiny_yaml),
            "--set",
            "train.max_steps=2",
            "--set",
            "name=short",
            "--set",
            "optim.lr=3e-3",
            "--no-progress",
        ],
        capsys,
    )
    assert rc == 0, err
    run = tmp_path / "runs" / "short"
    result = json.loads((run / "result.json").read_text())
    assert result["metrics"]["steps"] == 2
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 3e-3 and saved["train"]["max_steps"] == 2
    assert saved["data"]["train"][0]["path"] == str(tiny_yaml.parent / "pirate.jsonl")
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2]
    assert "done in" in out and "2 steps" in out and f"run directory: {run}" in out
    assert (run / "model" / "adapter_model.safetensors").is_file()


def test_train_needs_a_config(capsys):
    rc, _, err = run_cli(["train"], capsys)
    assert_user_error(rc, err, "--resume")


def _interrupt_at_step(monkeypatch, step: int) -> None:
    """Ctrl-C during the forward pass of optimizer step `step` (1-based)."""
    import strop.methods.sft as sft

    real, calls = sft.loss, []

    def loss(model, batch):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(sft, "loss", loss)


def test_interrupted_run_resumes_to_the_same_result(tiny_yaml, tmp_path, monkeypatch, capsys):
    common = ["--set", "train.save_every=1", "--set", "train.eval_every=2", "--no-progress"]
    with monkeypatch.context() as m:
        _interrupt_at_step(m, 4)
        rc, _, err = run_cli(["-q", "train", str(tiny_yaml), "--set", "name=cut", *common], capsys)
    assert rc == 130 and "--resume" in err and "Traceback" not in err
    cut = tmp_path / "runs" / "cut"
    assert not (cut / "result.json").exists()

    rc, out, err = run_cli(["-q", "train", "--resume", str(cut), "--no-progress"], capsys)
    assert rc == 0, err
    assert json.loads((cut / "result.json").read_text())["metrics"]["steps"] == 6
    losses = [r["step"] for r in read_metrics(cut) if "loss" in r]
    assert losses == [1, 2, 3, 4, 5, 6]  # steps 1-3 from the first run, 4-6 after resuming

    rc, _, err = run_cli(["-q", "train", str(tiny_yaml), "--set", "name=whole", *common], capsys)
    assert rc == 0, err
    whole = tmp_path / "runs" / "whole"
    resumed = load_file(str(cut / "model" / "adapter_model.safetensors"))
    straight = load_file(str(whole / "model" / "adapter_model.safetensors"))
    assert resumed.keys() == straight.keys()
    for k in resumed:
        assert (resumed[k] - straight[k]).abs().max() < 1e-6, k
    assert [r["loss"] for r in read_metrics(cut) if "loss" in r] == pytest.approx(
        [r["loss"] for r in read_metrics(whole) if "loss" in r], abs=1e-6
    )

    rc, _, err = run_cli(["-q", "train", "--resume", str(cut)], capsys)
    assert_user_error(rc, err, "already holds a finished run", str(cut))


def test_resume_continues_the_run_where_it_now_is(tiny_yaml, tmp_path, monkeypatch, capsys):
    """A run directory that was moved (or copied) resumes in place, not at its old path."""
    with monkeypatch.context() as m:
        _interrupt_at_step(m, 3)
        rc, _, _ = run_cli(
            ["-q", "train", str(tiny_yaml), "--set", "train.save_every=1", "--no-progress"], capsys
        )
    assert rc == 130
    old = tmp_path / "runs" / "run"
    new = tmp_path / "elsewhere" / "my-run"
    new.parent.mkdir()
    shutil.move(old, new)
    rc, out, err = run_cli(["-q", "train", "--resume", str(new), "--no-progress"], capsys)
    assert rc == 0, err
    assert not old.exists()
    assert json.loads((new / "result.json").read_text())["metrics"]["steps"] == 6
    assert [r["step"] for r in read_metrics(new) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert f"run directory: {new}" in out


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    rc, _, err = run_cli(["train", "--resume", str(tmp_path)], capsys)
    assert_user_error(rc, err, str(tmp_path), "config.yaml")


# ----------------------------------------------------------------------------------- user errors


def test_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    rc, _, err = run_cli(["train", str(missing)], capsys)
    assert_user_error(rc, err, str(missing), "strop configs")


@pytest.mark.parametrize("where", ["yaml", "set"])
def test_unknown_config_key_names_the_dotted_key(where, tiny_llama, alpaca_file, tmp_path, capsys):
    cfg = tiny_config(tiny_llama, alpaca_file, tmp_path / "runs")
    extra = []
    if where == "yaml":
        cfg["train"]["batch_sise"] = 4
    else:
        extra = ["--set", "train.batch_sise=4"]
    path = write_config(tmp_path / "bad.yaml", cfg)
    rc, _, err = run_cli(["train", str(path), *extra], capsys)
    assert_user_error(rc, err, "train.batch_sise", "unknown key", str(path))
    assert not (tmp_path / "runs").exists()


def test_bad_config_value_names_the_key(tiny_llama, alpaca_file, tmp_path, capsys):
    path = write_config(tmp_path / "bad.yaml", tiny_config(tiny_llama, alpaca_file, tmp_path / "runs"))
    rc, _, err = run_cli(["train", str(path), "--set", "optim.lr=fast"], capsys)
    assert_user_error(rc, err, "optim.lr", "'fast'")


def test_malformed_yaml(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  name: [unclosed\n")
    rc, _, err = run_cli(["train", str(path)], capsys)
    assert_user_error(rc, err, str(path), "YAML")


@pytest.mark.parametrize(
    "bad_line, needles",
    [
        ('{"instruction": "What is 9 times 9?"}', ["'output'", "missing"]),
        ('{"instruction": "What is 9 times 9?", "output": 81}', ["'output'", "expected a string"]),
        ('{"instruction": "What is 9 times 9?", "output": "81"', ["invalid JSON"]),
    ],
    ids=["missing-field", "wrong-type", "bad-json"],
)
def test_malformed_data_row_names_file_line_and_field(bad_line, needles, tiny_llama, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    lines = [json.dumps(r) for r in ALPACA_ROWS[:4]]
    lines[2] = bad_line
    data.write_text("\n".join(lines) + "\n")
    path = write_config(tmp_path / "run.yaml", tiny_config(tiny_llama, data, tmp_path / "runs"))
    rc, _, err = run_cli(["train", str(path), "--no-progress"], capsys)
    assert_user_error(rc, err, f"{data}:3", *needles)


def test_missing_data_file(tiny_llama, tmp_path, capsys):
    data = tmp_path / "data" / "missing.jsonl"
    path = write_config(tmp_path / "run.yaml", tiny_config(tiny_llama, data, tmp_path / "runs"))
    rc, _, err = run_cli(["train", str(path), "--no-progress"], capsys)
    assert_user_error(rc, err, "not found", str(data))


def test_unknown_model_name_in_config(alpaca_file, tmp_path, capsys):
    path = write_config(
        tmp_path / "run.yaml", tiny_config(Path("smollm3-tiny"), alpaca_file, tmp_path / "runs")
    )
    rc, _, err = run_cli(["train", str(path), "--no-progress"], capsys)
    assert_user_error(rc, err, "model.name", "'smollm3-tiny'")


# ------------------------------------------------------------------------------ shipped configs


def test_configs_lists_the_shipped_configs(capsys):
    rc, out, _ = run_cli(["configs"], capsys)
    assert rc == 0
    listed = [line.split()[0] for line in out.splitlines() if line.strip() and not line.startswith("(")]
    assert listed == [p.stem for p in SHIPPED]
    for p in SHIPPED:  # each with the first line of its comment
        first = p.read_text().splitlines()[0].lstrip("# ")
        assert f"{p.stem}" in out and first[:40] in out


def test_configs_prints_one_config(capsys):
    rc, out, _ = run_cli(["configs", "quickstart"], capsys)
    assert rc == 0 and out == (CONFIG_DIR / "quickstart.yaml").read_text()
    rc, _, err = run_cli(["configs", "no-such-config"], capsys)
    assert_user_error(rc, err, "no-such-config")


def test_there_are_shipped_configs():
    assert len(SHIPPED) >= 3, f"expected at least 3 configs in {CONFIG_DIR}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_loads(path):
    cfg = load_config(str(path))
    assert path.read_text().startswith("#"), "a shipped config starts with a comment saying what it does"
    shipped_data = {p.name for p in (CONFIG_DIR.parent / "data").iterdir()}
    for src in [*cfg.data.train, *cfg.data.validation]:
        if Path(src.path).name in shipped_data:  # shipped data resolves next to the config, from any cwd
            assert Path(src.path).is_absolute() and Path(src.path).is_file(), src.path
    name = cfg.model.name
    assert name in CATALOGUE or name.count("/") == 1 or Path(name).suffix == ".gguf", name
    load_config(str(path), ["train.max_steps=1", "data.max_length=32"])  # overrides apply cleanly


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["eval", "m", "--data", "d.jsonl", "--data-format", "nosuch"], "invalid choice: 'nosuch'"),
        (["generate", "m", "--prompt", "hi", "--temperature", "nan"], "must be a number >= 0"),
        (["generate", "m", "--prompt", "hi", "--top-p", "7"], "must be in (0, 1]"),
    ],
)
def test_sampling_and_format_options_are_checked(argv, needle, capsys):
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2 and needle in err and "Traceback" not in err


def test_ctrl_c_while_starting_is_an_interrupt_not_a_traceback(monkeypatch, capsys):
    import strop.cli.main as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "quiet_libraries", interrupted)
    rc, _, err = run_cli(["configs"], capsys)
    assert rc == 130 and "interrupted" in err and "Traceback" not in err

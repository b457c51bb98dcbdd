"""One vocabulary across the `strop` commands (README, "One vocabulary"), checked by walking every
command's parser: one name per idea and one idea per name, every output `--out`, the retrieval index
always `--index`, `--format` only for what export writes, old spellings refused with one `error:` line
naming the new one, and the Python API's defaults equal to the CLI's."""

from __future__ import annotations

import argparse
import inspect
import re
from collections import defaultdict

import pytest

from conftest import run_cli, write_jsonl
from strop.cli.options import DATA_FORMATS, DEVICES, _Renamed, positive_int
from test_cli import _leaves

LEAVES = _leaves()


def _visible(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments --help shows (not -h, not hidden old names)."""
    return [
        a
        for a in parser._actions
        if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction | _Renamed)
    ]


def _all() -> list[tuple[str, argparse.Action]]:
    """(command, action) for every visible argument of every command."""
    return [(" ".join(words), a) for words, p in LEAVES for a in _visible(p)]


def test_one_name_one_meaning():
    """An option names one setting (one dest, one value type) wherever it appears, and a setting has
    one option name on every command."""
    meanings: dict[str, set] = defaultdict(set)
    names: dict[str, set] = defaultdict(set)
    for _, a in _all():
        if not a.option_strings:
            continue
        for option in a.option_strings:
            meanings[option].add((a.dest, getattr(a.type, "__name__", None)))
        names[a.dest].add(tuple(a.option_strings))
    assert {o: m for o, m in meanings.items() if len(m) > 1} == {}
    assert {d: n for d, n in names.items() if len(n) > 1} == {}


def test_every_output_is_out():
    """Whatever a command writes is `--out PATH` (the index `rag index` writes is `--index`): no output
    is positional, and every command that can replace what is there (--force) takes --out."""
    positionals = {(c, a.metavar) for c, a in _all() if not a.option_strings}
    assert not [p for p in positionals if re.search(r"OUT", str(p[1]))], positionals
    options = {o for _, a in _all() for o in a.option_strings}
    assert not options & {"-o", "--output", "--output-dir", "--out-dir", "--outdir"}
    for words, p in LEAVES:
        flags = {o for a in _visible(p) for o in a.option_strings}
        if "--force" in flags:
            assert "--out" in flags, words


def test_the_retrieval_index_is_always_index():
    """`--index INDEX` on the rag commands; `--rag INDEX` only as the switch that turns retrieval on."""
    rag_switch = set()
    for command, a in _all():
        if a.metavar == "INDEX" or a.dest == "index":
            assert a.option_strings in (["--index"], ["--rag"]), (command, a.option_strings)
        if a.option_strings == ["--rag"]:
            rag_switch.add(command)
    assert rag_switch == {"chat", "generate", "eval", "serve"}
    with_index = {c for c, a in _all() if a.option_strings == ["--index"]}
    assert with_index == {f"rag {a}" for a in ("index", "query", "raft", "eval", "compare", "remove")}


def test_format_is_what_export_writes_and_data_format_what_a_command_reads():
    formats = [(c, a) for c, a in _all() if "--format" in a.option_strings]
    assert [(c, a.choices) for c, a in formats] == [("export", ["gguf", "hf"])]
    readers = {c for c, a in _all() if a.choices is not None and list(a.choices) == list(DATA_FORMATS)}
    assert readers == {"eval", "data prepare"}
    for command, a in _all():
        if a.choices is not None and list(a.choices) == list(DATA_FORMATS):
            assert a.option_strings == ["--data-format"] and a.default == "auto", command


def test_one_spelling_for_quantization_new_tokens_top_k_and_device():
    for command, a in _all():
        if "quant" in a.dest:
            assert a.option_strings == ["--quantize"], command
        if "token" in a.dest and "prompt" not in a.dest:  # serve's --max-prompt-tokens caps the prompt
            judge = a.dest.startswith("judge_")  # the judge model's own length, beside the model's
            want = "--judge-max-new-tokens" if judge else "--max-new-tokens"
            assert a.option_strings == [want] and a.type is positive_int, command
        if a.dest == "top_k":
            assert a.type is positive_int, command  # checked as it is read, on every command
        if a.dest == "device":
            assert a.default == "auto" and list(a.choices) == DEVICES, command


def test_top_k_is_refused_below_one_before_anything_loads(capsys):
    rc, _, err = run_cli(["generate", "m", "--prompt", "hi", "--rag", "kb", "--top-k", "0"], capsys)
    assert rc == 2 and "error: argument --top-k: must be at least 1, got 0" in err


RENAMED = [  # (argv with an old spelling, what the one error line says)
    (["export", "m", "--quant", "f16"], "--quant was renamed --quantize"),
    (["chat", "m", "--quant", "int8"], "--quant was renamed --quantize"),
    (["generate", "m", "--prompt", "hi", "--quant", "int8"], "--quant was renamed --quantize"),
    (["eval", "m", "--data", "d.jsonl", "--quant", "int8"], "--quant was renamed --quantize"),
    (["serve", "m", "--quant", "int8"], "--quant was renamed --quantize"),
    (["serve", "m", "--max-tokens", "64"], "--max-tokens was renamed --max-new-tokens"),
    (["eval", "m", "--data", "d.jsonl", "--format", "alpaca"], "--format was renamed --data-format"),
    (
        ["data", "prepare", "d.jsonl", "--out", "o", "--format", "alpaca"],
        "--format was renamed --data-format",
    ),
    (["merge", "runs/r", "merged"], "OUT_DIR was renamed --out: strop merge RUN_DIR --out DIR"),
    (
        ["rag", "index", "docs", "--out", "kb"],
        "--out was renamed --index: strop rag index DOCS... --index INDEX",
    ),
    (["rag", "query", "kb", "question"], "INDEX was renamed --index: strop rag query --index INDEX TEXT"),
    (["rag", "eval", "kb", "q.jsonl"], "INDEX was renamed --index: strop rag eval --index INDEX QUESTIONS"),
    (
        ["judge", "compare", "r", "--judge", "u", "--concurrency", "2"],
        "--concurrency was renamed --judge-concurrency",
    ),
    (
        ["judge", "check", "p.jsonl", "--judge", "u", "--template", "t"],
        "--template was renamed --judge-template",
    ),
    (
        ["judge", "check", "p.jsonl", "--judge", "u", "--concurrency", "2"],
        "--concurrency was renamed --judge-concurrency",
    ),
    (["judge", "compare", "r", "--judge", "u", "--template", "t"], "--template was renamed --judge-template"),
]


@pytest.mark.parametrize("argv, message", RENAMED, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_an_old_spelling_is_one_error_line_naming_the_new_one(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(argv, capsys)
    assert rc == 2 and out == ""
    assert err == f"error: {message}\n"
    assert list(tmp_path.iterdir()) == []  # refused before anything was read or written


def test_rag_remove_without_index_names_it(capsys):
    """`rag remove INDEX ID...` (its old form) reads every word as an id; the missing --index is named."""
    rc, _, err = run_cli(["rag", "remove", "kb", "doc-1"], capsys)
    assert rc == 2
    assert err.splitlines()[-1] == (
        "error: the following arguments are required: --index (see `strop rag remove --help`)"
    )


def test_every_old_spelling_has_a_case_and_is_hidden_from_help(capsys):
    have = {
        (tuple(argv[:2]) if argv[0] in ("data", "rag", "judge") else (argv[0],), old)
        for argv, m in RENAMED
        for old in [m.split()[0]]
    }
    for words, p in LEAVES:
        for a in p._actions:
            if isinstance(a, _Renamed):
                old = a.option_strings[0] if a.option_strings else a.metavar
                assert (words, old) in have, f"strop {' '.join(words)} {old}: add it to RENAMED"
                if not a.option_strings:
                    continue  # a positional that became an option: its metavar is the option's now
                rc, out, _ = run_cli([*words, "--help"], capsys)
                assert rc == 0 and not re.search(rf"(?<![\w-]){re.escape(old)}(?![\w-])", out), (words, old)


# ----------------------------------------------------------------------------- API and CLI defaults


def _cli_default(command: str, dest: str):
    (parser,) = [p for words, p in LEAVES if " ".join(words) == command]
    return parser.get_default(dest)


def _api_default(function, name: str):
    return inspect.signature(function).parameters[name].default


def test_the_python_api_has_the_cli_defaults():
    from strop import api

    for function in (api.load, api.evaluate, api.LanguageModel, api.Classifier, api.RewardModel):
        assert _api_default(function, "device") == _cli_default("generate", "device") == "auto", function
    for name in ("max_new_tokens", "temperature", "top_p", "batch_size"):
        assert _api_default(api.LanguageModel.generate, name) == _cli_default("generate", name), name
    assert _api_default(api.Classifier.predict, "batch_size") == _cli_default("predict", "batch_size")
    assert _api_default(api.Classifier.explain, "steps") == _cli_default("explain", "steps")
    assert _api_default(api.LanguageModel, "quantize") == _cli_default("generate", "quantize") is None
    for name in ("max_new_tokens", "temperature", "top_p"):  # chat samples; generate is greedy
        assert _api_default(api.LanguageModel.stream, name) == _cli_default("chat", name), name


def test_evaluate_has_strop_evals_defaults(tmp_path):
    from strop import api
    from strop.core.config import EvalConfig

    plan = api._eval_plan  # the options of strop.evaluate and LanguageModel.evaluate
    same = {"data_format": "data_format", "max_length": "max_length", "force": "force", "rag": "rag"}
    same |= {"top_k": "top_k", "rag_mode": "rag_mode", "rag_approximate": "rag_approximate"}
    for api_name, dest in same.items():
        assert _api_default(plan, api_name) == _cli_default("eval", dest), api_name
    fields = EvalConfig.model_fields
    for name in ("max_new_tokens", "temperature", "top_p", "batch_size"):
        assert fields[name].default == _cli_default("eval", name), name
    assert fields["stop"].default_factory() == _cli_default("eval", "stop") == []
    assert fields["metrics"].default_factory() == _cli_default("eval", "metric") == []
    assert _cli_default("eval", "limit") is None  # every example, in the API too (EvalConfig's is 64)
    rows = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(70)])
    assert len(plan("m", rows, tmp_path / "ev").file.examples) == 70


def test_the_readme_vocabulary_table_is_what_the_parsers_take():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### One vocabulary", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `-")]
    assert len(rows) >= 10
    for row in rows:
        option_cell, _, commands_cell = [c.strip() for c in row.strip("|").split(" | ")]
        option = re.match(r"`(--[\w-]+)", option_cell).group(1)
        listed = set(re.findall(r"`([a-z ]+)`", commands_cell))
        taken = {c for c, a in _all() if option in a.option_strings}
        assert listed == taken, option

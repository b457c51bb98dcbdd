"""No command replaces what is there without being asked, and none ever writes over its own input.

Every command that writes a file refuses an output that exists (a folder: that is not empty) with one
`error:` line naming the option and the path, leaving it byte-identical; `--force` replaces it; an
output that is the input is refused even with `--force`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from conftest import ALPACA_ROWS, assert_user_error, run_cli, write_jsonl
from test_cli import _commands, _subparsers

WRITERS = {  # every command that writes a file the user names (or a default one), and its option
    "generate": "--out",
    "predict": "--out",
    "score": "--out",
    "eval": "--out",
    "compare": "--out",
    "merge": "--out",
    "export": "--out",
    "data prepare": "--out",
    "rag raft": "--out",
    "rag compare": "--out",
}


def _parser(command: str):
    from strop.cli.main import build_parser

    p = build_parser()
    for word in command.split():
        p = _subparsers(p)[word]
    return p


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_every_writing_command_documents_force(command, capsys):
    assert command.split() in [list(c) for c in _commands()]
    with pytest.raises(SystemExit):
        _parser(command).parse_args(["--help"])
    assert "--force" in capsys.readouterr().out


def _existing(path: Path, folder: bool) -> bytes:
    """Plant an output that must survive a refusal; its bytes."""
    if folder:
        path.mkdir(parents=True)
        path = path / "notes.txt"
    path.write_text("precious\n")
    return path.read_bytes()


def _refusals(tmp: Path) -> list[tuple[str, list[str], Path, bool]]:
    """(case, argv, the existing output, whether it is a folder): each must be refused without --force."""
    rows = str(write_jsonl(tmp / "rows.jsonl", ALPACA_ROWS))
    run, missing = str(tmp), str(tmp / "missing")
    for name in ("r1", "r2"):
        (tmp / name).mkdir()
        (tmp / name / "config.yaml").write_text("name: x\n")
    return [
        (
            "generate",
            ["generate", missing, "--prompt", "hi", "--out", str(tmp / "g.jsonl")],
            tmp / "g.jsonl",
            False,
        ),
        ("predict", ["predict", run, "--file", rows, "--out", str(tmp / "p.jsonl")], tmp / "p.jsonl", False),
        ("score", ["score", run, "--file", rows, "--out", str(tmp / "s.jsonl")], tmp / "s.jsonl", False),
        ("eval", ["eval", missing, "--data", rows, "--out", str(tmp / "ev")], tmp / "ev", True),
        ("compare", ["compare", str(tmp / "r1"), str(tmp / "r2"), "--out", str(tmp / "c")], tmp / "c", True),
        ("merge", ["merge", missing, "--out", str(tmp / "m")], tmp / "m", True),
        ("export", ["export", missing, "--out", str(tmp / "x.gguf")], tmp / "x.gguf", False),
        ("export Modelfile", ["export", missing, "--out", str(tmp / "y.gguf")], tmp / "Modelfile", False),
        ("export README", ["export", missing, "--out", str(tmp / "z.gguf")], tmp / "z.README.md", False),
        ("export hf", ["export", missing, "--format", "hf", "--out", str(tmp / "hf")], tmp / "hf", True),
        ("data prepare", ["data", "prepare", rows, "--out", str(tmp / "d")], tmp / "d", True),
        (
            "rag raft",
            ["rag", "raft", rows, "--index", run, "--out", str(tmp / "raft.jsonl")],
            tmp / "raft.jsonl",
            False,
        ),
        (
            "rag compare",
            ["rag", "compare", rows, "--index", run, "--base", missing, "--out", str(tmp / "rc")],
            tmp / "rc",
            True,
        ),
    ]


CASES = [c[0] for c in _refusals(Path(tempfile.mkdtemp()))]  # names only; each test plants its own


@pytest.mark.parametrize("case", CASES)
def test_an_existing_output_is_refused_and_left_as_it_was(case, tmp_path, capsys):
    _, argv, output, folder = next(c for c in _refusals(tmp_path) if c[0] == case)
    before = _existing(output, folder)
    rc, _, err = run_cli(argv, capsys)
    option = WRITERS[" ".join(argv[:2]) if argv[0] in ("data", "rag") else argv[0]]
    assert_user_error(rc, err, f"{option}: ", str(output), "--force")
    assert (output / "notes.txt" if folder else output).read_bytes() == before


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "MODEL", "--file", "IN", "--out", "IN"],
        ["predict", "MODEL", "--file", "IN", "--out", "IN"],
        ["score", "MODEL", "--file", "IN", "--out", "IN"],
        ["rag", "raft", "IN", "--index", "MODEL", "--out", "IN"],
        ["export", "IN", "--out", "IN"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_the_input_is_never_the_output_even_with_force(argv, tmp_path, capsys):
    rows = write_jsonl(
        tmp_path / "in.gguf" if argv[0] == "export" else tmp_path / "in.jsonl", ALPACA_ROWS[:2]
    )
    link = tmp_path / f"link{rows.suffix}"
    link.symlink_to(rows)  # the same file by another name is the same file
    before = rows.read_bytes()
    for out in (rows, link):
        full = [str(rows) if a == "IN" else str(tmp_path) if a == "MODEL" else a for a in argv]
        full[full.index("--out") + 1] = str(out)
        rc, _, err = run_cli([*full, "--force"], capsys)
        assert_user_error(rc, err, "--out: ", "is the input file; choose another path")
    assert rows.read_bytes() == before


def test_eval_and_data_prepare_refuse_a_folder_holding_their_input(tmp_path, capsys):
    out = tmp_path / "work"
    out.mkdir()
    rows = write_jsonl(out / "rows.jsonl", ALPACA_ROWS)
    for argv in (["eval", str(tmp_path / "missing"), "--data", str(rows)], ["data", "prepare", str(rows)]):
        rc, _, err = run_cli([*argv, "--out", str(out), "--force"], capsys)
        assert_user_error(rc, err, f"--out: {out} holds the input {rows}; choose another folder")
    assert json.loads(rows.read_text().splitlines()[0]) == ALPACA_ROWS[0]


def test_force_replaces_generate_and_eval_outputs(tiny_llama, tmp_path, capsys):
    out = tmp_path / "g.jsonl"
    before = _existing(out, folder=False)
    argv = ["generate", str(tiny_llama), "--prompt", "hi", "--max-new-tokens", "2", "--out", str(out)]
    rc, _, err = run_cli([*argv, "--force"], capsys)
    assert rc == 0, err
    assert out.read_bytes() != before and json.loads(out.read_text())["prompt"] == "hi"
    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS[:2])
    ev = tmp_path / "ev"
    _existing(ev, folder=True)
    (ev / "sources.jsonl").write_text('{"stale": "passages of an earlier --rag eval"}\n')
    argv = [
        "eval",
        str(tiny_llama),
        "--data",
        str(data),
        "--max-new-tokens",
        "2",
        "--out",
        str(ev),
        "--force",
    ]
    rc, _, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert (ev / "summary.json").is_file() and (ev / "notes.txt").is_file()  # written into, not emptied
    assert not (ev / "sources.jsonl").exists()  # this eval had no --rag: no stale passages stay


def test_export_force_replaces_the_gguf_and_its_companions(tiny_llama, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    planted = {p: _existing(p, False) for p in (out, tmp_path / "Modelfile", tmp_path / "x.README.md")}
    argv = ["export", str(tiny_llama), "--quantize", "f16", "--out", str(out)]
    rc, _, err = run_cli(argv, capsys)
    assert_user_error(rc, err, f"--out: {out} exists; pass --force to replace it")
    assert {p: p.read_bytes() for p in planted} == planted
    rc, _, err = run_cli([*argv, "--force"], capsys)
    assert rc == 0, err
    assert all(p.read_bytes() != planted[p] for p in planted)
    assert out.read_bytes()[:4] == b"GGUF" and "FROM ./x.gguf" in (tmp_path / "Modelfile").read_text()


def test_data_prepare_force_and_its_old_name_overwrite_replace(tmp_path, capsys):
    rows = str(write_jsonl(tmp_path / "rows.jsonl", ALPACA_ROWS))
    out = tmp_path / "d"
    _existing(out, folder=True)
    for flag in ("--force", "--overwrite"):  # the second replaces the first's files
        rc, _, err = run_cli(["data", "prepare", rows, "--out", str(out), flag], capsys)
        assert rc == 0, err
        names = sorted(p.name for p in out.iterdir())
        assert names == ["manifest.json", "test.jsonl", "train.jsonl", "validation.jsonl"]

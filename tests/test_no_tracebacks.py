"""Every command answers bad input with one `error:` line and status 2, never a traceback. The table
must name every command, so a new command is held to the rule from its first day."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import ALPACA_ROWS, assert_user_error, run_cli, tiny_config, write_jsonl
from test_cli import _commands


def _index(folder: Path, damaged: bool) -> str:
    """A one-chunk strop index written by hand (no encoder needed); `damaged`: its embeddings cut short."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    doc = {"digest": "0", "source": "a.txt", "chunks": 1}
    meta = {"format": 1, "model": "x", "chunk_size": 8, "chunk_overlap": 0, "documents": {"a": doc}}
    (folder / "index.json").write_text(json.dumps(meta))
    chunk = {"doc_id": "a", "number": 0, "start": 0, "end": 1, "text": "a", "tokens": 1}
    (folder / "chunks.jsonl").write_text(json.dumps(chunk) + "\n")
    save_file({"embeddings": torch.ones(1, 4)}, folder / "embeddings.safetensors")
    if damaged:
        data = (folder / "embeddings.safetensors").read_bytes()
        (folder / "embeddings.safetensors").write_bytes(data[: len(data) // 2])
    return str(folder)


def _truncated_model(model: Path | None, tmp: Path) -> str:
    """A copy of `model` whose weights file is cut short, as a copy or download that stopped leaves it."""
    out = tmp / "truncated-model"
    if model is not None and not out.exists():
        shutil.copytree(model, out)
        weights = out / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return str(out)


def _bad_inputs(tmp: Path, model: Path | None = None) -> list[tuple[str, list[str]]]:
    """(a name for the case, argv) with every path under `tmp`; `model` for the config of train cases."""
    data = write_jsonl(tmp / "train.jsonl", ALPACA_ROWS)
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(tiny_config(model or tmp, data, tmp / "out")))
    tiny = str(tmp / "tiny.yaml")
    (tmp / "not-a-run").mkdir(exist_ok=True)
    (tmp / "folder.yaml").mkdir(exist_ok=True)
    (tmp / "bad.yaml").write_text("model: [unclosed\n")
    (tmp / "list.yaml").write_text("- a\n- b\n")
    write_jsonl(tmp / "pairs.jsonl", [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}])
    (tmp / "file").write_text("x")
    (tmp / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    (tmp / "deep.yaml").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    tiny_model = str(model or tmp)
    (tmp / "rows.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (tmp / "loop.jsonl").unlink(missing_ok=True)
    (tmp / "loop.jsonl").symlink_to(tmp / "loop.jsonl")
    missing, run, file = str(tmp / "missing"), str(tmp / "not-a-run"), str(tmp / "file")
    damaged, index = _index(tmp / "damaged-index", damaged=True), _index(tmp / "index", damaged=False)
    (tmp / "empty.jsonl").write_text("")
    (tmp / "Modelfile").write_text("FROM ./other.gguf\n")  # another export's, kept
    return [
        ("rag query damaged index", ["rag", "query", "--index", damaged, "what?"]),
        ("rag eval damaged index", ["rag", "eval", "--index", damaged, str(tmp / "rows.jsonl")]),
        (
            "rag index update of a damaged index",
            ["rag", "index", str(tmp / "rows.jsonl"), "--index", damaged],
        ),
        ("rag eval no questions", ["rag", "eval", "--index", index, str(tmp / "empty.jsonl")]),
        (
            "export truncated weights",
            ["export", _truncated_model(model, tmp), "--out", str(tmp / "t" / "t.gguf")],
        ),
        ("generate --out exists", ["generate", tiny_model, "--prompt", "hi", "--out", file]),
        (
            "rag raft --out is its input",
            [
                "rag",
                "raft",
                str(tmp / "rows.jsonl"),
                "--index",
                index,
                "--out",
                str(tmp / "rows.jsonl"),
                "--force",
            ],
        ),
        ("export over a Modelfile", ["export", tiny_model, "--out", str(tmp / "m.gguf")]),
        ("train not UTF-8", ["train", str(tmp / "latin1.yaml")]),
        ("train nested too deep", ["train", str(tmp / "deep.yaml")]),
        ("train resume and config", ["train", tiny, "--resume", run]),
        ("train output_dir too long", ["train", tiny, "--set", f"output_dir={tmp / ('e' * 300)}"]),
        ("train nnodes without endpoint", ["train", tiny, "--nnodes", "2"]),
        (
            "train node-rank out of range",
            ["train", tiny, "--nnodes", "2", "--node-rank", "5", "--rdzv-endpoint", "127.0.0.1:1"],
        ),
        (
            "generate --out under a file",
            ["generate", tiny_model, "--prompt", "hi", "--out", file + "/x.jsonl"],
        ),
        ("generate --out in /proc", ["generate", tiny_model, "--prompt", "hi", "--out", "/proc/x.jsonl"]),
        ("eval --out under a file", ["eval", tiny_model, "--data", str(data), "--out", file + "/x"]),
        ("merge into a file", ["merge", run, "--out", file]),
        ("compare --out under a file", ["compare", run, "--out", file + "/x"]),
        ("data prepare --out under a file", ["data", "prepare", str(data), "--out", file + "/x"]),
        ("data check a device", ["data", "check", "/dev/zero"]),
        ("generate symlink loop model", ["generate", str(tmp / "loop.jsonl"), "--prompt", "hi"]),
        ("quickstart bad override", ["quickstart", "--set", "optim.lr=fast"]),
        ("quickstart unknown key", ["quickstart", "--set", "nope=1"]),
        ("train missing config", ["train", missing + ".yaml"]),
        ("train folder as config", ["train", str(tmp / "folder.yaml")]),
        ("train malformed yaml", ["train", str(tmp / "bad.yaml")]),
        ("train yaml list", ["train", str(tmp / "list.yaml")]),
        ("train resume not a run", ["train", "--resume", run]),
        ("train bad --set", ["train", tiny, "--set", "novalue"]),
        ("train escaping name", ["train", tiny, "--set", "name=../x"]),
        ("train output_dir is a file", ["train", tiny, "--set", f"output_dir={file}"]),
        ("train data symlink loop", ["train", tiny, "--set", f"data.train=[{tmp / 'loop.jsonl'}]"]),
        ("chat missing model", ["chat", missing]),
        ("generate missing model", ["generate", missing, "--prompt", "hi"]),
        ("predict not a run", ["predict", run, "--file", file]),
        ("score not a run", ["score", run, "--file", file]),
        ("explain not a run", ["explain", run, "--text", "hi"]),
        ("merge not a run", ["merge", run, "--out", str(tmp / "merged")]),
        ("eval missing model", ["eval", missing, "--data", file]),
        ("report not a run", ["report", missing]),
        ("compare not runs", ["compare", missing, run]),
        ("judge compare not an evaluated run", ["judge", "compare", run, "--judge", "http://127.0.0.1:9/v1"]),
        ("judge check not pairs", ["judge", "check", str(data), "--judge", "http://127.0.0.1:9/v1"]),
        (
            "judge check unreachable judge",
            ["judge", "check", str(tmp / "pairs.jsonl"), "--judge", "http://127.0.0.1:9/v1"],
        ),
        ("data check missing file", ["data", "check", missing + ".jsonl"]),
        (
            "data check malformed rows",
            ["data", "check", str(tmp / "rows.jsonl"), "--strict", "--no-estimate"],
        ),
        ("data prepare out is a file", ["data", "prepare", str(tmp / "rows.jsonl"), "--out", file]),
        ("models pull unknown", ["models", "pull", "no-such-model"]),
        ("configs unknown", ["configs", "no-such-config"]),
        ("export missing model", ["export", missing, "--out", str(tmp / "x.gguf")]),
        ("serve missing model", ["serve", missing, "--port", "0"]),
        ("serve adapter without a name", ["serve", tiny_model, "--adapter", "novalue", "--port", "0"]),
        ("serve adapter not a run", ["serve", tiny_model, "--adapter", f"x={run}", "--port", "0"]),
        ("rag index missing documents", ["rag", "index", missing, "--index", str(tmp / "idx")]),
        ("rag index malformed rows", ["rag", "index", str(tmp / "rows.jsonl"), "--index", str(tmp / "idx")]),
        ("rag index --index is a file", ["rag", "index", str(tmp / "rows.jsonl"), "--index", file]),
        (
            "rag index --index holds other files",
            ["rag", "index", str(tmp / "rows.jsonl"), "--index", str(tmp)],
        ),
        (
            "rag index --rebuild over other files",
            ["rag", "index", str(tmp / "rows.jsonl"), "--index", str(tmp), "--rebuild"],
        ),
        ("rag query not an index", ["rag", "query", "--index", str(tmp / "not-a-run"), "what?"]),
        ("rag remove not an index", ["rag", "remove", "--index", str(tmp / "not-a-run"), "doc"]),
        (
            "rag raft not an index",
            ["rag", "raft", str(tmp / "rows.jsonl"), "--index", run, "--out", str(tmp / "raft.jsonl")],
        ),
        ("rag eval not an index", ["rag", "eval", "--index", run, str(tmp / "rows.jsonl")]),
        ("rag eval bad cut-offs", ["rag", "eval", "--index", run, str(tmp / "rows.jsonl"), "--k", "3,x"]),
        (
            "rag compare not an index",
            [
                "rag",
                "compare",
                str(tmp / "rows.jsonl"),
                "--index",
                run,
                "--base",
                tiny_model,
                "--out",
                str(tmp / "c"),
            ],
        ),
        ("generate --rag not an index", ["generate", tiny_model, "--prompt", "hi", "--rag", run]),
        ("ui missing runs folder", ["ui", "--runs", missing]),
        ("ui runs folder is a file", ["ui", "--runs", file]),
        ("ui bad port", ["ui", "--runs", run, "--port", "70000"]),
        ("ui remote host without --allow-remote", ["ui", "--runs", run, "--host", "0.0.0.0"]),
        ("tune missing config", ["tune", missing + ".yaml"]),
        ("tune no search space", ["tune", tiny]),
        ("tune unknown space key", ["tune", tiny, "--space", "optim.nope=[1,2]"]),
        ("tune empty range", ["tune", tiny, "--space", "optim.lr={low: 1e-2, high: 1e-4}"]),
        (
            "tune float bound, integer field",
            ["tune", tiny, "--space", "train.max_steps={low: 1, high: 1e12}"],
        ),
        (
            "tune bound past the ceiling",
            ["tune", tiny, "--space", "train.max_steps={low: 1, high: 100000000000}"],
        ),
        (
            "tune range for a bool",
            ["tune", tiny, "--space", "train.gradient_checkpointing={low: 0, high: 1}"],
        ),
        (
            "tune grid too large",
            ["tune", tiny, "--space", "train.max_steps={low: 1, high: 5000}", "--sampler", "grid"],
        ),
        (
            "tune storage under a file",
            ["tune", tiny, "--space", "optim.lr=[0.1]", "--storage", f"sqlite:///{file}/x.db"],
        ),
    ]


CASES = _bad_inputs(Path(tempfile.mkdtemp()))  # names only; each test builds its own under tmp_path


def test_every_command_has_a_bad_input_case():
    commands = {" ".join(c) for c in _commands()}
    leaves = {c for c in commands if not any(o.startswith(c + " ") for o in commands)}
    have = {
        " ".join(argv[:2]) if argv[0] in ("data", "models", "rag", "judge") else argv[0] for _, argv in CASES
    }
    assert leaves - {"models list"} <= have, sorted(leaves - have)  # `models list` takes no input


@pytest.mark.parametrize("case", [name for name, _ in CASES])
def test_bad_input_is_one_error_line(case, tiny_llama, tmp_path, capsys):
    argv = dict(_bad_inputs(tmp_path, tiny_llama))[case]
    rc, out, err = run_cli(argv, capsys)
    if case == "data check malformed rows":
        assert rc in (1, 2) and "Traceback" not in err, err  # --strict: findings exit 1
        return
    assert_user_error(rc, err)
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(errors) == 1, err  # one error, and it comes last (config errors list keys below it)
    assert all(line.startswith("  ") for line in lines[errors[0] + 1 :]), err

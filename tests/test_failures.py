"""Failures a user can cause end in one `error:` line with status 2, leave nothing half-made, and keep
every write of a run inside its run folder: run names that try to escape, an output folder that is a
file, read-only or full, pickle weights, custom model code, symbolic-link loops."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

import strop
from conftest import (
    ALPACA_ROWS,
    assert_user_error,
    build_model,
    build_tokenizer,
    run_cli,
    tiny_config,
    write_jsonl,
)
from strop.core.metrics import read_metrics
from strop.training.checkpoint import list_checkpoints
from test_stages import two_stage  # noqa: F401 - a fixture


@pytest.fixture
def project(tiny_llama, tmp_path):
    """A config file whose runs go to tmp_path/out, and a function that writes variants of it."""
    data = write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS)
    cfg = tiny_config(tiny_llama, data, tmp_path / "out")
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")

    def write(**changes) -> Path:
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump({**cfg, **changes}))
        return path

    return write


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", ["../../escaped", "/abs/path", "", "..", "a/b", "."])
def test_a_run_name_cannot_write_outside_output_dir(name, project, tmp_path, capsys):
    config = project()
    before = files_under(tmp_path)
    rc, _, err = run_cli(["train", str(config), "--set", f"name={json.dumps(name)}"], capsys)
    assert_user_error(rc, err, "name:", "one folder name")
    assert files_under(tmp_path) == before and not (tmp_path / "out").exists()


def test_every_file_a_run_writes_is_inside_its_run_folder(project, tmp_path, capsys):
    config = project()
    before = files_under(tmp_path)
    rc, _, err = run_cli(["-q", "train", str(config), "--no-progress"], capsys)
    assert rc == 0, err
    new = files_under(tmp_path) - before
    run = tmp_path / "out" / "run"
    outside = [p for p in new if run not in p.parents and (tmp_path / "cache") not in p.parents]
    assert not outside and (run / "model" / "strop_model.json") in new


def test_output_dir_that_is_a_file(project, tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    rc, _, err = run_cli(["train", str(project())], capsys)
    assert_user_error(rc, err, "output_dir:", "is a file")


def _read_only(folder: Path):
    """Make `folder` read-only even for root: a read-only bind mount, else the immutable attribute."""
    if (
        subprocess.run(["mount", "-o", "bind,ro", str(folder), str(folder)], capture_output=True).returncode
        == 0
    ):
        return lambda: subprocess.run(["umount", str(folder)], check=True)
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    pytest.skip("cannot make a folder read-only here (no mount, chattr or non-root user)")


def test_a_read_only_output_folder_is_refused_before_any_work(project, tmp_path, capsys, monkeypatch):
    from strop.recipes import sft

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(sft, "build_datasets", lambda *a, **k: pytest.fail("tokenized before the check"))
    undo = _read_only(out)
    try:
        rc, _, err = run_cli(["train", str(project())], capsys)
    finally:
        undo()
    assert_user_error(rc, err, "output_dir: cannot write in", str(out))
    assert not any(out.iterdir())


def test_no_room_for_a_checkpoint_is_refused_before_the_run_folder(project, tmp_path, capsys, monkeypatch):
    from strop.recipes import run_folder

    real = shutil.disk_usage
    free = {"bytes": 10**12}
    monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda p: real(p)._replace(free=free["bytes"]))
    free["bytes"] = 1000
    rc, _, err = run_cli(["train", str(project(method={"name": "full"}))], capsys)
    assert_user_error(rc, err, "output_dir:", "free", "--set output_dir=")
    assert not (tmp_path / "out" / "run").exists()


def _no_space_on(monkeypatch, target, attr: str, after: int, rust: bool = False) -> None:
    """`target.attr` fails with ENOSPC from its call number `after` + 1 on; `rust`: as safetensors
    reports it (a SafetensorError quoting the errno, not an OSError)."""
    from safetensors import SafetensorError

    real, calls = getattr(target, attr), []

    def fail(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            if rust:
                raise SafetensorError(
                    "Error while serializing: I/O error: No space left on device (os error 28)"
                )
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[-1]) if args else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, attr, fail)


def test_a_full_disk_while_saving_a_checkpoint(project, tmp_path, capsys, monkeypatch):
    from strop.training import checkpoint

    config = project(train={"batch_size": 4, "max_steps": 4, "seed": 0, "save_every": 1})
    with monkeypatch.context() as m:
        _no_space_on(m, checkpoint, "save_file", after=6, rust=True)  # 3 files a checkpoint: step 3 fails
        rc, _, err = run_cli(["-q", "train", str(config), "--no-progress"], capsys)
    run = tmp_path / "out" / "run"
    assert_user_error(rc, err, "No space left on device", "step 2 is intact", f"--resume {run}")
    assert err.count("error:") == 1
    assert [p.name for p in list_checkpoints(run)] == ["step-000001", "step-000002"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no partial one
    rc, out, err = run_cli(["-q", "train", "--resume", str(run), "--no-progress"], capsys)
    assert rc == 0, err
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]


def test_a_full_disk_while_exporting_then_resume_reports_the_loss(project, tmp_path, capsys, monkeypatch):
    from strop.export import save

    config = project()
    with monkeypatch.context() as m:
        _no_space_on(m, save, "atomic_dir", after=0)
        rc, _, err = run_cli(["-q", "train", str(config), "--no-progress"], capsys)
    run = tmp_path / "out" / "run"
    assert_user_error(rc, err, "No space left on device", "step 4 is intact")
    assert not (run / "model").exists()
    rc, out, err = run_cli(["-q", "train", "--resume", str(run), "--no-progress"], capsys)
    assert rc == 0, err
    result = json.loads((run / "result.json").read_text())
    loss = result["metrics"]["loss"]
    assert loss == pytest.approx([r["loss"] for r in read_metrics(run) if "loss" in r][-1])
    assert f"loss {loss:.4f}" in out and "nan" not in out
    assert (run / "model" / "adapter_model.safetensors").is_file()


def test_a_failure_after_the_data_leaves_no_half_made_run_folder(project, tmp_path, capsys, monkeypatch):

    def boom(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "somewhere")

    monkeypatch.setattr("strop.recipes.skeleton.fit", boom)
    rc, _, err = run_cli(["train", str(project())], capsys)
    assert_user_error(rc, err, "No space left on device", "Nothing was trained yet")
    assert not (tmp_path / "out" / "run").exists()


def _model_folder(root: Path, pickle_only: bool = False, auto_map: bool = False) -> Path:
    tok = build_tokenizer()
    model = build_model("llama", len(tok))
    model.save_pretrained(root)
    tok.save_pretrained(root)
    if pickle_only:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(state, root / "pytorch_model.bin")
        (root / "model.safetensors").unlink()
    if auto_map:
        config = json.loads((root / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
        (root / "config.json").write_text(json.dumps(config))
        (root / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    return root


def test_pickle_weights_are_refused_with_the_reason(project, tmp_path, capsys):
    folder = _model_folder(tmp_path / "pickled", pickle_only=True)
    rc, _, err = run_cli(["train", str(project(model={"name": str(folder)}))], capsys)
    assert_user_error(rc, err, "model.name:", "pytorch_model.bin", "pickle", "safetensors")
    assert not (tmp_path / "out" / "run").exists()


def test_custom_model_code_needs_trust_remote_code(project, tmp_path, capsys):
    folder = _model_folder(tmp_path / "custom", auto_map=True)
    rc, _, err = run_cli(["train", str(project(model={"name": str(folder)}))], capsys)
    assert_user_error(rc, err, "model.name:", "auto_map", "model.trust_remote_code: true")
    assert not (tmp_path / "out").exists()


def test_trust_remote_code_is_logged_naming_the_folder(tiny_llama, caplog):
    from strop.models.load import load_tokenizer

    load_tokenizer(str(tiny_llama), trust_remote_code=True)
    assert "trust_remote_code" in caplog.text and str(tiny_llama) in caplog.text


def test_a_run_whose_adapter_is_pickle_is_refused(project, tmp_path, capsys):
    result = strop.train(str(project()), show_progress=False)
    adapter = result.model_dir / "adapter_model.safetensors"
    adapter.rename(adapter.with_suffix(".bin"))
    rc, _, err = run_cli(["generate", str(result.run_dir), "--prompt", "hi"], capsys)
    assert_user_error(rc, err, "adapter_model.safetensors", "adapter_model.bin", "pickle")


def test_a_symlink_loop_and_a_folder_are_named_as_such(project, tmp_path, capsys):
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    rc, _, err = run_cli(["train", str(project()), "--set", f"data.train=[{loop}]"], capsys)
    assert_user_error(rc, err, str(loop), "symbolic link loop")
    (tmp_path / "folder.yaml").mkdir()
    rc, _, err = run_cli(["train", str(tmp_path / "folder.yaml")], capsys)
    assert_user_error(rc, err, "folder.yaml", "a folder, not a file")


def test_other_commands_name_a_read_only_folder_too(tmp_path, capsys):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"row {i} " * 5} for i in range(20)])
    locked = tmp_path / "locked"
    locked.mkdir()
    undo = _read_only(locked)
    try:
        rc, _, err = run_cli(["data", "prepare", str(rows), "--out", str(locked / "prepared")], capsys)
    finally:
        undo()
    assert_user_error(rc, err, str(locked))


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(project, tmp_path, caplog):
    config = project(train={"batch_size": 4, "max_steps": 3, "seed": 0, "save_every": 1, "keep_last": 3})
    strop.train(str(config), show_progress=False)
    strop.train(str(config), ["train.max_steps=6", "name=whole"], show_progress=False)
    run = tmp_path / "out" / "run"
    (run / "checkpoints" / "step-000003" / "optimizer.json").write_text("{}")
    more = strop.train(str(config), ["train.max_steps=6"], show_progress=False)
    assert "step-000003 is damaged" in caplog.text
    assert more.metrics["steps"] == 6
    for name in ("run", "whole"):  # the run went on from step 2, as if step 3 had never been saved
        assert [r["step"] for r in read_metrics(tmp_path / "out" / name) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    want = [r["loss"] for r in read_metrics(tmp_path / "out" / "whole") if "loss" in r]
    assert [r["loss"] for r in read_metrics(run) if "loss" in r] == pytest.approx(want, abs=1e-6)


def test_every_checkpoint_damaged_is_one_error(project, tmp_path, capsys):
    config = project(train={"batch_size": 4, "max_steps": 2, "seed": 0, "save_every": 1})
    strop.train(str(config), show_progress=False)
    run = tmp_path / "out" / "run"
    for ckpt in list_checkpoints(run):
        (ckpt / "trainable.safetensors").write_bytes(b"\x00" * 100)
        (ckpt / "state.json").write_text('{"step": ')
    rc, _, err = run_cli(["train", str(config), "--set", "train.max_steps=4"], capsys)
    assert_user_error(rc, err, "no checkpoint loads", "--set name=")


def test_merge_never_replaces_another_runs_model(project, tmp_path, capsys):
    first = strop.train(str(project()), show_progress=False)
    other = strop.train(str(project()), ["name=other"], show_progress=False)
    adapter = (other.model_dir / "adapter_model.safetensors").read_bytes()
    rc, _, err = run_cli(["merge", str(first.run_dir), "--out", str(other.model_dir)], capsys)
    assert_user_error(rc, err, "the model of a strop run", "choose a new folder")
    assert (other.model_dir / "adapter_model.safetensors").read_bytes() == adapter
    out = tmp_path / "merged"
    rc, _, err = run_cli(["merge", str(first.run_dir), "--out", str(out)], capsys)
    assert rc == 0, err
    rc, _, err = run_cli(["merge", str(first.run_dir), "--out", str(out)], capsys)
    assert_user_error(rc, err, "exists and is not empty; pass --force")  # an earlier merge: only if asked
    rc, _, err = run_cli(["merge", str(first.run_dir), "--out", str(out), "--force"], capsys)
    assert rc == 0, err


def _stopped_when_called(monkeypatch, module, name: str, signum: int, cfg: dict):
    """Train `cfg` with `signum` sent to this process as `module.name` is first called; the Interrupted."""
    from strop.core.errors import Interrupted

    real = getattr(module, name)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(module, name, signalled)
        with pytest.raises(Interrupted) as e:
            strop.train(cfg, show_progress=False)
    return e.value


def test_dpo_stopped_after_its_reference_pass_keeps_it_and_resumes(tiny_llama, tmp_path, monkeypatch, capsys):
    from strop.recipes import skeleton
    from test_signals import dpo

    stopped = _stopped_when_called(monkeypatch, skeleton, "fit", signal.SIGTERM, dpo(tiny_llama, tmp_path))
    run = tmp_path / "runs" / "run"
    assert "reference_logps.safetensors" in stopped.message and f"--resume {run}" in stopped.message
    assert (run / "reference_logps.safetensors").is_file() and not list_checkpoints(run)
    rc, _, err = run_cli(["-q", "train", "--resume", str(run), "--no-progress"], capsys)
    assert rc == 0, err
    assert "reusing reference_logps.safetensors" in err


def test_a_stage_stopped_after_export_continues_to_the_next_stage(two_stage, tmp_path, monkeypatch, capsys):  # noqa: F811
    from strop.recipes import skeleton

    # stage one is trained and exported, its result not yet written
    stopped = _stopped_when_called(monkeypatch, skeleton, "save_result", signal.SIGINT, two_stage)
    top = Path(two_stage["output_dir"]) / two_stage["name"]
    assert f"--resume {top}" in stopped.message
    rc, _, err = run_cli(["-q", "train", "--resume", str(top), "--no-progress"], capsys)
    assert rc == 0, err
    assert all((top / s["name"] / "result.json").is_file() for s in two_stage["stages"])


def test_resume_of_a_folder_renamed_to_a_bad_name(project, tmp_path, capsys):
    result = strop.train(
        str(project(train={"batch_size": 4, "max_steps": 2, "seed": 0})), show_progress=False
    )
    renamed = result.run_dir.with_name("my run")
    result.run_dir.rename(renamed)
    rc, _, err = run_cli(["train", "--resume", str(renamed)], capsys)
    assert_user_error(rc, err, "'my run' is not a run name", "rename the folder")


def test_a_numeric_name_is_a_folder_name(project, tmp_path):
    from strop.core.config import load_config

    assert load_config(str(project()), ["name=2024"]).name == "2024"


def test_a_config_with_a_key_given_twice_is_refused(tmp_path, capsys):
    config = tmp_path / "twice.yaml"
    config.write_text("optim:\n  lr: 1.0e-4\n  lr: 1.0e-3\n")
    rc, _, err = run_cli(["train", str(config)], capsys)
    assert_user_error(rc, err, "twice.yaml:3:3", "the key 'lr' is given twice")


def _rewrite_folder(args: tuple[str, int]) -> None:
    from strop.core.io import atomic_dir

    final, i = args
    for _ in range(100):
        atomic_dir(Path(final), lambda t: (t / "who.txt").write_text(str(i)))


def test_atomic_dir_survives_processes_writing_the_same_folder_at_once(tmp_path):
    # tune workers tokenize into one shared cache: the other's folder can land between our two renames
    import multiprocessing

    final = tmp_path / "shared"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        pool.map(_rewrite_folder, [(str(final), i) for i in range(3)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]  # no temporary or old folder left
    assert (final / "who.txt").read_text() in {"0", "1", "2"}

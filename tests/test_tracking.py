"""train.report_to: MLflow and W&B receive the config, every step's numbers, the evaluation and the
report, read back with each library's own reader (MLflow's client on its file store in the run folder;
W&B's offline run file, whose records are W&B's own protobuf messages); a resumed run goes on in the
same tracking runs; a tracker that is not installed is refused by name before training."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from conftest import ALPACA_ROWS, tiny_config, write_jsonl
from strop.core.errors import ConfigError
from strop.recipes.run import train

pytest.importorskip(
    "mlflow", reason="pip install mlflow-skinny wandb (the tracking extra)"
)  # CI installs both


def wandb_records(run_dir: Path) -> list:
    """Every record of the run's offline W&B file(s): W&B's LevelDB-style log of 32 KiB blocks, each
    record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""  # a 7-byte ":W&B" header first
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if length == 0 and kind == 0:  # the rest of the block is padding
                pos += left
                continue
            chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):  # a whole record, or the last piece of one
                record = pb.Record()
                record.ParseFromString(pending)
                out.append(record)
    return out


def history(records: list) -> list[dict]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows


def test_mlflow_and_wandb_get_params_steps_evaluation_and_report_and_a_resume_goes_on(
    tiny_llama, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    train_file = write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS[:16])
    test_file = write_jsonl(tmp_path / "test.jsonl", ALPACA_ROWS[16:])
    cfg = tiny_config(
        tiny_llama,
        train_file,
        tmp_path / "out",
        train={"max_steps": 2, "report_to": ["mlflow", "wandb"]},
        eval={"enabled": True, "max_new_tokens": 4, "forgetting": False, "bootstrap": 200},
    )
    cfg["data"]["test"] = [str(test_file)]
    first = train(cfg, show_progress=False)
    ids = json.loads((first.run_dir / "tracking.json").read_text())
    cfg["train"]["max_steps"] = 4  # asked for more steps: the run resumes from its last checkpoint
    again = train(cfg, show_progress=False)
    assert json.loads((again.run_dir / "tracking.json").read_text()) == ids  # the same tracking runs

    client = MlflowClient(tracking_uri=(again.run_dir / "mlruns").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("run").experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]]  # one MLflow run, resumed
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert (
        run.data.params["optim.lr"] == "0.01" and run.data.params["train.report_to"] == '["mlflow", "wandb"]'
    )
    steps = [m.step for m in client.get_metric_history(ids["mlflow"], "loss")]
    assert sorted(set(steps)) == [1, 2, 3, 4]
    eval_keys = {k for k in run.data.metrics if k.startswith("eval.")}
    assert "eval.likelihood.tuned.loss" in eval_keys and "eval.metrics.rouge_l.tuned" in eval_keys
    artifacts = {a.path for a in client.list_artifacts(ids["mlflow"])}
    assert {"report.md", "report.html", "result.json", "config.yaml", "eval"} <= artifacts
    assert [a.path for a in client.list_artifacts(ids["mlflow"], "eval")] == ["eval/summary.json"]

    records = wandb_records(again.run_dir)
    runs_seen = {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"}
    assert runs_seen == {ids["wandb"]}  # both processes wrote to the same W&B run
    logged = history(records)
    losses = {row["_step"]: row["loss"] for row in logged if "loss" in row}
    assert set(losses) == {1, 2, 3, 4}
    steps_file = [json.loads(x) for x in (again.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses == {r["step"]: pytest.approx(r["loss"]) for r in steps_file if "loss" in r}
    summaries = {
        i.key or "/".join(i.nested_key)
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for i in r.summary.update
    }
    assert "eval.metrics.rouge_l.tuned" in summaries
    saved = {f.path for r in records if r.WhichOneof("record_type") == "files" for f in r.files.files}
    assert {"report.md", "result.json", "eval/summary.json"} <= saved


def test_a_tracker_that_is_not_installed_is_refused_by_name_before_training(
    tiny_llama, tmp_path, monkeypatch
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    cfg = tiny_config(
        tiny_llama,
        write_jsonl(tmp_path / "t.jsonl", ALPACA_ROWS),
        tmp_path / "out",
        train={"report_to": ["wandb"]},
    )
    with pytest.raises(ConfigError, match=r"train.report_to: wandb needs the wandb package"):
        train(cfg, show_progress=False)
    assert not (tmp_path / "out" / "run").exists()


def test_no_report_to_tracks_nothing_but_metrics_jsonl(tiny_llama, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec  # as on a machine without TensorBoard
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    run = train(
        tiny_config(tiny_llama, write_jsonl(tmp_path / "t.jsonl", ALPACA_ROWS), tmp_path / "out"),
        show_progress=False,
    )
    assert not any((run.run_dir / d).exists() for d in ("mlruns", "wandb", "tensorboard", "tracking.json"))
    assert (run.run_dir / "metrics.jsonl").is_file()

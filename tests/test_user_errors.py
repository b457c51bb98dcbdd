"""Mistakes users make, and runs that end badly: each gets a clear StropError, and nothing is lost."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import tiny_config, write_jsonl
from strop.core.config import load_config
from strop.core.errors import ConfigError, DataError, StropError
from strop.data.build import held_out
from strop.data.formats import to_records
from strop.data.read import read_rows
from strop.models.load import resolve_source
from strop.recipes.sft import train


def test_merge_refuses_to_overwrite_a_folder_that_is_not_a_model(tiny_llama, alpaca_file, tmp_path):
    from strop.export.merge import merge

    result = train(tiny_config(tiny_llama, alpaca_file, tmp_path / "runs"), show_progress=False)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("important")
    with pytest.raises(StropError, match="not empty"):
        merge(result.run_dir, precious)
    assert (precious / "notes.txt").read_text() == "important"


def test_encoder_catalogue_model_is_refused_for_sft():
    with pytest.raises(ConfigError, match="encoder"):
        resolve_source("minilm-l6")


def test_a_mistyped_field_mapping_names_the_key_and_the_columns(tmp_path):
    f = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"fields\.instruction: column 'questoin'.*answer, question"):
        to_records(read_rows(str(f)), "auto", {"instruction": "questoin", "output": "answer"}, str(f))


def test_row_errors_name_the_users_column(tmp_path):
    f = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "  "}])
    with pytest.raises(DataError, match=r"qa.jsonl:1: field 'answer': empty"):
        to_records(read_rows(str(f)), "alpaca", {"instruction": "question", "output": "answer"}, str(f))


def test_a_mistyped_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="not found"):
        read_rows("data/trian")


def test_windows_of_one_document_stay_on_one_side_of_the_split():
    ids = [f"doc{d}" if w == 0 else f"doc{d}#{w}" for d in range(10) for w in range(3)]
    val = held_out(ids, 0.2, seed=0)
    docs_val = {ids[i].split("#")[0] for i in val}
    docs_train = {ids[i].split("#")[0] for i in range(len(ids)) if i not in val}
    assert val and not docs_val & docs_train


def test_sgd_with_betas_names_the_key_only():
    with pytest.raises(ConfigError) as e:
        load_config({"data": {"train": ["x.jsonl"]}, "optim": {"name": "sgd", "betas": [0.8, 0.9]}})
    assert "optim" in str(e.value) and "'data'" not in str(e.value)


def test_a_checkpoint_from_another_method_is_a_clear_error(tiny_llama, alpaca_file, tmp_path, monkeypatch):
    import strop.training.loop_state as loop

    cfg = tiny_config(tiny_llama, alpaca_file, tmp_path / "runs", train={"max_steps": 4, "save_every": 1})
    real = loop.save_checkpoint

    def crash_after_second(run_dir, model, optimizer, state, keep_last):
        path = real(run_dir, model, optimizer, state, keep_last)
        if state["step"] == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(loop, "save_checkpoint", crash_after_second)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, show_progress=False)
    monkeypatch.setattr(loop, "save_checkpoint", real)
    with pytest.raises(StropError, match="different model or method"):
        train({**cfg, "method": {"name": "full"}}, show_progress=False)


def test_a_run_stopped_before_export_is_finished_by_running_it_again(tiny_llama, alpaca_file, tmp_path):
    cfg = tiny_config(tiny_llama, alpaca_file, tmp_path / "runs")
    first = train(cfg, show_progress=False)
    adapter = (first.model_dir / "adapter_model.safetensors").read_bytes()
    shutil.rmtree(first.model_dir)  # as if interrupted while exporting
    again = train(cfg, show_progress=False)
    assert (again.model_dir / "adapter_model.safetensors").read_bytes() == adapter
    with pytest.raises(StropError, match="already holds a finished run"):
        train(cfg, show_progress=False)


def test_a_finished_run_trains_further_when_asked_for_more_steps(tiny_llama, alpaca_file, tmp_path):
    cfg = tiny_config(tiny_llama, alpaca_file, tmp_path / "runs", train={"max_steps": 2})
    train(cfg, show_progress=False)
    more = train(cfg, ["train.max_steps=4"], show_progress=False)
    steps = [json.loads(x)["step"] for x in (more.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert more.metrics["steps"] == 4 and [s for s in steps if s] == sorted(s for s in steps if s)
    assert max(steps) == 4


def test_a_failed_run_leaves_no_run_directory(tiny_llama, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "q"}])
    cfg = tiny_config(tiny_llama, bad, tmp_path / "runs")
    with pytest.raises(DataError):
        train(cfg, show_progress=False)
    assert not (tmp_path / "runs" / "run").exists()


@pytest.mark.parametrize("task", ["ratings", "grpo"])
def test_a_fields_mapping_to_a_missing_column_is_named_for_every_task(task, tiny_llama, tmp_path):
    """Rated rows and RL prompts mapped the columns they found and skipped the rest without a word."""
    rows = [{"question": f"q{i}", "response": "r", "score": 1.0} for i in range(6)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = tiny_config(tiny_llama, data, tmp_path / "runs", task="reward" if task == "ratings" else task)
    cfg["data"]["train"] = [{"path": str(data), "fields": {"prompt": "qestion"}}]
    if task == "ratings":
        cfg["reward_model"] = {"target": "ratings", "rating_field": "score"}
    else:
        cfg["rl"] = {"reward": "length", "group_size": 2}
    with pytest.raises(DataError, match="fields.prompt: column 'qestion' is not in the data"):
        from strop.recipes.run import train as train_any

        train_any(cfg, show_progress=False)

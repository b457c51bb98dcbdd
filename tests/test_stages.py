"""Sequential fine-tuning: each stage starts from the previous stage's weights (merged or by training
the same adapter further), replays the asked share of earlier data, watches earlier stages' validation
loss, exports a model that loads back to exactly what trained, and a rerun skips finished stages."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from conftest import tiny_config, write_jsonl
from strop.core.config import load_config, stage_configs
from strop.core.errors import ConfigError
from strop.models.load import load_model
from strop.recipes import sft
from strop.recipes.stages import train_stages
from strop.training.loop import fit as loop_fit


def rows(tag: str, n: int) -> list[dict]:
    return [{"instruction": f"{tag} question {i}?", "output": f"{tag} answer {i}."} for i in range(n)]


@pytest.fixture
def two_stage(tmp_path, tiny_llama):
    general = write_jsonl(tmp_path / "general.jsonl", rows("general", 40))
    medical = write_jsonl(tmp_path / "medical.jsonl", rows("medical", 30))
    cfg = tiny_config(
        tiny_llama, general, tmp_path / "out", name="pipe", train={"max_steps": 3, "eval_every": 3}
    )
    cfg["stages"] = [
        {"name": "general"},
        {"name": "medical", "data": {"train": [str(medical)]}, "optim": {"lr": 5e-3}, "replay": 0.25},
    ]
    return cfg


PROBE = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=PROBE).logits.float()


class FitSpy:
    """Wraps the skeleton's fit: the logits of the model as each stage's training starts and ends."""

    def __init__(self, monkeypatch):
        self.start: list[torch.Tensor] = []
        self.end: list[torch.Tensor] = []
        self.monitors: list[list[str]] = []
        real = loop_fit

        def spy(model, *args, **kwargs):
            self.start.append(logits(model))
            self.monitors.append(sorted(kwargs.get("monitors") or {}))
            result = real(model, *args, **kwargs)
            self.end.append(logits(model))
            return result

        monkeypatch.setattr("strop.recipes.skeleton.fit", spy)


def test_stage_configs_merge_sections_and_chain_models(two_stage, tmp_path):
    cfg = load_config(two_stage)
    first, second = stage_configs(cfg)
    assert first.run_dir == tmp_path / "out" / "pipe" / "general"
    assert first.model.name == two_stage["model"]["name"]
    assert second.model.name == str(first.run_dir / "model") and second.model.adapter == "merge"
    assert second.optim.lr == 5e-3 and second.optim.schedule == "constant"  # merged key by key
    assert [s.path for s in second.data.train] == [str(tmp_path / "medical.jsonl")]  # lists replace
    assert second.data.max_length == 64 and second.train.max_steps == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s[1]["optim"].update(lr="fast"), "stages.1.optim.lr"),
        (lambda s: s[1].update(method={"nme": "full"}), "stages.1.method.nme: unknown key"),
        (lambda s: s[0].update(start="adapter"), "stages.0.start"),
        (lambda s: s[1].update(name="general"), "every stage needs its own name"),
        (lambda s: s[1].update(start="adapter", method={"name": "full"}), "stages.1.start: adapter"),
        (lambda s: s[1].update(replay=1.0), "stages.1.replay"),
    ],
)
def test_stage_mistakes_name_the_stage_key(two_stage, change, message):
    change(two_stage["stages"])
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(two_stage)


def test_a_plain_config_still_needs_training_data(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.train: at least one training source"):
        load_config({"data": {"max_length": 64}})


def test_stage_two_starts_from_stage_one_and_exports_what_it_trained(two_stage, monkeypatch):
    spy = FitSpy(monkeypatch)
    first, second = train_stages(two_stage, show_progress=False)

    stage_one = load_model(str(first.model_dir), torch.device("cpu"), torch.float32)
    assert torch.allclose(spy.start[1], logits(stage_one), atol=1e-5)  # fresh LoRA B = 0: exactly stage 1
    assert not torch.allclose(spy.start[0], spy.start[1], atol=1e-3)  # stage 1 really moved the weights
    # the exported chain (stage 2's adapter over stage 1's merged model) reloads to what trained
    final = load_model(str(second.model_dir), torch.device("cpu"), torch.float32)
    assert torch.allclose(spy.end[1], logits(final), atol=1e-5)
    assert json.loads((second.model_dir / "strop_model.json").read_text())["base_model"] == str(
        first.model_dir
    )

    # replay: a quarter of stage 2's examples come from stage 1's training examples, none from its validation
    replay = second.data["replay"]
    assert replay["examples"] == round(0.25 / 0.75 * (second.data["train_examples"] - replay["examples"]))
    assert replay["share"] == pytest.approx(0.25, abs=0.02) and replay["from"] == {
        "general": replay["examples"]
    }

    # stage 1's validation loss is watched during stage 2, and tabled per stage
    assert spy.monitors == [[], ["stage:general"]]
    records = [json.loads(x) for x in (second.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss/stage:general" in r for r in records)
    summary = json.loads((second.run_dir.parent / "stages.json").read_text())
    table = summary["validation_loss_after_each_stage"]
    assert set(table["general"]) == {"general"} and set(table["medical"]) == {"general", "medical"}
    assert summary["model_dir"] == str(second.model_dir)


def test_replayed_examples_are_stage_one_training_examples(two_stage, monkeypatch):
    seen = {}
    real = loop_fit

    def spy(model, objective, train_set, val_set, *args, **kwargs):
        seen.setdefault("train", []).append(list(train_set.example_ids))
        seen.setdefault("val", []).append(list(val_set.example_ids) if val_set else [])
        return real(model, objective, train_set, val_set, *args, **kwargs)

    monkeypatch.setattr("strop.recipes.skeleton.fit", spy)
    train_stages(two_stage, show_progress=False)
    stage_one_train, stage_one_val = set(seen["train"][0]), set(seen["val"][0])
    replayed = [e for e in seen["train"][1] if "general" in e]
    assert replayed and set(replayed) <= stage_one_train and not set(replayed) & stage_one_val
    assert len(replayed) == len(set(replayed))  # 40 general examples are plenty: no repeats


def test_start_adapter_trains_the_same_adapter_further(two_stage, monkeypatch):
    two_stage["stages"][1].update(start="adapter", replay=0.0)
    spy = FitSpy(monkeypatch)
    first, second = train_stages(two_stage, show_progress=False)
    assert torch.allclose(spy.start[1], spy.end[0], atol=1e-5)  # it continues from where stage 1 ended
    meta = json.loads((second.model_dir / "strop_model.json").read_text())
    assert meta["base_model"] == two_stage["model"]["name"]  # the adapter sits on stage 1's own base
    final = load_model(str(second.model_dir), torch.device("cpu"), torch.float32)
    assert torch.allclose(spy.end[1], logits(final), atol=1e-5)


def test_full_then_lora_chains_through_saved_weights(two_stage, monkeypatch):
    two_stage["stages"][0]["method"] = {"name": "full"}
    two_stage["stages"][1]["replay"] = 0.0
    spy = FitSpy(monkeypatch)
    first, second = train_stages(two_stage, show_progress=False)
    assert torch.allclose(spy.start[1], spy.end[0], atol=1e-5)
    final = load_model(str(second.model_dir), torch.device("cpu"), torch.float32)
    assert torch.allclose(spy.end[1], logits(final), atol=1e-5)


def test_rerun_skips_finished_stages_and_continues_the_rest(two_stage, monkeypatch):
    calls = []
    real = sft.train

    def counting(cfg, *args, **kwargs):
        calls.append(cfg.name)
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr("strop.recipes.stages.train", counting)
    first = train_stages(two_stage, show_progress=False)
    shutil.rmtree(first[1].run_dir)  # as if stage 2 had never run
    second = train_stages(two_stage, show_progress=False)
    assert calls == ["general", "medical", "medical"]
    assert second[0].metrics == first[0].metrics


def test_cli_trains_stages_with_data_paths_relative_to_the_yaml(two_stage, tmp_path, monkeypatch, capsys):
    from strop.cli.main import main

    two_stage["stages"][1]["data"]["train"] = ["medical.jsonl"]  # relative to the YAML file's folder
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(two_stage, sort_keys=False))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["train", str(tmp_path / "pipe.yaml"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "stage general:" in out and "stage medical:" in out and "stages.json" in out
    summary = json.loads((tmp_path / "out" / "pipe" / "stages.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["general", "medical"]

    assert main(["data", "check", str(tmp_path / "pipe.yaml"), "--no-estimate", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["stages"]
    assert [s["path"] for s in report["medical"]["sources"] if s["split"] == "train"] == [
        str(tmp_path / "medical.jsonl")
    ]
    assert report["general"]["sources"][0]["rows"] == 40

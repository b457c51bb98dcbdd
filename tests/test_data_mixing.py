"""Mixtures realize their ratios, curricula start with the easiest examples, augmented copies never
validate, and a mixture's validation loss is reported per source."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_config, write_jsonl
from strop.core.config import DataConfig
from strop.core.errors import DataError
from strop.data.build import build_datasets
from strop.data.template import ChatTemplate, resolve_template


@pytest.fixture
def template(tokenizer):
    return ChatTemplate(tokenizer, resolve_template("chatml", tokenizer)[1])


def rows(tag: str, n: int) -> list[dict]:
    return [{"instruction": f"{tag} question {i}?", "output": f"{tag} answer {i}."} for i in range(n)]


def sources(tmp_path, sizes: dict[str, int], ratios: dict[str, float]) -> list[dict]:
    return [
        {"path": str(write_jsonl(tmp_path / f"{k}.jsonl", rows(k, n))), "ratio": ratios[k]}
        for k, n in sizes.items()
    ]


def count_by_source(ids: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for eid in ids:
        name = eid.split("/")[-1].split(".jsonl")[0]
        out[name] = out.get(name, 0) + 1
    return out


def test_a_3_to_1_mixture_without_replacement_is_3_to_1(tmp_path, template):
    cfg = DataConfig(
        train=sources(tmp_path, {"a": 300, "b": 300}, {"a": 3, "b": 1}),
        val_fraction=0.0,
        mixture={},
        cache_dir=str(tmp_path / "c"),
    )
    ds = build_datasets(cfg, template, seed=0)
    counts = count_by_source(ds.train.example_ids)
    assert counts == {"a": 300, "b": 100}  # a runs out first: 300 of a sets the size
    assert ds.summary["mixture"]["a"]["share"] == 0.75 and ds.summary["mixture"]["b"]["used"] == 100
    assert len(set(ds.train.example_ids)) == len(ds.train)  # no repeats


def test_a_3_to_1_mixture_with_replacement_repeats_the_small_source(tmp_path, template):
    cfg = DataConfig(
        train=sources(tmp_path, {"a": 30, "b": 200}, {"a": 3, "b": 1}),
        val_fraction=0.0,
        mixture={"examples": 400, "replacement": True},
        cache_dir=str(tmp_path / "c"),
    )
    ds = build_datasets(cfg, template, seed=0)
    counts = count_by_source(ds.train.example_ids)
    assert counts == {"a": 300, "b": 100}
    assert sum("~rep" in e for e in ds.train.example_ids) == 270  # 30 originals, 270 repeats of a
    with pytest.raises(DataError, match="data.mixture.replacement"):
        build_datasets(
            cfg.model_copy(update={"mixture": cfg.mixture.model_copy(update={"replacement": False})}),
            template,
            0,
        )


def test_augmented_copies_and_repeats_never_reach_validation(tmp_path, template):
    cfg = DataConfig(
        train=sources(tmp_path, {"a": 40, "b": 10}, {"a": 1, "b": 1}),
        val_fraction=0.3,
        mixture={"examples": 80, "replacement": True},
        augment={"copies": 2},
        cache_dir=str(tmp_path / "c"),
    )
    ds = build_datasets(cfg, template, seed=0)
    assert any("~aug" in e for e in ds.train.example_ids)
    assert not any("~aug" in e or "~rep" in e for e in ds.validation.example_ids)
    val_originals = set(ds.validation.example_ids)
    # no copy of a validation example trains
    assert not any(e.split("~")[0] in val_originals for e in ds.train.example_ids)
    assert set(ds.validation_groups) == {"a", "b"}


def test_a_mixture_run_logs_validation_loss_per_source_and_a_curriculum_starts_easy(tiny_llama, tmp_path):
    import strop.recipes.sft as recipe

    short = [{"instruction": f"Hi {i}?", "output": "Yes."} for i in range(20)]
    long = [
        {"instruction": f"Explain topic {i} " + "in detail " * 3, "output": "Because " * 4} for i in range(20)
    ]
    a, b = write_jsonl(tmp_path / "short.jsonl", short), write_jsonl(tmp_path / "long.jsonl", long)
    cfg = tiny_config(tiny_llama, a, tmp_path / "out", train={"max_steps": 4, "eval_every": 2})
    cfg["data"].update(
        train=[{"path": str(a), "ratio": 1}, {"path": str(b), "ratio": 1}],
        mixture={},
        val_fraction=0.2,
        max_length=256,
        curriculum={"difficulty": "length", "start": 0.25, "full_at": 1.0, "pacing": "linear"},
    )
    seen: dict[int, list[str]] = {}
    import strop.training.loop as loop

    call = loop.MicroBatches.__call__

    def spy(self, m):
        seen[m] = [self.ts.example_ids[i] for i in self.plan.micro_batch(m)]
        return call(self, m)

    loop.MicroBatches.__call__ = spy
    try:
        result = recipe.train(cfg, show_progress=False)
    finally:
        loop.MicroBatches.__call__ = call
    assert "val_loss/short" in result.metrics and "val_loss/long" in result.metrics
    metrics = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val_loss/long" in m] == [2, 4]
    assert seen[0] and all("short.jsonl" in e for e in seen[0])  # step 0: the easiest 25%, all short
    assert any("long.jsonl" in e for m in (2, 3) for e in seen[m])  # the pool has grown to long rows

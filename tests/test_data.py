"""Building train/validation sets (split, dedup, cache), batching, and config errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import strop.data.build as build_mod
from conftest import ALPACA_ROWS, write_jsonl
from strop.core.config import DataConfig, load_config
from strop.core.config_file import apply_overrides, parse_value
from strop.core.errors import ConfigError, DataError
from strop.data.batches import IGNORE, BatchPlan, collate
from strop.data.build import build_datasets
from strop.data.template import ALPACA, CHATML, ChatTemplate
from strop.data.tokenized import TokenizedSet


def label_count(batch) -> int:
    """The tokens that carry loss (position 0 is never predicted), as SFT's objective counts them."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


@pytest.fixture
def template(tokenizer):
    return ChatTemplate(tokenizer, CHATML)


def data_cfg(tmp_path, train, **kw) -> DataConfig:
    return DataConfig(train=[str(p) for p in train], cache_dir=str(tmp_path / "cache"), **kw)


def as_lists(ts: TokenizedSet) -> list[tuple[list[int], list[bool]]]:
    return [(list(i), list(m)) for i, m in zip(ts.ids, ts.trained, strict=True)]


# ---------------------------------------------------------------- build_datasets


def test_val_split_is_seeded_deterministic_and_disjoint(tmp_path, template):
    f = write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS)
    cfg = data_cfg(tmp_path, [f], val_fraction=0.25)
    a = build_datasets(cfg, template, seed=0)
    b = build_datasets(cfg, template, seed=0)
    c = build_datasets(cfg, template, seed=1)
    n = len(ALPACA_ROWS)
    assert len(a.validation) == round(n * 0.25) and len(a.train) == n - len(a.validation)
    assert a.validation.example_ids == b.validation.example_ids and a.train.example_ids == b.train.example_ids
    assert set(a.train.example_ids).isdisjoint(a.validation.example_ids)
    assert set(a.train.example_ids) | set(a.validation.example_ids) == {f"{f}:{i + 1}" for i in range(n)}
    assert set(c.validation.example_ids) != set(a.validation.example_ids)
    assert a.summary["train_examples"] == len(a.train) and a.summary["validation_examples"] == len(
        a.validation
    )
    assert a.summary["train_label_tokens"] == sum(int(m[1:].sum()) for m in a.train.trained) > 0


def test_no_validation_when_fraction_is_zero(tmp_path, template):
    f = write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS)
    ds = build_datasets(data_cfg(tmp_path, [f], val_fraction=0.0), template, seed=0)
    assert ds.validation is None and len(ds.train) == len(ALPACA_ROWS)


def test_validation_files_copying_training_rows_are_refused_unless_allowed(tmp_path, template):
    """Given validation files are not pruned behind the user's back: the run refuses to start, naming
    the copies, unless data.allow_leakage says to go on."""
    from strop.data.build import split_records
    from strop.data.leakage import guard_leakage

    f = write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS[:10])
    new = {"instruction": "What is 9 times 9?", "output": "Arr! 81, matey."}
    v = write_jsonl(tmp_path / "val.jsonl", [ALPACA_ROWS[3], new, ALPACA_ROWS[7]])
    cfg = data_cfg(tmp_path, [f], validation=[str(v)])
    ds = build_datasets(cfg, template, seed=0)
    assert len(ds.train) == 10 and len(ds.validation) == 3
    with pytest.raises(
        DataError, match=rf"2 validation example\(s\) copy training examples, e.g. {v}:1 ~ {f}:4"
    ):
        guard_leakage(cfg, ds, split_records(cfg, ds))
    allowed = cfg.model_copy(update={"allow_leakage": True})
    leak = guard_leakage(allowed, ds, split_records(allowed, ds))
    assert leak["train_validation"]["exact"] == 2 and len(ds.validation) == 3


def test_duplicates_in_a_split_file_never_reach_validation(tmp_path, template):
    rows = ALPACA_ROWS[:6] * 2  # every row twice
    f = write_jsonl(tmp_path / "train.jsonl", rows)
    ds = build_datasets(data_cfg(tmp_path, [f], val_fraction=0.5), template, seed=0)
    train = {x.tobytes() for x in ds.train.ids}
    kept = ds.validation.ids if ds.validation is not None else []
    assert not any(x.tobytes() in train for x in kept)
    assert ds.summary["validation_duplicates_of_train_removed"] == len(rows) // 2 - len(kept)


def test_dropped_examples_never_reach_training(tmp_path, template, tokenizer):
    long_q = "Summarize the text. " * 30
    rows = [*ALPACA_ROWS[:4], {"instruction": long_q, "output": "Arr!"}]
    f = write_jsonl(tmp_path / "train.jsonl", rows)
    ds = build_datasets(data_cfg(tmp_path, [f], val_fraction=0.0, max_length=48), template, seed=0)
    assert len(ds.train) == 4 and f"{f}:5" not in ds.train.example_ids
    (src,) = ds.summary["sources"]
    assert src["dropped_no_response"] == 1 and src["rows"] == 5 and src["format"] == "alpaca"
    assert all(m[1:].any() for m in ds.train.trained) and all(len(x) <= 48 for x in ds.train.ids)


def test_all_examples_dropped_is_an_error(tmp_path, template):
    f = write_jsonl(
        tmp_path / "train.jsonl", [{"instruction": "Summarize the text. " * 30, "output": "Arr!"}]
    )
    with pytest.raises(DataError, match="max_length"):
        build_datasets(data_cfg(tmp_path, [f], max_length=16), template, seed=0)


def test_malformed_row_surfaces_through_build(tmp_path, template):
    f = write_jsonl(tmp_path / "train.jsonl", [ALPACA_ROWS[0], {"instruction": "Hi", "output": 3}])
    with pytest.raises(DataError, match=f"{f}:2: field 'output'"):
        build_datasets(data_cfg(tmp_path, [f]), template, seed=0)


def test_tokenization_cache_is_reused(tmp_path, template, monkeypatch):
    f = write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS)
    cfg = data_cfg(tmp_path, [f], val_fraction=0.2)
    first = build_datasets(cfg, template, seed=0)
    assert [s["cached"] for s in first.summary["sources"]] == [False]

    def boom(*a, **k):
        raise AssertionError("re-tokenized although the cache was valid")

    monkeypatch.setattr(build_mod, "tokenize_records", boom)
    second = build_datasets(cfg, template, seed=0)
    assert [s["cached"] for s in second.summary["sources"]] == [True]
    assert as_lists(second.train) == as_lists(first.train)
    assert as_lists(second.validation) == as_lists(first.validation)
    assert second.train.example_ids == first.train.example_ids
    assert second.summary["sources"][0]["rows"] == len(ALPACA_ROWS)


@pytest.mark.parametrize("change", ["max_length", "content", "template", "train_on_prompt", "fields"])
def test_tokenization_cache_is_invalidated(tmp_path, template, tokenizer, change):
    f = write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS)
    cfg = data_cfg(tmp_path, [f], val_fraction=0.0)
    before = build_datasets(cfg, template, seed=0)
    if change == "max_length":
        cfg = data_cfg(tmp_path, [f], val_fraction=0.0, max_length=32)
    elif change == "content":  # same size, one character different
        rows = [dict(r) for r in ALPACA_ROWS]
        rows[0]["output"] = rows[0]["output"].replace("Arr", "Yar")
        write_jsonl(f, rows)
    elif change == "template":
        template = ChatTemplate(tokenizer, ALPACA)
    elif change == "train_on_prompt":
        cfg = data_cfg(tmp_path, [f], val_fraction=0.0, train_on_prompt=True)
    else:
        cfg = DataConfig(
            train=[{"path": str(f), "fields": {"text": "output"}, "format": "text"}],
            cache_dir=cfg.cache_dir,
            val_fraction=0.0,
        )
    after = build_datasets(cfg, template, seed=0)
    assert [s["cached"] for s in after.summary["sources"]] == [False]
    assert as_lists(after.train) != as_lists(before.train)
    again = build_datasets(cfg, template, seed=0)
    assert [s["cached"] for s in again.summary["sources"]] == [True]
    assert as_lists(again.train) == as_lists(after.train)


def test_folder_cache_sees_a_new_file(tmp_path, template):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "a.jsonl", ALPACA_ROWS[:5])
    cfg = data_cfg(tmp_path, [d], val_fraction=0.0)
    assert len(build_datasets(cfg, template, seed=0).train) == 5
    write_jsonl(d / "b.jsonl", ALPACA_ROWS[5:8])
    ds = build_datasets(cfg, template, seed=0)
    assert len(ds.train) == 8 and ds.summary["sources"][0]["cached"] is False


# ---------------------------------------------------------------- batches


def small_set() -> TokenizedSet:
    ids = [
        np.array([5, 6, 7, 8, 9], np.int32),
        np.array([10, 11, 12], np.int32),
        np.array([13, 14], np.int32),
    ]
    trained = [np.array([0, 0, 1, 1, 1], bool), np.array([0, 1, 0], bool), np.array([1, 1], bool)]
    return TokenizedSet(ids, trained, ["a", "b", "c"])


def test_collate_pads_right_and_masks_labels():
    ts, pad = small_set(), 3
    batch = collate(ts, [1, 0, 2], pad_id=pad)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, 5)
    for b, i in enumerate([1, 0, 2]):
        n = len(ts.ids[i])
        assert batch["input_ids"][b, :n].tolist() == ts.ids[i].tolist()
        assert batch["input_ids"][b, n:].tolist() == [pad] * (5 - n)
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (5 - n)
        want = [t if m else IGNORE for t, m in zip(ts.ids[i].tolist(), ts.trained[i].tolist(), strict=True)]
        assert batch["labels"][b].tolist() == want + [IGNORE] * (5 - n)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    # position 0 is never predicted, so it does not count as a label token
    assert label_count(batch) == sum(int(m[1:].sum()) for m in ts.trained) == 5


def test_collate_of_real_examples_labels_only_the_response(tokenizer, template):
    conv = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Arr!"}]
    enc = template.encode(conv)
    ids, trained = np.asarray(enc.ids, np.int32), np.asarray(enc.trained)
    ts = TokenizedSet([ids, ids[:-1]], [trained, trained[:-1]], ["x", "y"])
    batch = collate(ts, [0, 1], tokenizer.pad_token_id)
    labels = batch["labels"][0]
    assert tokenizer.decode(labels[labels != IGNORE].tolist()) == "Arr!<|im_end|>\n"
    assert batch["labels"][1, -1] == IGNORE and batch["input_ids"][1, -1] == tokenizer.pad_token_id


def test_batch_plan_is_seeded_and_covers_every_example_once_per_epoch():
    n, bs = 10, 3
    plan, same, other = BatchPlan(n, bs, seed=7), BatchPlan(n, bs, seed=7), BatchPlan(n, bs, seed=8)
    assert plan.per_epoch == 4
    steps = range(3 * plan.per_epoch)
    # random access in any order gives the same batches as a fresh plan walked in order
    got = {m: plan.micro_batch(m).tolist() for m in reversed(steps)}
    assert [got[m] for m in steps] == [same.micro_batch(m).tolist() for m in steps]
    epochs = [[i for m in range(e * 4, e * 4 + 4) for i in got[m]] for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(n))
        assert [len(got[m]) for m in range(4)] == [3, 3, 3, 1]
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    assert [other.micro_batch(m).tolist() for m in range(4)] != [got[m] for m in range(4)]
    flat = BatchPlan(n, bs, seed=7, shuffle=False)
    assert [i for m in range(4) for i in flat.micro_batch(m).tolist()] == list(range(n))


# ---------------------------------------------------------------- config


def base() -> dict:
    return {"data": {"train": ["train.jsonl"]}, "optim": {"lr": 1e-3}}


def config_error(raw, overrides=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(raw, overrides)
    return str(e.value)


def test_unknown_key_names_the_dotted_key():
    assert "optim.lrr: unknown key" in config_error({**base(), "optim": {"lrr": 1e-3}})
    assert "optim.lrr: unknown key" in config_error(base(), ["optim.lrr=1e-3"])
    assert "method.lora.rank: unknown key" in config_error(base(), ["method.lora.rank=8"])


def test_bad_literal_names_the_allowed_values():
    msg = config_error(base(), ["optim.schedule=cosin"])
    assert "optim.schedule" in msg and "'cosin'" in msg
    assert all(v in msg for v in ("'constant'", "'linear'", "'cosine'"))
    msg = config_error({**base(), "data": {"train": [{"path": "x.jsonl", "format": "jsonl"}]}})
    assert "data.train.0.format" in msg and "'sharegpt'" in msg


def test_set_values_are_parsed_as_yaml():
    assert parse_value("3e-4") == pytest.approx(3e-4) and isinstance(parse_value("3e-4"), float)
    assert parse_value("1e5") == 1e5 and parse_value("-2.5E-3") == -2.5e-3
    assert parse_value("8") == 8 and parse_value("true") is True and parse_value("null") is None
    assert parse_value("[q_proj, v_proj]") == ["q_proj", "v_proj"] and parse_value("cosine") == "cosine"
    assert parse_value("1e-4x") == "1e-4x" and parse_value("e5") == "e5" and parse_value("'1e5'") == "1e5"
    raw = apply_overrides(
        base(), ["optim.lr=3e-4", "train.max_steps=10", "method.lora.target_modules=[q_proj]"]
    )
    assert raw["optim"]["lr"] == 3e-4 and isinstance(raw["optim"]["lr"], float)
    assert raw["train"]["max_steps"] == 10 and raw["method"]["lora"]["target_modules"] == ["q_proj"]
    cfg = load_config(base(), ["optim.lr=3e-4", "data.max_length=128"])
    assert cfg.optim.lr == 3e-4 and cfg.data.max_length == 128


def test_bad_override_value_names_the_key():
    msg = config_error(base(), ["optim.lr=3e-4x"])
    assert "optim.lr" in msg and "3e-4x" in msg
    assert "--set" in config_error(base(), ["optim.lr"])  # no '='
    assert "not a section" in config_error(base(), ["optim.lr.x=1"])


def test_load_config_does_not_change_the_callers_dict():
    raw = base()
    snapshot = json.loads(json.dumps(raw))
    load_config(raw, ["optim.lr=5e-4", "data.max_length=64"])
    assert raw == snapshot


def test_yaml_file_config_and_relative_data_paths(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS[:2])
    f = tmp_path / "run.yaml"
    f.write_text("data:\n  train: train.jsonl\noptim:\n  lr: 3e-4\n")
    cfg = load_config(f)
    assert cfg.optim.lr == 3e-4 and cfg.data.train[0].path == str((tmp_path / "train.jsonl").resolve())
    f.write_text("data:\n  train: [train.jsonl]\n  max_lenght: 64\n")
    with pytest.raises(ConfigError, match=r"data\.max_lenght: unknown key"):
        load_config(f)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_skip_and_limit_select_rows(tmp_path):
    from strop.core.config import DatasetSource
    from strop.data.build import read_records

    f = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS[:8])
    recs = read_records(DatasetSource(path=str(f), skip=3, limit=2))
    assert [r.id for r in recs] == [f"{f}:4", f"{f}:5"]
    assert len(read_records(DatasetSource(path=str(f), skip=6))) == 2
    with pytest.raises(DataError, match="skip 8 leaves no rows"):
        read_records(DatasetSource(path=str(f), skip=8))

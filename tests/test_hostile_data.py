"""Hostile data costs bounded time and memory: a row is measured before it is parsed and rejected by
file:line above data.max_row_bytes, a conversation is tokenized only as far as max_length needs, and
long plain text is tokenized in chunks; each equals what tokenizing whole would give."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ALPACA_ROWS, assert_user_error, build_tokenizer, run_cli, tiny_config, write_jsonl
from strop.core.config import DataConfig
from strop.core.errors import DataError
from strop.data.build import build_datasets
from strop.data.formats import Record
from strop.data.read import Rejected, read_rows
from strop.data.template import CHATML, ChatTemplate, tokenize_head, tokenize_long
from strop.data.tokenized import tokenize_records

PIECES = [
    "the",
    "sea",
    " ",
    "  ",
    "\n",
    "\n\n",
    "ü",
    "日本",
    "🙂",
    "Paris",
    "56",
    "!",
    "\t",
    "wide",
    "x" * 40,
]


def _random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(n))


def _prepend_tokenizer():
    """A Llama-2-style tokenizer: no pre-tokenizer, a '▁' prepended to the text and spaces as '▁', so
    tokenizing a piece of text on its own differs from tokenizing it in context."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"])
    tk.train_from_iterator([_random_text(random.Random(k), 400) for k in range(20)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["byte-level", "prepend"])
def test_head_and_chunked_tokenization_equal_tokenizing_whole(kind):
    tok = build_tokenizer() if kind == "byte-level" else _prepend_tokenizer()
    rng = random.Random(0)
    for trial in range(12):
        text = _random_text(rng, rng.randint(200, 2500))
        whole = tok(text, add_special_tokens=False)["input_ids"]
        for chunk in (128, 600):  # many seams, in every kind of neighbourhood
            assert tokenize_long(tok, text, chunk) == whole, (trial, chunk)
        for n in (1, 40, 400, len(whole), len(whole) + 5):
            head, complete = tokenize_head(tok, text, n)
            assert head == whole[:n] and complete == (len(whole) <= n), (trial, n)


def test_encode_up_to_max_tokens_is_the_head_of_the_full_encoding():
    template = ChatTemplate(build_tokenizer(), CHATML)
    rng = random.Random(1)
    for trial in range(10):
        msgs = [
            {"role": "system", "content": _random_text(rng, rng.choice([3, 300]))},
            {"role": "user", "content": _random_text(rng, rng.choice([5, 900]))},
            {"role": "assistant", "content": _random_text(rng, rng.choice([5, 900]))},
            {"role": "user", "content": "more"},
            {"role": "assistant", "content": _random_text(rng, 50)},
        ]
        full = template.encode(msgs)
        for m in (8, 64, 500, len(full.ids)):
            cut = template.encode(msgs, max_tokens=m)
            if len(full.ids) <= m:
                assert cut == full
            else:
                assert len(cut.ids) > m, (trial, m)
                assert cut.ids[:m] == full.ids[:m] and cut.trained[:m] == full.trained[:m], (trial, m)


def test_tokenized_examples_keep_truncation_drops_and_windows():
    """What training keeps is unchanged by tokenizing less: a long reply is truncated, a reply pushed
    past max_length by a long prompt is dropped, long plain text becomes every window of it."""
    tok = build_tokenizer()
    template = ChatTemplate(tok, CHATML)
    long = "the sea is wide and blue " * 4000
    records = [
        Record(
            "long-reply", messages=({"role": "user", "content": "Hi"}, {"role": "assistant", "content": long})
        ),
        Record(
            "long-prompt",
            messages=({"role": "user", "content": long}, {"role": "assistant", "content": "ok"}),
        ),
        Record(
            "short", messages=({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo ho"})
        ),
        Record("doc", text=long + "the end"),
    ]
    ts = tokenize_records(records, template, 48, train_on_prompt=False, workers=1)
    assert ts.stats["truncated_ids"] == ["long-reply", "long-prompt"]
    assert ts.stats["dropped_ids"] == ["long-prompt"] and ts.example_ids[:2] == ["long-reply", "short"]
    full = template.encode(records[0].messages)
    assert ts.ids[0].tolist() == full.ids[:48] and ts.trained[0].tolist() == full.trained[:48]
    doc = tok(long + "the end", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    windows = [ids.tolist() for ids, eid in zip(ts.ids, ts.example_ids, strict=True) if eid.startswith("doc")]
    assert sum(windows, []) == doc and all(len(w) == 48 for w in windows[:-1])


def test_a_line_over_the_limit_is_rejected_by_line_and_size_without_being_parsed(tmp_path):
    path = tmp_path / "rows.jsonl"
    big = json.dumps({"instruction": "x" * 5000, "output": "y"})
    pad = 1024 - len(json.dumps({"instruction": "", "output": "y"}))
    at_limit = json.dumps({"instruction": "z" * pad, "output": "y"})  # exactly 1024 bytes
    path.write_bytes(
        f'{{"instruction": "a", "output": "b"}}\n{big}\r\n{at_limit}\r\n{{"broken\n{big}'.encode()
    )
    rejected: list[Rejected] = []
    rows = read_rows(str(path), rejected=rejected, max_row_bytes=1024)
    assert [r.where for r in rows] == [f"{path}:1", f"{path}:3"]
    assert [r.where for r in rejected] == [f"{path}:2", f"{path}:4", f"{path}:5"]
    assert f"row of {len(big):,} bytes is larger than data.max_row_bytes (1,024)" in rejected[0].reason
    assert rejected[2].reason == rejected[0].reason  # the last line, without a newline, measured alike
    with pytest.raises(DataError, match=rf"{path}:2: row of 5,03\d bytes .*raise data.max_row_bytes"):
        read_rows(str(path), max_row_bytes=1024)


def test_rows_of_json_csv_and_parquet_files_are_measured_too(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "short"}, {"text": "é" * 600}, {"text": "also short"}]  # 1,200 bytes of UTF-8
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.csv").write_text("text\nshort\n" + "e" * 2000 + "\nalso short\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    for name, second in (("a.json", "row 2"), ("b.csv", "3"), ("c.parquet", "row 2")):
        rejected: list[Rejected] = []
        got = read_rows(str(tmp_path / name), rejected=rejected, max_row_bytes=1024)
        assert [r.data["text"] for r in got] == ["short", "also short"], name
        assert [r.where for r in rejected] == [f"{tmp_path / name}:{second}"], name
        assert "data.max_row_bytes" in rejected[0].reason


def test_training_and_data_check_treat_an_oversized_row_alike(tiny_llama, tmp_path, capsys):
    """Training stops on it with one error naming file:line and the key (or leaves it out under
    data.skip_bad_rows, counted); `strop data check` lists it as a rejected row."""
    rows = [*ALPACA_ROWS[:8], {"instruction": "Tell me.", "output": "word " * 600}, *ALPACA_ROWS[8:]]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    template = ChatTemplate(build_tokenizer(), CHATML)
    cfg = {"train": [str(data)], "max_row_bytes": 2048, "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(DataError, match=rf"{data}:9: row of 3,04\d bytes is larger than data.max_row_bytes"):
        build_datasets(DataConfig(**cfg), template, 0)
    built = build_datasets(DataConfig(**cfg, skip_bad_rows=True), template, 0)
    assert built.summary["sources"][0]["rejected_rows"] == 1
    assert built.summary["train_examples"] + built.summary["validation_examples"] == len(ALPACA_ROWS)

    argv = ["data", "check", str(data), "--model", str(tiny_llama), "--no-estimate", "--json"]
    rc, out, err = run_cli([*argv, "--set", "data.max_row_bytes=2048"], capsys)
    source = json.loads(out)["sources"][0]
    assert rc == 0 and source["rejected"] == 1 and source["rejected_rows"][0]["where"] == f"{data}:9"
    rc, out, err = run_cli(
        ["data", "check", str(data), "--model", str(tiny_llama), "--set", "data.max_row_bytes=12"], capsys
    )
    assert_user_error(rc, err, "data.max_row_bytes")


def test_progress_bar_on_request_only(capsys):
    template = ChatTemplate(build_tokenizer(), CHATML)
    records = [
        Record(str(i), messages=({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}))
        for i in range(300)
    ]
    tokenize_records(records, template, 32, False, workers=1)
    assert "tokenize" not in capsys.readouterr().err  # not a terminal, nobody asked
    tokenize_records(records, template, 32, False, workers=1, progress=True)
    assert "tokenize" in capsys.readouterr().err


PEAK_SCRIPT = """
import json, resource, sys, time
from strop.cli.main import main

def run(argv):
    t0 = time.perf_counter()
    rc = main(argv)
    return rc, time.perf_counter() - t0

warm_rc, warm_s = run(json.loads(sys.argv[1]))  # lazy imports, tokenizer and template loaded once
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rc, seconds = run(json.loads(sys.argv[2]))
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
print(f"PEAK {warm_rc} {grew} {seconds - warm_s}", file=sys.stderr)
sys.exit(rc)
"""


def _check_peak(data: Path, model: Path, *options: str) -> tuple[int, str, str, float, float]:
    """`strop data check DATA OPTIONS` in a fresh process after the same check of a small file there:
    (exit status, stdout, stderr, peak memory above the small check's in GB, seconds more than it)."""
    small = write_jsonl(data.with_name("small.jsonl"), ALPACA_ROWS)
    argv = [
        ["data", "check", str(f), "--model", str(model), "--no-estimate", *options] for f in (small, data)
    ]
    argv[1].append("--json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, *map(json.dumps, argv)], capture_output=True, text=True, env=env
    )
    warm_rc, kb, seconds = done.stderr.rsplit("PEAK ", 1)[1].split()
    assert warm_rc == "0", done.stderr
    report = done.stdout[done.stdout.index("\n{") + 1 :]  # after the small check's text report
    return done.returncode, report, done.stderr, int(kb) / 1e6, float(seconds)


@pytest.fixture(scope="module")
def huge_row_file(tmp_path_factory):
    """A 50 MB instruction (line 4) among ordinary rows: 12.4 GB and 118 s in `strop data check`
    before rows were measured and tokenized only as far as needed."""
    path = tmp_path_factory.mktemp("huge") / "train.jsonl"
    rows = [*ALPACA_ROWS[:3], {"instruction": "the sea is wide and blue " * 2_000_000, "output": "ok"}]
    write_jsonl(path, [*rows, *ALPACA_ROWS[3:]])
    assert path.stat().st_size > 50_000_000
    return path


def test_a_50mb_row_is_rejected_in_bounded_time_and_memory(huge_row_file, tiny_llama, tmp_path):
    rc, out, err, gb, seconds = _check_peak(huge_row_file, tiny_llama, "--set", f"data.cache_dir={tmp_path}")
    assert rc == 0, err
    (rejected,) = json.loads(out)["sources"][0]["rejected_rows"]
    assert rejected["where"] == f"{huge_row_file}:4" and "row of 50,000,0" in rejected["reason"]
    assert "raise data.max_row_bytes" in rejected["reason"]
    assert gb < 0.5 and seconds < 20, (gb, seconds)


def test_a_50mb_row_let_in_is_tokenized_only_as_far_as_max_length(huge_row_file, tiny_llama, tmp_path):
    """Let in on purpose: the row is read, and dropped as before (its response lies past max_length),
    in bounded time and memory."""
    options = ["--set", "data.max_row_bytes=60000000", "--set", f"data.cache_dir={tmp_path}"]
    rc, out, err, gb, seconds = _check_peak(huge_row_file, tiny_llama, *options)
    assert rc == 0, err
    assert json.loads(out)["tokens"]["train"]["response_cut_away_ids"] == [f"{huge_row_file}:4"]
    assert gb < 1.5 and seconds < 20, (gb, seconds)


# ---------------------------------------------------------------- a million rows: streamed, bounded


def _short_rows(n: int, start: int = 0) -> list[dict]:
    rng = random.Random(start)
    words = ["the", "sea", "ship", "tide", "fog", "pilot", "boat", "dawn", "ledger", "banks"]
    return [
        {
            "instruction": f"Q{i}: " + " ".join(rng.choices(words, k=4)),
            "output": " ".join(rng.choices(words, k=5)),
        }
        for i in range(start, start + n)
    ]


def _reference_examples(path: Path, template: ChatTemplate, max_length: int) -> list[tuple]:
    """The examples computed the straightforward way: every row, every record, tokenized whole."""
    from strop.data.formats import to_records

    rejected: list[Rejected] = []
    records, _ = to_records(read_rows(str(path), rejected=rejected), "auto", {}, str(path), rejected)
    out = []
    for rec in records:
        assert rec.messages is not None
        enc = template.encode(rec.messages)
        ids, trained = enc.ids[:max_length], enc.trained[:max_length]
        if any(trained[1:]):
            out.append((rec.id, ids, trained))
    return out


def test_streamed_build_gives_exactly_the_straightforward_examples(tmp_path, monkeypatch):
    """Over more rows than a chunk (bad rows, truncated and cut-away ones among them), the streamed
    build holds the examples that reading everything and tokenizing each record whole gives, in order,
    with the same held-out split as the original held_out (a dict of id lists, shuffled keys)."""
    import strop.data.tokenized as tokenized_mod
    from strop.data.augment import original_id
    from strop.data.build import held_out

    monkeypatch.setattr(tokenized_mod, "CHUNK_RECORDS", 256)  # many chunks, few rows
    rows = _short_rows(700)
    rows[5]["output"] = "word " * 80  # truncated
    rows[9]["instruction"] = "word " * 80  # response cut away: dropped
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with open(path, "a") as f:
        f.write('{"instruction": "broken"\n')
    template = ChatTemplate(build_tokenizer(), CHATML)
    cfg = DataConfig(train=[str(path)], val_fraction=0.0, max_length=64, skip_bad_rows=True)
    built = build_datasets(cfg, template, 0, progress=False)
    want = _reference_examples(path, template, 64)
    got = [
        (e, x.tolist(), m.tolist())
        for e, x, m in zip(built.train.example_ids, built.train.ids, built.train.trained, strict=True)
    ]
    assert got == want
    stats = built.summary["sources"][0]
    assert stats["rows"] == 701 and stats["rejected_rows"] == 1 and stats["dropped_no_response"] == 1
    assert stats["truncated"] == 2  # the cut-away row was truncated too

    def old_held_out(example_ids, fraction, seed):
        groups: dict[str, list[int]] = {}
        for i, eid in enumerate(example_ids):
            groups.setdefault(original_id(eid), []).append(i)
        keys = list(groups)
        random.Random(seed).shuffle(keys)
        target = max(1, round(len(example_ids) * fraction))
        picked: list[int] = []
        for k in keys:
            if len(picked) >= target or len(picked) + len(groups[k]) >= len(example_ids):
                break
            picked += groups[k]
        return sorted(picked)

    ids = [f"d{i // 3}" + (f"#{i % 3}" if i % 3 else "") for i in range(300)] + [
        f"d{i}~aug1" for i in range(50)
    ]
    for seed in range(3):
        assert held_out(ids, 0.2, seed) == old_held_out(ids, 0.2, seed)
    split = build_datasets(cfg.model_copy(update={"val_fraction": 0.2}), template, 0, progress=False)
    val = set(old_held_out([e for e, *_ in want], 0.2, 0))
    assert split.validation is not None
    assert split.validation.example_ids == [e for i, (e, *_) in enumerate(want) if i in val]


def test_tokenizing_more_rows_grows_memory_by_about_the_tokens_only(tmp_path, monkeypatch):
    """Peak traced memory of building 4N rows minus N rows, per extra row, stays near the tokens' own
    bytes (int32 ids + bool mask + the example id), not the KBs per row that holding every row and
    record as Python objects cost (~2.5 KB per short row before streaming)."""
    import tracemalloc

    import strop.data.tokenized as tokenized_mod

    monkeypatch.setattr(tokenized_mod.os, "cpu_count", lambda: 1)  # one process: all memory is traced
    monkeypatch.setattr(tokenized_mod, "CHUNK_RECORDS", 100)  # the records alive at once: a constant
    template = ChatTemplate(build_tokenizer(), CHATML)

    def peak(n: int) -> tuple[int, int]:
        path = write_jsonl(tmp_path / f"rows{n}.jsonl", _short_rows(n))
        cfg = DataConfig(
            train=[str(path)], val_fraction=0.1, max_length=64, cache_dir=str(tmp_path / "cache")
        )
        tracemalloc.start()
        built = build_datasets(cfg, template, 0, progress=False)
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return top, int(built.summary["train_tokens"])

    (small, _), (large, tokens) = peak(1000), peak(4000)
    per_row = (large - small) / 3000
    token_bytes = 5 * tokens / 4000  # int32 id + bool mask per token
    # the tokens twice (chunks, then joined), an id string and a few pointers per example
    assert per_row < 2 * token_bytes + 600, (per_row, token_bytes)


def test_no_progress_and_quiet_silence_the_tokenize_bar(tiny_llama, tmp_path, capsys, monkeypatch):
    """`strop train --no-progress` and `strop -q train` never draw the tokenize bar; a plain run leaves
    it to the terminal (progress None: shown on a terminal at INFO)."""
    import yaml

    import strop.data.build as build_mod
    import strop.data.tokenized as tokenized_mod

    asked: list = []  # the `progress` each tokenization was given
    bars: list = []  # whether its bar was disabled
    real_tokenize, real_tqdm = build_mod.tokenize_records, tokenized_mod.tqdm

    def tokenize(*args, **kwargs):
        asked.append(kwargs.get("progress"))
        return real_tokenize(*args, **kwargs)

    def tqdm(*args, **kwargs):
        bars.append(kwargs.get("disable"))
        return real_tqdm(*args, **kwargs)

    monkeypatch.setattr(build_mod, "tokenize_records", tokenize)
    monkeypatch.setattr(tokenized_mod, "tqdm", tqdm)
    for i, (argv, progress, disabled) in enumerate(
        (
            (["train"], None, None),
            (["train", "--no-progress"], False, True),
            (["-q", "train"], None, True),
        )
    ):
        data = write_jsonl(tmp_path / f"train{i}.jsonl", ALPACA_ROWS)  # its own cache entry: tokenized
        cfg = tiny_config(
            tiny_llama, data, tmp_path / f"run{i}", train={"batch_size": 4, "max_steps": 1, "seed": 0}
        )
        path = tmp_path / f"cfg{i}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        asked.clear(), bars.clear()
        rc, _, err = run_cli([*argv, str(path)], capsys)
        assert rc == 0, err
        assert asked and set(asked) == {progress}, (argv, asked)
        if disabled:
            assert bars and set(bars) == {True}, (argv, bars)

"""Chat templates decide which tokens carry loss; truncation and text windows decide what is kept."""

from __future__ import annotations

import pytest

from strop.core.errors import ConfigError, DataError
from strop.data.formats import Record
from strop.data.template import ALPACA, CHATML, ChatTemplate, encode_text, resolve_template
from strop.data.tokenized import tokenize_records

SYSTEM = "Be a pirate."
QUESTION = "What is 7 times 8?"
ANSWER = "Arr! Seven times eight be 56, matey. Yo ho ho!"
CONV = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": QUESTION},
    {"role": "assistant", "content": ANSWER},
]
MULTI = [
    {"role": "user", "content": "Write a short poem about the sea."},
    {"role": "assistant", "content": "The sea is wide and blue and deep."},
    {"role": "user", "content": "Explain why the sky is blue."},
    {"role": "assistant", "content": "Arr! The sky be blue, matey."},
]
# an incremental template that never emits an end-of-turn token itself
PLAIN = (
    "{% for m in messages %}### {{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant\n{% endif %}"
)


def spans(tokenizer, enc, value=True) -> list[str]:
    """Decoded runs of consecutive tokens whose mask equals `value`."""
    out, cur = [], []
    for i, m in zip(enc.ids, enc.trained, strict=True):
        if m == value:
            cur.append(i)
        elif cur:
            out.append(tokenizer.decode(cur))
            cur = []
    if cur:
        out.append(tokenizer.decode(cur))
    return out


def test_chatml_trains_only_on_the_answer_and_its_end_of_turn(tokenizer):
    enc = ChatTemplate(tokenizer, CHATML).encode(CONV)
    assert len(enc.ids) == len(enc.trained)
    assert spans(tokenizer, enc) == [ANSWER + "<|im_end|>\n"]
    prompt = "".join(spans(tokenizer, enc, value=False))
    assert SYSTEM in prompt and QUESTION in prompt and "<|im_start|>assistant\n" in prompt
    assert tokenizer.decode(enc.ids) == prompt + ANSWER + "<|im_end|>\n"  # nothing lost, nothing added


def test_multi_turn_trains_on_every_assistant_turn(tokenizer):
    enc = ChatTemplate(tokenizer, CHATML).encode(MULTI)
    assert spans(tokenizer, enc) == [m["content"] + "<|im_end|>\n" for m in MULTI if m["role"] == "assistant"]
    untrained = "".join(spans(tokenizer, enc, value=False))
    for m in MULTI:
        assert (m["content"] in untrained) == (m["role"] == "user")


def test_train_on_prompt_trains_on_everything(tokenizer):
    template = ChatTemplate(tokenizer, CHATML)
    enc = template.encode(CONV, train_on_prompt=True)
    assert all(enc.trained)
    assert enc.ids == template.encode(CONV).ids  # same tokens, only the mask differs


def test_system_prompt_is_added_when_the_conversation_has_none(tokenizer):
    template = ChatTemplate(tokenizer, CHATML, system_prompt=SYSTEM)
    assert template.encode(CONV[1:]).ids == ChatTemplate(tokenizer, CHATML).encode(CONV).ids
    own = [{"role": "system", "content": "Be brief."}, *CONV[1:]]
    text = tokenizer.decode(template.encode(own).ids)
    assert "Be brief." in text and SYSTEM not in text


def test_builtin_alpaca_template_ends_responses_with_eos(tokenizer):
    enc = ChatTemplate(tokenizer, ALPACA).encode(CONV[1:])
    (trained,) = spans(tokenizer, enc)
    assert trained.startswith(ANSWER) and trained.rstrip().endswith(tokenizer.eos_token)
    trained_ids = [i for i, m in zip(enc.ids, enc.trained, strict=True) if m]
    assert trained_ids.count(tokenizer.eos_token_id) == 1  # from the template; none appended on top
    after_eos = trained_ids[trained_ids.index(tokenizer.eos_token_id) + 1 :]
    assert not tokenizer.decode(after_eos).strip()
    prompt = "".join(spans(tokenizer, enc, value=False))
    assert QUESTION in prompt and "### Response:" in prompt and ANSWER not in prompt


def test_custom_jinja_template_gets_eos_appended_to_each_response(tokenizer):
    label, source = resolve_template(PLAIN, tokenizer)
    assert label == "custom"
    enc = ChatTemplate(tokenizer, source).encode(MULTI)
    eos = tokenizer.eos_token
    assert spans(tokenizer, enc) == [m["content"] + "\n" + eos for m in MULTI if m["role"] == "assistant"]
    assert sum(i == tokenizer.eos_token_id for i in enc.ids) == 2


def test_non_incremental_template_is_a_clear_error(tokenizer):
    # the generation prompt says "Assistant:" but a rendered turn says "assistant:": not a prefix
    bad = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"
    )
    template = ChatTemplate(tokenizer, bad)
    with pytest.raises(DataError, match="growing prefixes"):
        template.encode(CONV)
    # such a template can't be trained on, but it still renders prompts for chatting with a model
    assert tokenizer.decode(template.prompt_ids(MULTI[:3])).endswith(
        "Explain why the sky is blue.\nAssistant:"
    )


def test_template_names(tokenizer):
    assert resolve_template("auto", tokenizer) == ("tokenizer", tokenizer.chat_template)
    assert resolve_template("alpaca", tokenizer) == ("alpaca", ALPACA)
    with pytest.raises(ConfigError, match="data.template"):
        resolve_template("llama3", tokenizer)
    with pytest.raises(ConfigError, match="not a valid Jinja template"):
        ChatTemplate(tokenizer, "{% for m in messages %}")


def test_template_raise_exception_is_a_data_error(tokenizer):
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}" + CHATML
    with pytest.raises(DataError, match="user first"):
        ChatTemplate(tokenizer, strict).encode(CONV)


@pytest.mark.parametrize("source", [CHATML, ALPACA, PLAIN], ids=["chatml", "alpaca", "custom"])
def test_inference_prompt_equals_training_tokens_before_the_response(tokenizer, source):
    template = ChatTemplate(tokenizer, source)
    enc = template.encode(CONV)
    first = enc.trained.index(True)
    assert template.prompt_ids(CONV[:-1]) == enc.ids[:first]
    # and for the second assistant turn of a multi-turn conversation
    enc = template.encode(MULTI)
    second = max(i for i in range(1, len(enc.trained)) if enc.trained[i] and not enc.trained[i - 1])
    assert template.prompt_ids(MULTI[:3]) == enc.ids[:second]


# ---------------------------------------------------------------- truncation and text windows


def test_truncation_keeps_partial_responses_and_drops_responses_cut_away(tokenizer):
    template = ChatTemplate(tokenizer, CHATML)
    enc = template.encode(CONV)
    first = enc.trained.index(True)
    recs = [Record("keep", messages=tuple(CONV)), Record("short", messages=tuple(CONV[1:]))]

    # one response token survives at position `first`: kept, truncated, exactly one label token
    ts = tokenize_records(recs, template, max_length=first + 1, train_on_prompt=False)
    assert ts.example_ids[0] == "keep" and len(ts.ids[0]) == first + 1
    assert ts.trained[0].sum() == 1 and list(ts.ids[0]) == enc.ids[: first + 1]
    assert ts.stats["examples_in"] == 2

    # the whole response is cut away: dropped and counted; the shorter conversation survives, truncated
    short = template.encode(CONV[1:])
    assert short.trained.index(True) < first < len(short.ids)
    ts = tokenize_records(recs, template, max_length=first, train_on_prompt=False)
    assert ts.example_ids == ["short"] and list(ts.ids[0]) == short.ids[:first]
    assert ts.stats["dropped_no_response"] == 1 and ts.stats["truncated"] >= 1
    assert all(m[1:].any() for m in ts.trained)

    # long enough for everything: nothing truncated or dropped
    ts = tokenize_records(recs, template, max_length=len(enc.ids), train_on_prompt=False)
    assert ts.stats["truncated"] == 0 and ts.stats["dropped_no_response"] == 0
    assert ts.example_ids == ["keep", "short"] and list(ts.ids[0]) == enc.ids


def test_truncation_counts(tokenizer):
    template = ChatTemplate(tokenizer, CHATML)
    first = template.encode(CONV).trained.index(True)
    recs = [Record(str(i), messages=tuple(CONV)) for i in range(3)]
    ts = tokenize_records(recs, template, max_length=first + 2, train_on_prompt=False)
    assert ts.stats == {
        "examples_in": 3,
        "truncated": 3,
        "dropped_no_response": 0,
        "truncated_ids": ["0", "1", "2"],
        "dropped_ids": [],
    }
    ts = tokenize_records(recs, template, max_length=first, train_on_prompt=False)
    assert len(ts) == 0 and ts.stats["dropped_no_response"] == 3


def test_plain_text_is_chunked_into_windows(tokenizer):
    text = " ".join(["The sea is wide and blue and deep."] * 6)
    full = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    max_length = 16
    assert len(full) > 2 * max_length
    windows = encode_text(tokenizer, text, max_length)
    assert all(len(w) == max_length for w in windows[:-1]) and 1 < len(windows[-1]) <= max_length
    joined = [t for w in windows for t in w]
    assert full[: len(joined)] == joined and len(full) - len(joined) <= 1  # at most a lone last token lost
    ts = tokenize_records([Record("doc", text=text)], ChatTemplate(tokenizer, CHATML), max_length, False)
    assert ts.example_ids == ["doc"] + [f"doc#{j}" for j in range(1, len(windows))]
    assert [list(x) for x in ts.ids] == windows
    assert all(m.all() for m in ts.trained)  # pre-training: every token carries loss


def test_parallel_tokenization_equals_serial(tokenizer, monkeypatch):
    import strop.data.tokenized as tokenized

    monkeypatch.setattr(tokenized, "PARALLEL_MIN_RECORDS", 10)
    template = ChatTemplate(tokenizer, CHATML)
    first = template.encode(CONV).trained.index(True)
    # varied lengths, some truncated and one whose response is cut away, in several chunks per worker
    recs = [Record(f"r{i}", messages=tuple(CONV[1:] if i % 7 else CONV)) for i in range(37)]
    recs += [Record("text", text="plain words " * 40)]
    serial = tokenize_records(recs, template, max_length=first, train_on_prompt=False, workers=1)
    parallel = tokenize_records(recs, template, max_length=first, train_on_prompt=False, workers=2)
    assert parallel.example_ids == serial.example_ids and len(serial) > 30
    assert all((a == b).all() for a, b in zip(parallel.ids, serial.ids, strict=True))
    assert all((a == b).all() for a, b in zip(parallel.trained, serial.trained, strict=True))
    assert parallel.stats == serial.stats and serial.stats["dropped_no_response"] == 6


def test_parallel_tokenization_reports_the_bad_record(tokenizer, monkeypatch):
    import strop.data.tokenized as tokenized

    monkeypatch.setattr(tokenized, "PARALLEL_MIN_RECORDS", 10)
    template = ChatTemplate(tokenizer, ALPACA)
    good = Record("ok", messages=({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}))
    bad = Record("bad", messages=({"role": "assistant", "content": "first"},), where="data.jsonl:17")
    with pytest.raises(DataError, match="data.jsonl:17"):
        tokenize_records([good] * 20 + [bad], template, max_length=64, train_on_prompt=False, workers=2)

"""`strop serve` under generated hostile bodies: whatever a client sends to /v1/chat/completions or
/v1/completions, the answer is a 2xx reply or a 4xx OpenAI error body, the server logs no traceback,
and it answers the next client.

The bodies are valid-ish JSON: the right field names with values of random type (huge ints, 1e-300,
NaN and Infinity as literals and as strings, empty lists, nested junk), sometimes an unknown field."""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from strop.serve.limits import Limits
from test_serve import lively, running  # noqa: F401 - fixture

NASTY = [0, 1, -1, 2, 3, 2.0000001, 0.5, 1e-300, 5e-324, -1e-300, 1e308, 2**63 - 1, 2**63, -(2**63)]
NASTY += [-(2**63) - 1, 2**64, 2**70, 10**40, math.nan, math.inf, -math.inf, "nan", "inf", "-Infinity"]
NASTY += ["1e-300", "3", "", True, False, None, [], {}, [[]], {"": None}]
junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
nasty = st.sampled_from(NASTY) | junk
any_text = st.text(max_size=12)  # any code point, lone surrogates included
role = st.sampled_from(["system", "developer", "user", "assistant"])
message = st.fixed_dictionaries(
    {
        "role": role,
        "content": any_text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": any_text})),
    },
    optional={"name": any_text},
)
nasty_messages = st.lists(
    st.fixed_dictionaries({"role": role | nasty, "content": any_text | nasty}, optional={"tool_calls": junk}),
    max_size=2,
)
common = {  # values the server takes; the test then breaks a few fields
    "max_tokens": st.integers(1, 4),
    "temperature": st.floats(0, 2),  # subnormal temperatures included
    "top_p": st.floats(0, 1, exclude_min=True),
    "n": st.integers(1, 2),
    "stop": st.text(min_size=1, max_size=6) | st.lists(st.text(min_size=1, max_size=6), max_size=4),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "user": any_text,
    "presence_penalty": st.just(0.0),
    "frequency_penalty": st.just(0.0),
    "logprobs": st.sampled_from([None, False]),
    "logit_bias": st.just({}),
}
chat = st.fixed_dictionaries(
    {"messages": st.lists(message, min_size=1, max_size=3)},
    optional=common | {"max_completion_tokens": st.integers(1, 4)},
)
completion = st.fixed_dictionaries(
    {"prompt": any_text | st.lists(any_text, min_size=1, max_size=3)},
    optional=common | {"echo": st.just(False), "suffix": st.just(""), "best_of": st.just(1)},
)
MODEL = "lively-llama"  # test_serve's `lively` model folder


@st.composite
def requests(draw) -> tuple[str, dict]:
    """A body the server takes, then none, one or two of its fields (or an unknown one) made nasty."""
    route = draw(st.sampled_from(["chat/completions", "completions"]))
    body = draw(chat if route == "chat/completions" else completion) | {"model": MODEL}
    for name in draw(st.lists(st.sampled_from(sorted(body) + ["bogus"]), max_size=2, unique=True)):
        body[name] = draw(nasty_messages if name == "messages" else nasty)
    return route, body


def _chat(**fields) -> tuple[str, dict]:
    return "chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]} | fields


@pytest.fixture(scope="module")
def fuzzed(lively):  # noqa: F811
    assert lively.name == MODEL
    with running(lively, limits=Limits(max_tokens=16, n=2, queue=6, max_batch=4)) as s:
        yield s


def _send(url: str, data: bytes) -> tuple[int, str, str]:
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers.get("content-type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read().decode()


def _check_reply(status: int, kind: str, text: str) -> None:
    if status >= 400:
        assert 400 <= status < 500, (status, text)
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
        return
    assert status == 200, (status, text)
    if kind.startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", text
        for event in events[:-1]:
            assert "error" not in json.loads(event), event
    else:
        assert json.loads(text)["choices"], text


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=requests())
@example(case=_chat(temperature=1e-300, max_tokens=4))  # the known poisons of issue 31
@example(case=_chat(temperature=1.0, seed=2**70))
@example(case=_chat(temperature=1.0, seed=-(2**63) - 1))
@example(case=("completions", {"model": MODEL, "prompt": []}))
def test_generated_bodies_get_a_reply_or_a_4xx_and_never_a_traceback(fuzzed, case):
    route, body = case
    status, kind, text = _send(f"{fuzzed.url}/v1/{route}", json.dumps(body).encode())  # NaN as a literal
    _check_reply(status, kind, text)
    assert "Traceback" not in fuzzed.log.text and "Exception" not in fuzzed.log.text, fuzzed.log.text


def test_after_the_fuzz_the_server_still_answers(fuzzed, lively):  # noqa: F811
    body = {"model": lively.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    status, _, text = _send(fuzzed.url + "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200 and json.loads(text)["choices"][0]["message"]["content"] is not None
    deadline = time.time() + 10
    while fuzzed.engine.load and time.time() < deadline:  # the last reply's row leaves just after it
        time.sleep(0.01)
    assert fuzzed.engine.load == 0 and "Traceback" not in fuzzed.log.text

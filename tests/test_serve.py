"""`strop serve`, tested with a client we did not write: the `openai` package, against a real uvicorn
server on loopback (tiny models; the packaged model in bench/serve.py)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest

from conftest import assert_user_error, run_cli, tiny_config, write_jsonl
from strop.models.generate import generate
from strop.models.inference import load_for_inference
from strop.recipes.sft import train
from strop.serve.limits import Limits
from strop.serve.run import bind, build
from test_models import _lively_dir, train_run

HELLO = [{"role": "user", "content": "hello there"}]
STORY = [{"role": "user", "content": "write a long story about the sea and the ships"}]


def raw(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """A request without the openai client: (status, JSON body)."""
    req = urllib.request.Request(
        url, data=data, headers=headers or {}, method="POST" if data is not None else "GET"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def lively(tmp_path_factory) -> Path:
    return _lively_dir(tmp_path_factory.mktemp("serve"), "llama")


class _Log(logging.Handler):
    """The server's log lines, tracebacks included (uvicorn logs an ASGI app's exception this way)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@contextmanager
def running(target, adapters=None, limits=None, api_key=None, quantize=None, rag=None):
    """A live server on loopback; `.log` holds what it logged (uvicorn's loggers, engine-thread crashes)."""
    import uvicorn

    limits = limits or Limits()
    app, engine, variants = build(
        str(target), adapters or {}, limits, api_key, device="cpu", quantize=quantize, rag=rag
    )
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client = openai.OpenAI(base_url=url + "/v1", api_key=api_key or "none", max_retries=0, timeout=60)
    log = _Log()
    logger = logging.getLogger("uvicorn")  # uvicorn.error and uvicorn.asgi propagate to it
    logger.addHandler(log)  # after uvicorn's own logging setup, which replaces handlers
    hook = threading.excepthook
    threading.excepthook = lambda args: log.lines.append(f"thread {args.thread}: {args.exc_value!r}")
    try:
        yield SimpleNamespace(url=url, client=client, engine=engine, variants=variants, log=log)
    finally:
        server.should_exit = True
        thread.join(30)
        threading.excepthook = hook
        logger.removeHandler(log)


@pytest.fixture(scope="module")
def served(lively):
    with running(lively, limits=Limits(max_tokens=64, queue=16, max_batch=4)) as s:
        yield s


def _reference(target, conversation, **kw) -> str:
    loaded = load_for_inference(str(target), device="cpu")
    return generate(loaded.model, loaded.template, [conversation], **kw)[0]


def test_models_and_health(served, lively):
    assert [m.id for m in served.client.models.list()] == [lively.name]
    status, health = raw(served.url + "/health")
    assert status == 200
    assert health["status"] == "ok" and health["models"] == [lively.name]


def test_greedy_chat_is_strops_greedy_reply(served, lively):
    out = served.client.chat.completions.create(
        model=lively.name, messages=HELLO, max_tokens=12, temperature=0
    )
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.message.content.strip() == _reference(lively, HELLO, max_new_tokens=12)
    assert choice.finish_reason in ("stop", "length") and out.model == lively.name
    prompt = served.variants[lively.name].template.prompt_ids(HELLO)
    assert out.usage.prompt_tokens == len(prompt) and 1 <= out.usage.completion_tokens <= 12


def test_streamed_deltas_join_to_the_non_streamed_reply(served, lively):
    kw = dict(model=lively.name, messages=STORY, max_tokens=20, temperature=0)
    whole = served.client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(
        served.client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 1, "the reply came in one piece"
    assert "".join(deltas) == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"] or finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_stop_strings_end_the_reply_before_them(served, lively):
    kw = dict(model=lively.name, messages=STORY, max_tokens=30, temperature=0)
    free = served.client.chat.completions.create(**kw).choices[0].message.content
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    assert stop.strip(), free
    cut = served.client.chat.completions.create(**kw, stop=[stop]).choices[0]
    assert cut.message.content == free[: free.find(stop)] and cut.finish_reason == "stop"
    streamed = served.client.chat.completions.create(**kw, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut.message.content


def test_n_choices_and_seeds_reproduce(served, lively):
    kw = dict(model=lively.name, messages=STORY, max_tokens=10, temperature=1.0, n=3, seed=11)
    a = [c.message.content for c in served.client.chat.completions.create(**kw).choices]
    b = [c.message.content for c in served.client.chat.completions.create(**kw).choices]
    assert len(a) == 3 and a == b and len(set(a)) > 1
    c = [c.message.content for c in served.client.chat.completions.create(**{**kw, "seed": 12}).choices]
    assert c != a


def test_completions_continue_the_raw_text(served, lively):
    from strop.models.engine import Engine, Request

    out = served.client.completions.create(
        model=lively.name, prompt=["the sea", "ships"], max_tokens=8, temperature=0
    )
    loaded = load_for_inference(str(lively), device="cpu")
    for choice, text in zip(out.choices, ["the sea", "ships"], strict=True):
        req = Request(loaded.tokenizer(text)["input_ids"], max_new_tokens=8)
        Engine(loaded.model, loaded.tokenizer, loaded.template.stop_ids).run([req])
        assert choice.text == req.text and choice.finish_reason in ("stop", "length")
    assert [c.index for c in out.choices] == [0, 1]


def test_concurrent_requests_are_decoded_together(served, lively):
    widths = []
    original = served.engine._decode

    def watch():
        widths.append(len(served.engine.rows))
        original()

    served.engine._decode = watch
    try:
        replies: list = [None] * 4

        def ask(i):
            msg = [{"role": "user", "content": f"story number {i} about ships"}]
            replies[i] = served.client.chat.completions.create(
                model=lively.name, messages=msg, max_tokens=30, temperature=0
            )

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        served.engine._decode = original
    assert all(r is not None for r in replies) and max(widths) > 1
    for i, r in enumerate(replies):
        msg = [{"role": "user", "content": f"story number {i} about ships"}]
        assert r.choices[0].message.content.strip() == _reference(lively, msg, max_new_tokens=30)


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(n=9), "n: at most 8"),
        (dict(max_tokens=65), "max_tokens: at most 64"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop: at most 4"),
        (dict(frequency_penalty=0.5), "frequency_penalty: not supported"),
        (dict(extra_body={"bogus": 1}), "bogus: unknown field"),
        (dict(temperature=3.0), "temperature"),
        (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages.0.role"),
        (dict(messages=[{"role": "user", "content": "word " * 400}]), "at most"),
    ],
)
def test_bad_requests_are_400s_naming_the_field(served, lively, kw, needle):
    with pytest.raises(openai.BadRequestError) as e:
        served.client.chat.completions.create(**{"model": lively.name, "messages": HELLO, **kw})
    assert needle in e.value.message and e.value.status_code == 400
    assert e.value.body["message"].startswith(e.value.body["message"]) and "Traceback" not in e.value.message


@pytest.mark.parametrize("kw, needle", [(dict(echo=True), "echo"), (dict(logprobs=2), "logprobs")])
def test_completion_settings_the_server_cannot_honour_are_refused_by_name(served, lively, kw, needle):
    with pytest.raises(openai.BadRequestError) as e:
        served.client.completions.create(model=lively.name, prompt="the sea", **kw)
    assert f"{needle}: not supported" in e.value.message


def test_unknown_model_is_a_404_listing_the_served_ones(served, lively):
    with pytest.raises(openai.NotFoundError) as e:
        served.client.chat.completions.create(model="gpt-4", messages=HELLO)
    assert lively.name in e.value.message and e.value.code == "model_not_found"


def test_malformed_and_oversized_bodies_are_400s(lively):
    with running(lively, limits=Limits(body_bytes=2000)) as s:
        url = s.url + "/v1/chat/completions"
        for data in (b"{not json", b"[]", json.dumps({"model": lively.name}).encode(), b"x" * 5000):
            status, body = raw(url, data, {"content-type": "application/json"})
            assert status == 400, (data[:20], body)
            assert set(body["error"]) >= {"message", "type", "param", "code"}
        status, body = raw(s.url + "/v1/nothing")
        assert status == 404 and "error" in body


def test_a_full_queue_is_a_429_and_a_request_larger_than_the_queue_a_400(lively):
    with running(lively, limits=Limits(queue=3, max_batch=2, max_tokens=40)) as s:
        with pytest.raises(openai.BadRequestError) as e:  # it can never fit: a 429 would be retried forever
            s.client.chat.completions.create(model=lively.name, messages=HELLO, n=4)
        assert e.value.body["param"] == "n" and "at most 3" in e.value.message
        outcomes: list = []
        retry_after: list = []

        def ask():
            try:
                s.client.chat.completions.create(
                    model=lively.name, messages=STORY, max_tokens=40, temperature=0
                )
                outcomes.append("ok")
            except openai.RateLimitError as e:
                outcomes.append(429)
                retry_after.append((e.response.headers["retry-after"], e.code))
            except Exception as e:  # noqa: BLE001
                outcomes.append(repr(e))

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert set(outcomes) <= {"ok", 429} and outcomes.count("ok") >= 3 and 429 in outcomes, outcomes
    assert set(retry_after) == {("1", "rate_limit_exceeded")}


def test_an_api_key_guards_every_route_but_health(lively):
    with running(lively, api_key="sekrit") as s:
        assert s.client.models.list().data[0].id == lively.name
        wrong = openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model=lively.name, messages=HELLO)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert raw(s.url + "/health")[0] == 200
        assert raw(s.url + "/v1/models")[0] == 401


def test_adapters_are_selected_by_model_name_on_one_base(lively, alpaca_file, tmp_path):
    runs = {
        name: train_run(
            lively, alpaca_file, tmp_path / name, optim={"lr": lr}, train={"max_steps": 8}
        ).run_dir
        for name, lr in (("first", 3e-2), ("second", 1e-1))
    }
    with running(lively, adapters={k: str(v) for k, v in runs.items()}) as s:
        assert [m.id for m in s.client.models.list()] == [lively.name, "first", "second"]
        got = {
            name: s.client.chat.completions.create(model=name, messages=STORY, max_tokens=12, temperature=0)
            .choices[0]
            .message.content.strip()
            for name in (lively.name, "first", "second")
        }
    want = {name: _reference(run, STORY, max_new_tokens=12) for name, run in runs.items()}
    want[lively.name] = _reference(lively, STORY, max_new_tokens=12)
    assert got == want
    assert len(set(want.values())) == 3, "the adapters should reply differently for this test to mean much"


def test_an_adapter_on_another_base_is_refused_by_name(lively, tiny_llama, alpaca_file, tmp_path, capsys):
    run = train_run(tiny_llama, alpaca_file, tmp_path / "other").run_dir
    rc, _, err = run_cli(["serve", str(lively), "--adapter", f"x={run}", "--port", "0"], capsys)
    assert_user_error(rc, err, "--adapter x=", "share the served model's base")


def test_the_server_renders_and_stops_with_the_runs_own_template(lively, tmp_path):
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}<<U>> {{ m['content'] }}\n"
        "{% elif m['role'] == 'assistant' %}<<A>> {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<<A>> {% endif %}"
    )
    data = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": f"say {i}", "completion": f"ok {i}"} for i in range(20)]
    )
    cfg = tiny_config(lively, data, tmp_path / "runs", train={"max_steps": 2})
    cfg["data"]["template"] = template
    run = train(cfg, show_progress=False)
    trained = load_for_inference(str(run.run_dir), device="cpu").template
    reply = {"role": "assistant", "content": "ok 3"}
    encoded = trained.encode([{"role": "user", "content": "say 3"}, reply])
    prompt_part = encoded.ids[: encoded.trained.index(True)]
    with running(run.run_dir) as s:
        seen = []
        submit = s.engine.submit
        s.engine.submit = lambda job: (seen.append(job), submit(job))[1]
        head = s.engine.model.get_output_embeddings()
        eos = trained.tokenizer.eos_token_id
        calls = []

        def force_end(module, args, output):
            calls.append(1)
            if len(calls) == 3:
                output = output.clone()
                output[..., eos] = 1e4
            return output

        handle = head.register_forward_hook(force_end)
        try:
            out = s.client.chat.completions.create(
                model=run.run_dir.name,
                messages=[{"role": "user", "content": "say 3"}],
                max_tokens=20,
                temperature=0,
            )
        finally:
            handle.remove()
    assert seen[0].prompt == prompt_part
    assert trained.tokenizer.decode(seen[0].prompt) == "<<U>> say 3\n<<A>> "  # the template, by hand
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 3
    assert "<|im_end|>" not in out.choices[0].message.content


def test_a_non_loopback_bind_needs_an_api_key(lively, capsys, monkeypatch):
    monkeypatch.delenv("STROP_API_KEY", raising=False)
    rc, _, err = run_cli(["serve", str(lively), "--host", "0.0.0.0"], capsys)
    assert_user_error(rc, err, "--host 0.0.0.0", "--api-key", "STROP_API_KEY")


def test_a_taken_port_is_a_clear_error(lively, capsys):
    sock = bind("127.0.0.1", 0)
    try:
        rc, _, err = run_cli(["serve", str(lively), "--port", str(sock.getsockname()[1])], capsys)
    finally:
        sock.close()
    assert_user_error(rc, err, "--port", "cannot listen")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_stream_in_flight_then_exits_cleanly(lively, sig):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "strop", "serve", str(lively), "--port", "0", "--device", "cpu"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        url = None
        for line in proc.stderr:
            found = re.search(r"at (http://\S+)/v1", line)
            if found:
                url = found.group(1)
                break
        assert url, "no address printed"
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        stream = client.chat.completions.create(
            model=lively.name, messages=STORY, max_tokens=60, temperature=0, stream=True
        )
        chunks = [next(stream), next(stream)]
        proc.send_signal(sig)
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert text.strip() == _reference(lively, STORY, max_new_tokens=60)
        rc = proc.wait(60)
        rest = proc.stderr.read()
        assert rc == 0 and "stopped" in rest and "Traceback" not in rest, rest
    finally:
        proc.kill()


def _post(url: str, body: dict | str) -> tuple[int, dict]:
    data = body if isinstance(body, str) else json.dumps(body)
    return raw(url, data.encode(), {"content-type": "application/json"})


@pytest.mark.parametrize(
    "route, fields, param",
    [
        ("chat", {"seed": 2**70}, "seed"),
        ("chat", {"seed": -(2**63) - 1}, "seed"),
        ("chat", {"temperature": "nan"}, "temperature"),
        ("chat", '"temperature": NaN', "temperature"),
        ("chat", {"temperature": -1e-300}, "temperature"),
        ("chat", {"top_p": 0}, "top_p"),
        ("chat", {"top_p": "Infinity"}, "top_p"),
        ("chat", {"presence_penalty": "-inf"}, "presence_penalty"),
        ("chat", {"logit_bias": {"5": "nan"}}, "logit_bias.5"),
        (
            "chat",
            {"messages": [{"role": "user", "content": [{"type": "image"}]}]},
            "messages.0.content.0.type",
        ),
        ("completions", {"prompt": []}, "prompt"),
        ("completions", {"prompt": ["a", 5]}, "prompt.1"),
        ("completions", {"Str": 1}, "Str"),  # an unknown field named like a union member is still named
        ("completions", {"prompt": ["the sea"] * 17}, "prompt"),  # more than the queue holds: never fits
    ],
)
def test_a_request_that_cannot_be_decoded_is_a_400_naming_the_field(served, lively, route, fields, param):
    base = {"model": lively.name}
    base |= {"messages": HELLO} if route == "chat" else {"prompt": "the sea"}
    if isinstance(fields, str):  # a literal the json module will not write
        body: dict | str = json.dumps(base)[:-1] + ", " + fields + "}"
    else:
        body = base | fields
    status, reply = _post(f"{served.url}/v1/{'chat/' if route == 'chat' else ''}completions", body)
    assert status == 400 and reply["error"]["param"] == param, reply
    assert reply["error"]["type"] == "invalid_request_error" and "Traceback" not in served.log.text


def _while_two_decode(s, name: str, intruders: list) -> tuple[list[str], list]:
    """Two 50-token requests (greedy, and seeded sampling) stream while the engine is slowed to 20 ms a
    step; once both are under way each intruder(s) runs in turn. The two texts and the intruders'
    outcomes; the two must still be decoding when the intruders are done."""
    kws = [
        dict(messages=STORY, max_tokens=50, temperature=0),
        dict(messages=HELLO, max_tokens=50, temperature=1.0, seed=5),
    ]
    texts: list = [None, None]
    started = [threading.Event(), threading.Event()]
    original = s.engine._decode
    s.engine._decode = lambda: (time.sleep(0.02), original())[1]

    def consume(k):
        pieces = []
        for chunk in s.client.chat.completions.create(model=name, stream=True, **kws[k]):
            pieces.append(chunk.choices[0].delta.content or "")
            if "".join(pieces):
                started[k].set()
        texts[k] = "".join(pieces)

    threads = [threading.Thread(target=consume, args=(k,)) for k in range(2)]
    try:
        for t in threads:
            t.start()
        assert all(e.wait(30) for e in started)
        outcomes = [intrude(s) for intrude in intruders]
        assert all(t.is_alive() for t in threads), "the intruders did not overlap the decoding requests"
        for t in threads:
            t.join(60)
    finally:
        s.engine._decode = original
    alone = [s.client.chat.completions.create(model=name, **kw).choices[0].message.content for kw in kws]
    assert texts == alone and all(len(t) > 20 for t in alone), (texts, alone)
    return texts, outcomes


def _status(s, name, **kw):
    try:
        out = s.client.chat.completions.create(model=name, messages=HELLO, max_tokens=6, **kw)
        return out.choices[0].message.content
    except openai.APIStatusError as e:
        return e.status_code, e.body.get("param"), e.message


def test_a_tiny_temperature_or_a_huge_seed_fails_nobody_decoding_beside_it(served, lively):
    greedy = _status(served, lively.name, temperature=0)
    _, outcomes = _while_two_decode(
        served,
        lively.name,
        [
            lambda s: _status(s, lively.name, temperature=1e-300, seed=1),
            lambda s: _status(s, lively.name, temperature=1e-300),
            lambda s: _status(s, lively.name, temperature=1.0, seed=2**70),
            lambda s: _status(s, lively.name, temperature=1.0, seed=-(2**63)),
        ],
    )
    assert outcomes[:2] == [greedy, greedy]  # a tiny temperature is greedy in effect
    assert outcomes[2][:2] == (400, "seed") and isinstance(outcomes[3], str)
    assert "Traceback" not in served.log.text


def test_a_request_failing_in_the_engine_fails_alone(served, lively):
    """Poisoned past the door (its draw raises in the engine): a 500 for it, its own text for the others."""
    original = served.engine._draw

    def draw(logits, row):
        if row.req.seed == 666:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return original(logits, row)

    served.engine._draw = draw
    try:
        _, outcomes = _while_two_decode(
            served, lively.name, [lambda s: _status(s, lively.name, temperature=1.0, seed=666)]
        )
    finally:
        served.engine._draw = original
    status, _, message = outcomes[0]
    assert status == 500 and "generation failed: RuntimeError" in message


def test_a_client_gone_mid_body_leaves_no_traceback(served, lively):
    import socket

    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            "content-length: 5000\r\n\r\n"
        )
        conn.sendall(head.encode() + b'{"model": "' + lively.name.encode())
        time.sleep(0.3)  # the handler is reading the body
    time.sleep(0.5)
    assert raw(served.url + "/health")[0] == 200
    assert "Traceback" not in served.log.text and "Exception" not in served.log.text, served.log.text

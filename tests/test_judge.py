"""LLM-as-judge (eval/judge.py) through the openai client: against a scripted OpenAI-compatible judge on
loopback (verdicts, injected 500/429, a 401, what reaches the server) and against a real `strop serve`
of a tiny model (both orders sent, its free text counted as unparsed, the cache)."""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from strop.core.errors import ConfigError, StropError
from strop.core.judge_config import JudgeConfig
from strop.eval.judge import Judge, compare, grade, rating, render, verdict
from strop.serve.run import bind

QUESTIONS = [f"Question {i}: say something to sailor {i}." for i in range(6)]
PLAIN = [f"Hello sailor {i}." for i in range(6)]
VOICE = [f"Arr! Ahoy sailor {i}, yo ho ho!" for i in range(6)]


@contextmanager
def scripted_judge(answer, failures=()):
    """A loopback OpenAI-compatible judge: `answer(prompt) -> text`; `failures`, a list of HTTP statuses
    the first requests get instead (429s with Retry-After: 0)."""
    import uvicorn

    seen = SimpleNamespace(prompts=[], auth=[], failures=list(failures))
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "scripted", "object": "model", "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.auth.append(request.headers.get("authorization"))
        if seen.failures:
            status = seen.failures.pop(0)
            headers = {"retry-after": "0"} if status == 429 else {}
            return JSONResponse({"error": {"message": f"injected {status}"}}, status, headers=headers)
        prompt = body["messages"][-1]["content"]
        seen.prompts.append(prompt)
        text = answer(prompt)
        return {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
        }

    sock = bind("127.0.0.1", 0)
    # log_config=None: uvicorn's dictConfig would close every logging handler ever made, absl's among
    # them (imported with rouge_score), and absl's close() closes the stream it was made with: pytest's
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline
        time.sleep(0.02)
    seen.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    try:
        yield seen
    finally:
        server.should_exit = True
        thread.join(30)


def first_answer(prompt: str) -> str:
    """The prompt's Assistant A answer."""
    return prompt.split("[The Start of Assistant A's Answer]\n", 1)[1].split("\n[The End", 1)[0]


def judge_for(url: str, tmp_path, **cfg) -> Judge:
    return Judge(
        JudgeConfig(endpoint=url, **cfg), cache_path=tmp_path / "judgments.sqlite", sleep=lambda s: None
    )


def test_a_judge_that_always_says_a_gives_half_with_position_bias_one(tmp_path):
    with scripted_judge(lambda p: "Assistant A is better. [[A]]") as server:
        out = compare(judge_for(server.url, tmp_path), QUESTIONS, PLAIN, VOICE)
    assert out["judged"] == 6 and out["unparsed"] == 0
    assert out["win_rate"] == 0.5 and out["ci"] == [0.5, 0.5]
    assert out["position_bias"] == 1.0 and out["consistency"] == 0.0 and out["disagreements"] == 6
    assert out["wins"] == {"a": 0, "b": 0, "tie": 6}
    # both orders were asked: every pair once with each reply first
    firsts = sorted(first_answer(p) for p in server.prompts)
    assert firsts == sorted(PLAIN + VOICE) and len(server.prompts) == 12


def test_a_judge_that_prefers_the_voice_finds_it_in_either_position_and_a_rerun_is_cached(tmp_path):
    def prefers_voice(prompt: str) -> str:
        return "[[A]]" if first_answer(prompt).startswith("Arr!") else "I prefer the second. [[B]]"

    with scripted_judge(prefers_voice) as server:
        judge = judge_for(server.url, tmp_path)
        out = compare(judge, QUESTIONS, PLAIN, VOICE)
        assert out["win_rate"] == 1.0 and out["wins"]["b"] == 6 and out["position_bias"] == 0.0
        assert out["consistency"] == 1.0 and out["usage"]["requests"] == 13  # 12 + the model list
        again = compare(judge_for(server.url, tmp_path), QUESTIONS, PLAIN, VOICE)
        assert again["win_rate"] == 1.0 and len(server.prompts) == 12  # nothing sent again
        assert again["usage"]["cache_hits"] == 12
        flipped = compare(judge, QUESTIONS, VOICE, PLAIN)  # the same pairs, a and b swapped
        assert flipped["win_rate"] == 0.0 and len(server.prompts) == 12  # the same judge prompts: cached


def test_429s_and_500s_are_tried_again_and_a_401_stops_at_once(tmp_path):
    with scripted_judge(lambda p: "[[C]]", failures=[500, 429, 503]) as server:
        sleeps = []
        judge = Judge(
            JudgeConfig(endpoint=server.url, model="scripted", concurrency=1, cache=False),
            sleep=sleeps.append,
        )
        out = compare(judge, QUESTIONS[:2], PLAIN[:2], VOICE[:2])
        assert out["win_rate"] == 0.5 and out["wins"]["tie"] == 2 and out["consistency"] == 1.0
        assert out["usage"]["retries"] == 3 and out["usage"]["requests"] == 7
        assert sleeps == [0.5, 0.0, 2.0]  # backoff, the 429's Retry-After: 0, backoff
    with scripted_judge(lambda p: "[[A]]", failures=[500] * 3) as server:
        judge = Judge(
            JudgeConfig(endpoint=server.url, model="scripted", retries=2, cache=False), sleep=lambda s: None
        )
        with pytest.raises(
            StropError, match=r"judge http://127.0.0.1:\d+/v1: HTTP 500: injected 500, 3 tries"
        ):
            judge.ask("prompt")
    with scripted_judge(lambda p: "[[A]]", failures=[401]) as server:
        judge = Judge(JudgeConfig(endpoint=server.url, model="scripted", cache=False), sleep=lambda s: None)
        with pytest.raises(StropError, match="HTTP 401: injected 401") as e:
            judge.ask("prompt")
        assert judge.usage.requests == 1 and "\n" not in str(e.value)


def test_verdicts_it_cannot_read_are_counted_not_guessed(tmp_path):
    answers = iter(["[[A]]", "no idea", "[[B]]", "[[A]]", "[[ C ]]", "[[C]]"] * 2)
    lock = threading.Lock()

    def judge_text(prompt: str) -> str:
        with lock:
            return next(answers)

    with scripted_judge(judge_text) as server:
        judge = Judge(
            JudgeConfig(endpoint=server.url, concurrency=1),
            cache_path=tmp_path / "j.sqlite",
            sleep=lambda s: None,
        )
        out = compare(judge, QUESTIONS[:3], PLAIN[:3], VOICE[:3])
    # pair 0: "no idea"; pair 1: B with a first, A with b first (b both times); pair 2: a tie
    assert out["unparsed"] == 1 and out["judged"] == 2
    assert out["per_prompt"][0] == {"verdicts": ["A", None], "winner": None}
    assert out["wins"] == {"a": 0, "b": 1, "tie": 1} and out["win_rate"] == 0.75


def test_grades_on_a_rubric_and_out_of_range_grades_are_unparsed(tmp_path):
    grades = {
        "Hello sailor 0.": "Rating: [[3]]",
        "Hello sailor 1.": "Rating: [[9]]",
        "Hello sailor 2.": "[[11]]",
    }
    with scripted_judge(lambda p: next(v for k, v in grades.items() if k in p)) as server:
        judge = judge_for(server.url, tmp_path, rubric="pirate voice")
        out = grade(judge, QUESTIONS[:3], PLAIN[:3], references=["Arr!", None, None])
        first = next(p for p in server.prompts if "Hello sailor 0." in p)  # requests arrive in any order
        assert "Consider pirate voice." in first and "[Reference Answer]\nArr!" in first
        assert all("[Reference Answer]" not in p for p in server.prompts if p != first)
    assert (
        out["graded"] == 2
        and out["unparsed"] == 1
        and out["mean"] == 6.0
        and out["grades"] == [3.0, 9.0, None]
    )


def test_the_key_comes_from_the_environment_and_is_written_nowhere(tmp_path, monkeypatch, caplog):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("STROP_TEST_JUDGE_KEY", secret)
    caplog.set_level(logging.DEBUG)
    with scripted_judge(lambda p: "[[B]]") as server:
        judge = judge_for(server.url, tmp_path, api_key_env="STROP_TEST_JUDGE_KEY")
        compare(judge, QUESTIONS[:2], PLAIN[:2], VOICE[:2])
        assert set(server.auth) == {f"Bearer {secret}"}
    assert secret.encode() not in (tmp_path / "judgments.sqlite").read_bytes()
    assert secret not in caplog.text
    monkeypatch.delenv("STROP_TEST_JUDGE_KEY")
    with pytest.raises(
        ConfigError, match="judge.api_key_env: the environment variable STROP_TEST_JUDGE_KEY is not set"
    ):
        judge_for(server.url, tmp_path, api_key_env="STROP_TEST_JUDGE_KEY")


def test_a_key_in_the_config_file_is_refused():
    with pytest.raises(ValidationError, match="api_key: a key is never read from a config file"):
        JudgeConfig.model_validate({"endpoint": "http://x/v1", "api_key": "sk-1"})


def test_parsing_and_templates_by_hand():
    assert verdict("A is better [[A]] ... on reflection [[B]]") == "B" and verdict("[[D]]") is None
    assert rating("Rating: [[7.5]]") == 7.5 and rating("Rating: [[0]]") is None and rating("7") is None
    text = render("{question} {answer} {unknown} {reference_block}", question="q", answer="{answer_a}")
    assert text == "q {answer_a} {unknown} "  # a reply's own braces are not filled again


def test_a_real_strop_serve_as_the_judge(tmp_path_factory, tmp_path):
    """A tiny random model cannot judge: its replies carry no [[X]], and every one is counted unparsed."""
    from test_models import _lively_dir
    from test_serve import running

    model = _lively_dir(tmp_path_factory.mktemp("judge"), "llama")
    short = tmp_path / "short.txt"  # the tiny model's context is 256 tokens; the shipped prompt is longer
    short.write_text("Better? [[A]] or [[B]]\n{question}\nA: {answer_a}\nB: {answer_b}")
    with running(model) as server:
        judge = judge_for(server.url + "/v1", tmp_path, max_tokens=8, pairwise_template=str(short))
        out = compare(judge, QUESTIONS[:2], PLAIN[:2], VOICE[:2])
        assert judge.model == model.name and out["unparsed"] == 2 and out["win_rate"] is None
        assert out["usage"]["requests"] == 5 and out["usage"]["completion_tokens"] > 0  # 4 + the list
        again = compare(
            judge_for(server.url + "/v1", tmp_path, max_tokens=8, pairwise_template=str(short)),
            QUESTIONS[:2],
            PLAIN[:2],
            VOICE[:2],
        )
        assert again["usage"]["cache_hits"] == 4 and again["usage"]["requests"] == 1


def test_strop_judge_compare_and_check_from_the_command_line(tmp_path, capsys):
    from conftest import run_cli, write_jsonl

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    write_jsonl(
        run / "eval" / "samples.jsonl",
        [
            {"id": str(i), "input": q, "reference": v, "base": p, "tuned": v}
            for i, (q, p, v) in enumerate(zip(QUESTIONS, PLAIN, VOICE, strict=True))
        ],
    )
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": q, "chosen": v, "rejected": p} for q, p, v in zip(QUESTIONS, PLAIN, VOICE, strict=True)],
    )

    def prefers_voice(prompt: str) -> str:
        return "[[A]]" if first_answer(prompt).startswith("Arr!") else "[[B]]"

    with scripted_judge(prefers_voice) as server:
        out = tmp_path / "judged.json"
        rc, stdout, err = run_cli(
            ["judge", "compare", str(run), "--judge", server.url, "--out", str(out)], capsys
        )
        assert rc == 0, err
        assert "tuned win rate over base 1.000 (95% CI 1.000 to 1.000) over 6 prompts" in stdout
        assert "position bias 0.00" in stdout and "unreadable verdicts 0 of 6" in stdout
        assert json.loads(out.read_text())["wins"] == {"a": 0, "b": 6, "tie": 0}
        rc, _, err = run_cli(["judge", "compare", str(run), "--judge", server.url, "--out", str(out)], capsys)
        assert rc == 2 and "--out" in err and "--force" in err  # nothing replaced silently
        rc, stdout, err = run_cli(
            ["judge", "check", str(pairs), "--judge", server.url, "--limit", "4"], capsys
        )
        assert rc == 0, err
        assert "agreement with the chosen reply 1.000" in stdout and "over 4 prompts" in stdout


# -- the judge at work: the end of a run, `strop eval --judge`, a served run as the judge -------------


def grades_voice(prompt: str) -> str:
    """A rubric judge: 9 for a reply in the pirate voice, 2 otherwise; pairwise, it prefers the voice."""
    if "[The Start of Assistant A's Answer]" in prompt:
        return "[[A]]" if "Arr" in first_answer(prompt) else "[[B]]"
    answer = prompt.split("[The Start of Assistant's Answer]\n", 1)[1].split("\n[The End", 1)[0]
    return "Rating: [[9]]" if "Arr" in answer else "Rating: [[2]]"


def test_a_run_ends_with_the_judges_win_rate_grades_and_agreement_in_its_report(tmp_path, tiny_llama):
    from conftest import ALPACA_ROWS, tiny_config, write_jsonl
    from strop.recipes import run as recipe

    train = write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS[:16])
    test = write_jsonl(tmp_path / "test.jsonl", ALPACA_ROWS[16:])
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"prompt": q, "chosen": v, "rejected": p} for q, p, v in zip(QUESTIONS, PLAIN, VOICE, strict=True)],
    )
    with scripted_judge(grades_voice) as server:
        cfg = tiny_config(
            tiny_llama,
            train,
            tmp_path / "out",
            eval={"enabled": True, "max_new_tokens": 6, "forgetting": False, "bootstrap": 200},
            judge={"endpoint": server.url, "mode": "both", "agreement": str(pairs)},
        )
        cfg["data"]["test"] = [str(test)]
        result = recipe.train(cfg, show_progress=False)
    j = result.eval["judge"]
    # the tiny model writes no "Arr": every pair is a tie (0.5), every reply graded 2
    assert j["pairwise"]["judged"] == 4 and j["pairwise"]["unparsed"] == 0
    assert j["rubric"]["tuned"]["graded"] == 4 and j["rubric"]["base"]["graded"] == 4
    assert j["agreement"]["win_rate"] == 1.0 and j["agreement"]["judged"] == 6
    # pairs both orders, prompts both orders, both models graded, the model list; a judge prompt asked
    # before (identical base and tuned replies) comes from the cache
    asked = j["usage"]["requests"] + j["usage"]["cache_hits"]
    assert j["judge"]["model"] == "scripted" and asked == 6 * 2 + 4 * 2 + 8 + 1
    on_disk = json.loads((result.run_dir / "eval" / "judge.json").read_text())
    assert len(on_disk["pairwise"]["per_prompt"]) == 4 and len(on_disk["rubric"]["tuned"]["grades"]) == 4
    assert json.loads((result.run_dir / "eval" / "summary.json").read_text())["judge"] == j
    report = (result.run_dir / "report.md").read_text()
    assert "LLM judge" in report and "judge agreement with known preferences" in report
    assert "Judge: tuned win rate over base" in report  # the headline, beside what the judge is worth


def test_judge_settings_a_run_cannot_honour_are_refused_before_training(tmp_path, tiny_llama):
    from conftest import ALPACA_ROWS, tiny_config, write_jsonl
    from strop.core.config import RunConfig
    from strop.recipes import run as recipe

    train = write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS)
    base = {"enabled": True, "base": False}
    with pytest.raises(ValidationError, match="judge.mode: pairwise compares tuned with base"):
        RunConfig(**tiny_config(tiny_llama, train, tmp_path, eval=base, judge={"endpoint": "http://x/v1"}))
    with pytest.raises(ValidationError, match="judge: the judge scores the end-of-run evaluation"):
        RunConfig(**tiny_config(tiny_llama, train, tmp_path, judge={"endpoint": "http://x/v1"}))
    with pytest.raises(ValidationError, match="judge: task dpo does not use it"):
        RunConfig(**tiny_config(tiny_llama, train, tmp_path, task="dpo", judge={"endpoint": "http://x/v1"}))
    cfg = tiny_config(
        tiny_llama, train, tmp_path, eval={"enabled": True}, judge={"endpoint": "no-such-judge"}
    )
    with pytest.raises(ConfigError, match="judge.endpoint: 'no-such-judge' is not a URL"):
        recipe.train(cfg, show_progress=False)
    assert not (tmp_path / "run" / "model").exists()  # refused before a step was trained


def test_strop_eval_grades_replies_with_a_judge(tmp_path, tiny_llama, capsys):
    from conftest import ALPACA_ROWS, run_cli, write_jsonl

    data = write_jsonl(
        tmp_path / "qa.jsonl",
        [{"question": r["instruction"], "answer": r["output"]} for r in ALPACA_ROWS[:3]],
    )
    out = tmp_path / "ev"
    with scripted_judge(grades_voice) as server:
        argv = ["eval", str(tiny_llama), "--data", str(data), "--max-new-tokens", "4", "--out", str(out)]
        rc, stdout, err = run_cli([*argv, "--judge", server.url], capsys)
        assert rc == 0, err
        shown = [p for p in server.prompts if "[The Start of Assistant's Answer]" in p]
        assert len(shown) == 3 and all("[Reference Answer]\nArr!" in p for p in shown)  # references shown
    assert "judge: model graded 2.0/10" in stdout and "was not checked" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["judge"]["rubric"]["model"]["mean"] == 2.0 and summary["examples"] == 3
    assert json.loads((out / "judge.json").read_text())["rubric"]["model"]["grades"] == [2.0, 2.0, 2.0]
    rc, _, err = run_cli([*argv, "--force", "--judge", "nowhere"], capsys)
    assert rc == 2 and "judge.endpoint: 'nowhere'" in err and "Traceback" not in err


def test_a_model_folder_as_the_judge_is_served_on_loopback_for_the_judging_only(tmp_path, tiny_llama):
    import urllib.request

    from strop.eval.judging import judge_endpoint

    with judge_endpoint(JudgeConfig(endpoint=str(tiny_llama), max_tokens=8), tmp_path) as at:
        assert at.endpoint.startswith("http://127.0.0.1:") and at.endpoint.endswith("/v1")
        with urllib.request.urlopen(at.endpoint + "/models", timeout=10) as r:
            assert json.loads(r.read())["data"][0]["id"] == tiny_llama.name
        judge = Judge(at, cache_path=tmp_path / "c.sqlite")
        assert judge.ask("Say [[A]].") is not None
    with pytest.raises(OSError):  # stopped once the judging is done
        urllib.request.urlopen(at.endpoint + "/models", timeout=5)
    assert "serving" in (tmp_path / "judge-server.log").read_text()
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    with pytest.raises(StropError, match="strop serve stopped before serving"):
        with judge_endpoint(JudgeConfig(endpoint=str(bad)), tmp_path):
            pass

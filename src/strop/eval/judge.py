"""LLM-as-judge through any OpenAI-compatible endpoint (strop serve, llama.cpp, vLLM, Ollama, a hosted
API), with the `openai` client: pairwise comparison of two models' replies and single-answer grading.

Pairwise (`compare`): each prompt is judged twice, the replies in both orders, so a judge that favours
a position cannot favour a model. The two verdicts agree → that model wins (or a tie); they disagree →
a tie, counted as a disagreement. `position_bias` is the share of judged prompts where the judge chose
the same position both times (a judge that always says "A" has 1.0, and its win rate is 0.5);
`consistency` the share where both orders named the same model. The win rate counts a tie as half a win,
with a bootstrap interval over prompts. A verdict the judge did not write in the template's format is
counted as `unparsed` and its prompt left out of the rate, never guessed.

Grading (`grade`): one call per reply, "Rating: [[N]]" on 1–10, the mean with its interval.

Every judgment is cached (sqlite under the strop cache) by endpoint, model, length limit and the whole
judge prompt (which holds the question and the replies in their order), so a rerun sends nothing. A 429,
a 5xx, a timeout or a lost connection is tried again after an exponential backoff (the server's
Retry-After when it gives one); other errors stop with one line naming the endpoint. The API key comes
from the environment variable the config names and is never written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from strop.core.errors import ConfigError, StropError
from strop.core.io import cache_root
from strop.core.judge_config import JudgeConfig
from strop.eval.bootstrap import bootstrap_mean

DATA = Path(__file__).parent / "data"
VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")


@dataclass
class Usage:
    requests: int = 0  # sent to the endpoint (retries included)
    cache_hits: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0  # waiting on the endpoint, summed over requests


class Judge:
    """A judge model behind an OpenAI-compatible endpoint; `ask` one judge prompt, or `ask_all`."""

    def __init__(
        self, cfg: JudgeConfig, cache_path: Path | None = None, sleep: Callable[[float], None] = time.sleep
    ):
        try:
            import openai
        except ImportError:
            raise StropError(
                "a judge needs the openai package: pip install 'strop[judge]' (or openai)"
            ) from None
        key = None
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ConfigError(f"judge.api_key_env: the environment variable {cfg.api_key_env} is not set")
        self.cfg, self.sleep, self.usage = cfg, sleep, Usage()
        self.where = cfg.endpoint.rstrip("/")
        self.client = openai.OpenAI(
            base_url=self.where, api_key=key or "none", max_retries=0, timeout=cfg.timeout
        )
        self._openai = openai
        self._lock = threading.Lock()
        self.model = cfg.model or self._first_model()
        self.cache = _Cache(cache_path or cache_root() / "judge" / "judgments.sqlite") if cfg.cache else None

    def _first_model(self) -> str:
        listed = self._call(lambda: self.client.models.list())
        ids = [m.id for m in getattr(listed, "data", [])]
        if not ids:
            raise StropError(f"judge {self.where}: the endpoint lists no model; name one in judge.model")
        return ids[0]

    def ask(self, prompt: str) -> str:
        """The judge's reply to one judge prompt (from the cache when it was asked before)."""
        key = hashlib.sha256(
            json.dumps([self.where, self.model, self.cfg.max_tokens, prompt]).encode()
        ).hexdigest()
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            with self._lock:
                self.usage.cache_hits += 1
            return hit
        reply = self._call(
            lambda: self.client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": prompt}],
                temperature=0.0,
                max_tokens=self.cfg.max_tokens,
            )
        )
        text = reply.choices[0].message.content or ""
        with self._lock:
            if reply.usage is not None:
                self.usage.prompt_tokens += reply.usage.prompt_tokens or 0
                self.usage.completion_tokens += reply.usage.completion_tokens or 0
        if self.cache is not None:
            self.cache.put(key, text)
        return text

    def ask_all(self, prompts: list[str]) -> list[str]:
        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            return list(pool.map(self.ask, prompts))

    def _call(self, request: Callable):
        openai = self._openai
        transient = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError)
        for attempt in range(self.cfg.retries + 1):
            t0 = time.perf_counter()
            try:
                with self._lock:
                    self.usage.requests += 1
                return request()
            except transient as e:
                if attempt == self.cfg.retries:
                    raise StropError(f"judge {self.where}: {_what(e)}, {attempt + 1} tries") from None
                with self._lock:
                    self.usage.retries += 1
                self.sleep(_backoff(e, attempt))
            except openai.APIStatusError as e:  # a 4xx: the request, the model name or the key is wrong
                raise StropError(f"judge {self.where}: {_what(e)}") from None
            finally:
                with self._lock:
                    self.usage.seconds += time.perf_counter() - t0
        raise AssertionError("unreachable")


def _what(e: Exception) -> str:
    status = getattr(e, "status_code", None)
    if status is None:
        return "no answer (timeout or connection lost)"
    body = getattr(e, "body", None)
    detail = body.get("message") if isinstance(body, dict) else None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        detail = body["error"].get("message")
    return f"HTTP {status}" + (f": {str(detail)[:200]}" if detail else "")


def _backoff(e: Exception, attempt: int) -> float:
    """The server's Retry-After (seconds) when it gave one, else 0.5, 1, 2, ... up to 30 s."""
    response = getattr(e, "response", None)
    after = response.headers.get("retry-after") if response is not None else None
    try:
        return min(60.0, max(0.0, float(after))) if after is not None else min(30.0, 0.5 * 2**attempt)
    except ValueError:
        return min(30.0, 0.5 * 2**attempt)


class _Cache:
    """Judgments by key, in one sqlite file: safe across threads and processes, written as it goes."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False, timeout=60)
        self.lock = threading.Lock()
        with self.lock, self.db:
            self.db.execute("CREATE TABLE IF NOT EXISTS judgment (key TEXT PRIMARY KEY, text TEXT, at REAL)")

    def get(self, key: str) -> str | None:
        with self.lock:
            row = self.db.execute("SELECT text FROM judgment WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, text: str) -> None:
        with self.lock, self.db:
            self.db.execute("INSERT OR REPLACE INTO judgment VALUES (?, ?, ?)", (key, text, time.time()))


def template_text(path: str | None, default: str) -> str:
    if path is None:
        return (DATA / default).read_text()
    try:
        return Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"judge template {path}: {e.strerror or e}") from None


def render(template: str, **fields: str | None) -> str:
    """The template with {question}, {answer}, {answer_a}, {answer_b}, {rubric}, {reference} and
    {reference_block} filled (plain replacement: other braces in a template are left alone)."""
    ref = fields.get("reference")
    block = (
        f"Use this reference answer to judge correctness:\n[Reference Answer]\n{ref}\n[End of Reference Answer]\n\n"
        if ref
        else ""
    )
    out = template.replace("{reference_block}", block)
    for name, value in fields.items():
        out = out.replace("{" + name + "}", value or "")
    return out


def verdict(text: str) -> str | None:
    """ "A", "B" or "C" (tie) from the judge's last [[X]]; None when it wrote none."""
    found = VERDICT.findall(text)
    return found[-1] if found else None


def rating(text: str, low: float = 1.0, high: float = 10.0) -> float | None:
    found = [float(x) for x in RATING.findall(text)]
    return found[-1] if found and low <= found[-1] <= high else None


def compare(
    judge: Judge,
    questions: list[str],
    replies_a: list[str],
    replies_b: list[str],
    references: list[str | None] | None = None,
    template: str | None = None,
) -> dict:
    """Pairwise judgments of b against a, both orders per prompt (module docstring); win_rate is b's."""
    n = len(questions)
    if not (len(replies_a) == len(replies_b) == n):
        raise ValueError(f"compare: {n} questions, {len(replies_a)} and {len(replies_b)} replies")
    refs = references or [None] * n
    text = template_text(template or judge.cfg.pairwise_template, "judge_pairwise.txt")
    prompts = []
    for q, a, b, ref in zip(questions, replies_a, replies_b, refs, strict=True):
        prompts.append(render(text, question=q, answer_a=a, answer_b=b, reference=ref))  # a first
        prompts.append(render(text, question=q, answer_a=b, answer_b=a, reference=ref))  # b first
    said = judge.ask_all(prompts)
    per_prompt: list[dict] = []
    scores: list[float] = []
    counts = {"a": 0, "b": 0, "tie": 0, "disagreements": 0, "same_position": 0, "unparsed": 0}
    for i in range(n):
        first, second = verdict(said[2 * i]), verdict(said[2 * i + 1])
        if first is None or second is None:
            counts["unparsed"] += 1
            per_prompt.append({"verdicts": [first, second], "winner": None})
            continue
        picked = ({"A": "a", "B": "b"}.get(first, "tie"), {"A": "b", "B": "a"}.get(second, "tie"))
        winner = picked[0] if picked[0] == picked[1] else "tie"
        counts["disagreements"] += picked[0] != picked[1]
        counts["same_position"] += first == second and first in "AB"
        counts[winner] += 1
        scores.append({"a": 0.0, "tie": 0.5, "b": 1.0}[winner])
        per_prompt.append({"verdicts": [first, second], "winner": winner})
    judged = len(scores)
    rate = bootstrap_mean(scores) if scores else None
    return {
        "prompts": n,
        "judged": judged,
        "unparsed": counts["unparsed"],
        "wins": {"a": counts["a"], "b": counts["b"], "tie": counts["tie"]},
        "win_rate": rate["mean"] if rate else None,
        "ci": rate["ci"] if rate else None,
        "disagreements": counts["disagreements"],
        "position_bias": counts["same_position"] / judged if judged else None,
        "consistency": (judged - counts["disagreements"]) / judged if judged else None,
        "per_prompt": per_prompt,
        "judge": {"endpoint": judge.where, "model": judge.model},
        "usage": asdict(judge.usage),
    }


def grade(
    judge: Judge, questions: list[str], replies: list[str], references: list[str | None] | None = None
) -> dict:
    """Single-answer grades on 1–10 under the config's rubric: the mean with its interval."""
    refs = references or [None] * len(questions)
    text = template_text(judge.cfg.rubric_template, "judge_rubric.txt")
    prompts = [
        render(text, question=q, answer=r, reference=ref, rubric=judge.cfg.rubric)
        for q, r, ref in zip(questions, replies, refs, strict=True)
    ]
    grades = [rating(t) for t in judge.ask_all(prompts)]
    given = [g for g in grades if g is not None]
    mean = bootstrap_mean(given) if given else None
    return {
        "replies": len(replies),
        "graded": len(given),
        "unparsed": len(grades) - len(given),
        "mean": mean["mean"] if mean else None,
        "ci": mean["ci"] if mean else None,
        "grades": grades,
        "judge": {"endpoint": judge.where, "model": judge.model},
        "usage": asdict(judge.usage),
    }

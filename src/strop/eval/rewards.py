"""Programmatic rewards for `task: ppo | grpo`, and how a reward spec becomes a callable.

A reward function is called as `f(prompts, completions, **columns)` -> one float per completion, where
`prompts` are the final user turns, `completions` the sampled replies, and `columns` each prompt row's
fields as lists (TRL's reward-function convention, so functions written for TRL work unchanged).
Built-ins, by name in `rl.reward`, with `rl.reward_args` as keyword arguments:
    length       -|words - target| / target: highest (0) for replies of `target` words
    contains     1 when the reply contains `word` (case-insensitive), else 0
    avoid        minus the number of times the reply uses `word` as a whole word (case-insensitive)
    exact_match  1 when the reply's extracted answer equals the row's `answer` column (extract: gsm8k,
                 last_number or regex:PATTERN applied to both), else 0
    gsm8k        exact_match with the last number of the reply against the number after "####"
    format       1 when the reply matches the regular expression `pattern` (`full: true`: the whole
                 stripped reply must match; else anywhere in it, `.` matching newlines), else 0
    length_penalty  -(words beyond `max_words`) / `max_words`: 0 up to the limit, then linearly lower
Combine several with `rl.add_rewards` (a weighted sum), e.g. gsm8k plus format for "#### N" answers.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
import re
from collections.abc import Callable
from pathlib import Path

from strop.core.errors import ConfigError
from strop.eval.extract import get_extractor, last_number
from strop.eval.extract import gsm8k as gsm8k_answer

RewardFn = Callable[..., list[float]]


def length(prompts: list[str], completions: list[str], target: int = 20, **_) -> list[float]:
    if not isinstance(target, (int, float)) or target <= 0:
        raise ConfigError(f"rl.reward_args.target: expected a positive number of words, got {target!r}")
    return [-abs(len(c.split()) - target) / target for c in completions]


def contains(prompts: list[str], completions: list[str], word: str = "", **_) -> list[float]:
    if not word:
        raise ConfigError("rl.reward_args.word: the contains reward needs the word to look for")
    return [float(word.lower() in c.lower()) for c in completions]


def avoid(prompts: list[str], completions: list[str], word: str = "", **_) -> list[float]:
    if not word:
        raise ConfigError("rl.reward_args.word: the avoid reward needs the word to avoid")
    pattern = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)
    return [-float(len(pattern.findall(c))) for c in completions]


def exact_match(
    prompts: list[str],
    completions: list[str],
    answer: list[str] | None = None,
    extract: str = "last_number",
    **_,
) -> list[float]:
    if answer is None:
        raise ConfigError("rl.reward: exact_match needs an 'answer' column in the prompt rows")
    pick = get_extractor(extract)
    out = []
    for c, a in zip(completions, answer, strict=True):
        got = pick(c)
        out.append(float(got is not None and got == (pick(str(a)) or str(a).strip())))
    return out


def gsm8k(prompts: list[str], completions: list[str], answer: list[str] | None = None, **_) -> list[float]:
    """GSM8K answers end with "#### N"; a reply is right when its last number is N."""
    if answer is None:
        raise ConfigError("rl.reward: gsm8k needs the GSM8K 'answer' column in the prompt rows")
    refs = [gsm8k_answer(str(a)) or last_number(str(a)) for a in answer]
    return [float(r is not None and last_number(c) == r) for c, r in zip(completions, refs, strict=True)]


def format_match(
    prompts: list[str], completions: list[str], pattern: str = "", full: bool = False, **_
) -> list[float]:
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError("rl.reward_args.pattern: the format reward needs a regular expression")
    try:
        rx = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ConfigError(f"rl.reward_args.pattern: not a regular expression ({e}): {pattern!r}") from None
    if full:
        return [float(rx.fullmatch(c.strip()) is not None) for c in completions]
    return [float(rx.search(c) is not None) for c in completions]


def length_penalty(prompts: list[str], completions: list[str], max_words: int = 100, **_) -> list[float]:
    if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words <= 0:
        raise ConfigError(f"rl.reward_args.max_words: expected a positive whole number, got {max_words!r}")
    return [-max(0, len(c.split()) - max_words) / max_words for c in completions]


BUILT_IN: dict[str, RewardFn] = {
    "length": length,
    "contains": contains,
    "avoid": avoid,
    "exact_match": exact_match,
    "gsm8k": gsm8k,
    "format": format_match,
    "length_penalty": length_penalty,
}


def reward_function(spec: str, args: dict) -> RewardFn:
    """A built-in name, `module:function` or `path/file.py:function`, with `args` bound."""
    fn: RewardFn | None
    if spec in BUILT_IN:
        fn = BUILT_IN[spec]
    elif ":" in spec:
        where, _, name = spec.rpartition(":")
        try:
            if where.endswith(".py"):
                if not Path(where).is_file():
                    raise ConfigError(
                        f"rl.reward: file not found: {where} (relative paths start at the YAML's folder)"
                    )
                loaded = importlib.util.spec_from_file_location(Path(where).stem, where)
                assert loaded is not None and loaded.loader is not None  # a .py file always has a loader
                module = importlib.util.module_from_spec(loaded)
                loaded.loader.exec_module(module)
            else:
                module = importlib.import_module(where)
        except ImportError as e:
            raise ConfigError(f"rl.reward: cannot import {where!r} ({e})") from None
        fn = getattr(module, name, None)
        if not callable(fn):
            raise ConfigError(f"rl.reward: {where!r} has no function {name!r}")
    else:
        raise ConfigError(
            f"rl.reward: {spec!r} is not a strop reward run folder, a built-in ({', '.join(BUILT_IN)}) "
            "or module:function"
        )
    return functools.partial(fn, **args) if args else fn


def call_reward(fn: RewardFn, prompts: list[str], completions: list[str], columns: list[dict]) -> list[float]:
    """Scores, checked: one finite number per completion, else a ConfigError naming the function."""
    bound = set(getattr(fn, "keywords", None) or {})  # rl.reward_args win over same-named row columns
    keys = sorted({k for c in columns for k in c} - {"prompts", "completions"} - bound)
    kwargs = {k: [c.get(k) for c in columns] for k in keys}
    name = getattr(getattr(fn, "func", fn), "__name__", repr(fn))
    params = inspect.signature(fn).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        accepted = {p.name for p in params}
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    scores = fn(prompts=prompts, completions=completions, **kwargs)
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise ConfigError(f"rl.reward: {name} must return a list of numbers, got {scores!r:.200}") from None
    if len(scores) != len(completions):
        raise ConfigError(
            f"rl.reward: {name} returned {len(scores)} scores for {len(completions)} completions"
        )
    bad = [s for s in scores if not math.isfinite(s)]
    if bad:
        raise ConfigError(f"rl.reward: {name} returned a non-finite score ({bad[0]})")
    return scores

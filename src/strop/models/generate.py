"""Generation for `strop generate`, `strop eval` and `strop chat`, through the one decoding engine
(models/engine.py: continuous batching, KV cache, the run's end-of-turn ids)."""

from __future__ import annotations

from collections.abc import Iterator

from strop.data.template import ChatTemplate
from strop.models.engine import Engine, Request


def engine_for(model, template: ChatTemplate, max_batch: int = 8) -> Engine:
    return Engine(model, template.tokenizer, template.stop_ids, max_batch=max_batch)


def generate(
    model,
    template: ChatTemplate,
    conversations: list[list[dict]],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    stop: list[str] | None = None,
    progress: bool = False,
    seed: int | None = None,
) -> list[str]:
    """Replies to each conversation, in order (greedy when temperature is 0).

    Up to `batch_size` replies decode together and a finished one's slot is refilled at once; a reply
    ends at an end-of-turn token, after `max_new_tokens`, or just before the first of the `stop`
    strings. With a seed, conversation i samples from its own generator seeded `seed + i`.
    """
    from strop.core.progress import tqdm

    requests = [
        Request(
            template.prompt_ids(c),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=None if seed is None else seed + i,
            stop=list(stop or ()),
        )
        for i, c in enumerate(conversations)
    ]
    bar = tqdm(total=len(requests), desc="generate", unit="ex", disable=not progress, dynamic_ncols=True)
    try:
        engine_for(model, template, batch_size).run(requests, on_done=lambda _: bar.update(1))
    finally:
        bar.close()
    return [r.text.strip() for r in requests]


def stream(
    model,
    template: ChatTemplate,
    conversation: list[dict],
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
) -> Iterator[str]:
    """Yield the reply's text piece by piece as it is generated."""
    req = Request(
        template.prompt_ids(conversation), max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p
    )
    yield from engine_for(model, template, 1).stream(req)

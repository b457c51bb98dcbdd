"""A whole (non-streamed) reply, and what a streamed one shares with it.

The handlers run on the event loop and only submit jobs to the engine's thread; the engine's callbacks
come back through `threadsafe` (`call_soon_threadsafe`). A reply that ends, however it ends (done, the
client gone, a failure), marks its jobs cancelled so their slots in the batch are freed.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from strop.models.engine import Engine
from strop.models.engine import Request as Job
from strop.serve.errors import ApiError


def reply_id(chat: bool) -> tuple[str, int]:
    """(id, created): what every body or chunk of one reply repeats."""
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())


async def whole(engine: Engine, todo: list[Job], model: str, chat: bool, extra: dict) -> dict:
    """Run `todo` to its end and answer with one chat.completion or text_completion body (one choice a
    job, in order), `extra`'s keys at its top level; a job that failed is a 500."""
    rid, created = reply_id(chat)
    loop = asyncio.get_running_loop()
    finished = [loop.create_future() for _ in todo]
    for job, fut in zip(todo, finished, strict=True):
        job.on_finish = threadsafe(loop, _settle, fut)
        engine.submit(job)
    try:
        await asyncio.gather(*finished)
    finally:
        for job in todo:
            job.cancelled = True  # a client gone before the end frees its slots
    _raise_failure(todo)
    choices = [
        {
            "index": k,
            "message": {"role": "assistant", "content": job.text},
            "finish_reason": job.finish_reason,
        }
        if chat
        else {"index": k, "text": job.text, "logprobs": None, "finish_reason": job.finish_reason}
        for k, job in enumerate(todo)
    ]
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(todo),
        **extra,
    }


def usage(todo: list[Job]) -> dict:
    """OpenAI's token counts; n choices of one prompt count its tokens once."""
    prompt = sum(len(j.prompt) for j in {id(j.prompt): j for j in todo}.values())
    completion = sum(len(j.tokens) for j in todo)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def threadsafe(loop: asyncio.AbstractEventLoop, fn, *first):
    """A callback for the engine's thread that runs `fn(*first, *args)` on the event loop."""

    def call(*args):
        try:
            loop.call_soon_threadsafe(fn, *(first + args))
        except RuntimeError:  # the loop is closed: the server is gone, nobody is waiting
            pass

    return call


def _settle(fut: asyncio.Future, job: Job) -> None:
    if not fut.done():
        fut.set_result(job)


def _raise_failure(todo: list[Job]) -> None:
    for job in todo:
        if job.error is not None:
            raise ApiError(500, f"generation failed: {type(job.error).__name__}: {job.error}")

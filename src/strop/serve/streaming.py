"""A streamed reply: OpenAI's server-sent events, one `data: {...}` chunk a piece of text.

A chat stream opens with an empty delta for each choice; a choice's first text carries
role=assistant; its end is a chunk with its finish_reason; `stream_options.include_usage` adds a last
chunk with no choices and the usage; `data: [DONE]` closes the stream. `extra` (the RAG sources) rides
on the first chunk. A job that fails ends the stream with an error chunk, without [DONE]. A client that
goes away cancels its jobs: they leave the batch at the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from strop.models.engine import Engine
from strop.models.engine import Request as Job
from strop.serve.reply import reply_id, threadsafe, usage


def stream(
    engine: Engine, todo: list[Job], model: str, chat: bool, include_usage: bool, extra: dict
) -> StreamingResponse:
    """Submit `todo` and answer with the stream of its text as the engine decodes it."""
    chunks = _Chunks(model, chat, len(todo), extra)
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()  # (choice, text), text None when the choice has ended
    for k, job in enumerate(todo):
        job.on_text = threadsafe(loop, lambda text, k=k: pieces.put_nowait((k, text)))
        job.on_finish = threadsafe(loop, lambda _job, k=k: pieces.put_nowait((k, None)))
    for job in todo:
        engine.submit(job)
    return StreamingResponse(
        _events(pieces, todo, chunks, include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(
    pieces: asyncio.Queue, todo: list[Job], chunks: _Chunks, include_usage: bool
) -> AsyncIterator[str]:
    open_ = len(todo)
    try:
        if chunks.chat:
            for k in range(len(todo)):
                yield chunks.event([chunks.choice(k, "")])
        while open_:
            k, text = await pieces.get()
            if text is None:
                open_ -= 1
                if todo[k].error is not None:
                    message = f"generation failed: {type(todo[k].error).__name__}: {todo[k].error}"
                    yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                    return
                yield chunks.event([chunks.choice(k, None, todo[k].finish_reason)])
            else:
                yield chunks.event([chunks.choice(k, text)])
        if include_usage:
            yield chunks.event([], usage(todo))
        yield "data: [DONE]\n\n"
    finally:
        for job in todo:
            job.cancelled = True  # the client went away: its choices leave the batch at the next step


class _Chunks:
    """The chunks of one stream of `n` choices: each repeats the reply's id, kind, time and model."""

    def __init__(self, model: str, chat: bool, n: int, extra: dict):
        self.id, self.created = reply_id(chat)
        self.model, self.chat, self.extra = model, chat, extra
        self.kind = "chat.completion.chunk" if chat else "text_completion"
        self.fresh = set(range(n))  # choices whose first delta still has to say role=assistant

    def event(self, choices: list[dict], counts: dict | None = None) -> str:
        """One `data:` event; the stream's first carries `extra`."""
        data = {"id": self.id, "object": self.kind, "created": self.created, "model": self.model}
        data["choices"] = choices
        if counts is not None:
            data["usage"] = counts
        data |= self.extra
        self.extra = {}
        return f"data: {json.dumps(data)}\n\n"

    def choice(self, k: int, text: str | None = None, finish: str | None = None) -> dict:
        if self.chat:
            delta = {} if text is None else {"content": text}
            if text is not None and k in self.fresh:
                delta["role"] = "assistant"
                self.fresh.discard(k)
            return {"index": k, "delta": delta, "finish_reason": finish}
        return {"index": k, "text": text or "", "logprobs": None, "finish_reason": finish}

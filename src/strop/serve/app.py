"""The HTTP surface: OpenAI's /v1/models, /v1/chat/completions and /v1/completions, and /health.

Every failure a client can cause is an OpenAI-style error body ({"error": {message, type, param,
code}}) with 400, 401, 404 or 429, never a traceback. Handlers run on the event loop and only submit
requests to the engine's thread; its callbacks come back through `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from strop.core.errors import StropError
from strop.models.engine import Engine
from strop.models.engine import Request as Job
from strop.rag.prompt import augment, sources
from strop.serve.limits import ChatRequest, CompletionRequest, Limits
from strop.serve.variants import Variant


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}
        body = {
            "message": self.message,
            "type": kind.get(self.status, "invalid_request_error" if self.status < 500 else "server_error"),
            "param": self.param,
            "code": self.code,
        }
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse({"error": body}, status_code=self.status, headers=headers)


def build_app(
    engine: Engine,
    variants: dict[str, Variant],
    limits: Limits,
    api_key: str | None,
    rag: tuple | None = None,
) -> FastAPI:
    """`rag`: (Retriever, top_k, mode): chat requests are answered with passages for their last user
    turn (rag/prompt.augment), and the response carries them as a top-level "sources" list (the first
    chunk of a stream does)."""
    context = engine.max_length

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()  # after uvicorn's graceful shutdown: in-flight requests have finished

    app = FastAPI(title="strop", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        return ApiError(500, f"internal error: {type(e).__name__}: {e}").response()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(
                401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key"
            )

    async def read(request: Request, schema: type[BaseModel]):
        authorize(request)
        size, chunks = 0, []
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.body_bytes:
                    raise ApiError(400, f"request body over {limits.body_bytes} bytes", code="body_too_large")
                chunks.append(chunk)
        except ClientDisconnect:  # gone mid-body: an answer nobody reads, and no traceback in the log
            raise ApiError(400, "the client disconnected before the body ended") from None
        try:
            return schema.model_validate_json(b"".join(chunks))
        except ValidationError as e:
            # the deepest error: of a union's members, the one the client's value came closest to
            first = max(e.errors(), key=lambda err: len(_field_path(err).split(".")))
            where = _field_path(first) or None
            message = f"{where}: {first['msg']}" if where else first["msg"]
            if first["type"] == "extra_forbidden":
                message = f"{where}: unknown field"
            raise ApiError(400, message, param=where, code=first["type"]) from None

    def variant(name: str) -> Variant:
        if name not in variants:
            raise ApiError(
                404,
                f"model {name!r} is not served here; models: {', '.join(variants)}",
                param="model",
                code="model_not_found",
            )
        return variants[name]

    def jobs(body, prompts: list[list[int]], v: Variant) -> list[Job]:
        """The engine requests for a body, after every cap; 400 or 429 when one is broken."""
        bad = body.unsupported()
        if bad:
            raise ApiError(400, f"{bad}: not supported by strop serve", param=bad, code="unsupported")
        if body.n > limits.n:
            raise ApiError(400, f"n: at most {limits.n} choices per request", param="n")
        stops = body.stops()
        if len(stops) > limits.stop or any(not s for s in stops):
            raise ApiError(400, f"stop: at most {limits.stop} non-empty strings", param="stop")
        budget = body.budget()
        if budget is not None and budget > limits.max_tokens:
            raise ApiError(400, f"max_tokens: at most {limits.max_tokens}", param="max_tokens")
        cap = min(limits.prompt_tokens or context, context - 1)
        for ids in prompts:
            if len(ids) > cap:
                raise ApiError(
                    400,
                    f"the prompt is {len(ids)} tokens; at most {cap} are allowed",
                    param="messages" if isinstance(body, ChatRequest) else "prompt",
                    code="context_length_exceeded",
                )
            if budget is not None and len(ids) + budget > context:
                raise ApiError(
                    400,
                    f"the prompt ({len(ids)} tokens) and max_tokens ({budget}) exceed the model's context of "
                    f"{context} tokens",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
        wanted = len(prompts) * body.n
        if wanted > limits.queue:  # never fits: a 429 would have a client retry forever
            raise ApiError(
                400,
                f"the request asks for {wanted} choices ({len(prompts)} prompts x n={body.n}); this server "
                f"queues at most {limits.queue}",
                param="prompt" if len(prompts) > 1 else "n",
            )
        if engine.load + wanted > limits.queue:
            raise ApiError(
                429,
                f"the server is busy ({engine.load} choices queued or decoding, limit {limits.queue}); retry",
                code="rate_limit_exceeded",
            )
        out = []
        for ids in prompts:
            for i in range(body.n):
                seed = None if body.seed is None else body.seed + i
                limit = budget if budget is not None else min(limits.max_tokens, context - len(ids))
                out.append(
                    Job(
                        ids,
                        max_new_tokens=limit,
                        temperature=body.temperature,
                        top_p=body.top_p,
                        seed=seed,
                        stop=stops,
                        adapter=v.adapter,
                        stop_ids=v.stop_ids,
                    )
                )
        return out

    def render(v: Variant, messages: list[dict]) -> list[int]:
        try:
            return v.template.prompt_ids(messages)
        except StropError as e:
            raise ApiError(400, f"messages: {e}", param="messages") from None

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(variants), "load": engine.load}

    @app.get("/v1/models")
    async def list_models(request: Request):
        authorize(request)
        return {"object": "list", "data": [_model_card(v) for v in variants.values()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        authorize(request)
        return _model_card(variant(name))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read(request, ChatRequest)
        v = variant(body.model)
        conversation = body.conversation()
        extra: dict = {}
        if rag is not None:
            retriever, top_k, mode = rag
            question = next((m["content"] for m in reversed(conversation) if m["role"] == "user"), "")
            hits = await asyncio.to_thread(retriever.search, question, top_k, mode) if question else []
            conversation, extra = augment(conversation, hits), {"sources": sources(hits)}
        todo = jobs(body, [render(v, conversation)], v)
        return await _respond(todo, body, v, asyncio.get_running_loop(), chat=True, extra=extra)

    @app.post("/v1/completions")
    async def complete(request: Request):
        body = await read(request, CompletionRequest)
        v = variant(body.model)
        tok = v.template.tokenizer
        prompts = [tok(p)["input_ids"] for p in body.prompts()]
        if not prompts or any(not p for p in prompts):
            raise ApiError(400, "prompt: empty", param="prompt")
        return await _respond(jobs(body, prompts, v), body, v, asyncio.get_running_loop(), chat=False)

    async def _respond(todo: list[Job], body, v: Variant, loop, chat: bool, extra: dict | None = None):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if body.stream:
            pieces: asyncio.Queue = asyncio.Queue()
            for k, job in enumerate(todo):
                job.on_text = _threadsafe(loop, lambda text, k=k: pieces.put_nowait((k, text)))
                job.on_finish = _threadsafe(loop, lambda _job, k=k: pieces.put_nowait((k, None)))
            for job in todo:
                engine.submit(job)
            return StreamingResponse(
                _events(pieces, todo, body, v, rid, created, chat, extra or {}),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        finished = [loop.create_future() for _ in todo]
        for job, fut in zip(todo, finished, strict=True):
            job.on_finish = _threadsafe(loop, _settle, fut)
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
            "model": v.name,
            "choices": choices,
            "usage": _usage(todo),
            **(extra or {}),
        }

    async def _events(pieces, todo, body, v, rid, created, chat, extra: dict) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        first = [True]

        def event(choices, usage=None) -> str:
            data = {"id": rid, "object": kind, "created": created, "model": v.name, "choices": choices}
            if usage is not None:
                data["usage"] = usage
            if first[0]:
                data |= extra
                first[0] = False
            return f"data: {json.dumps(data)}\n\n"

        fresh = set(range(len(todo)))  # choices whose first delta still has to say role=assistant

        def choice(k, text=None, finish=None) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                if text is not None and k in fresh:
                    delta["role"] = "assistant"
                    fresh.discard(k)
                return {"index": k, "delta": delta, "finish_reason": finish}
            return {"index": k, "text": text or "", "logprobs": None, "finish_reason": finish}

        open_ = len(todo)
        try:
            if chat:
                for k in range(len(todo)):
                    yield event([choice(k, "")])
            while open_:
                k, text = await pieces.get()
                if text is None:
                    open_ -= 1
                    if todo[k].error is not None:
                        message = f"generation failed: {type(todo[k].error).__name__}: {todo[k].error}"
                        yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                        return
                    yield event([choice(k, None, todo[k].finish_reason)])
                else:
                    yield event([choice(k, text)])
            if body.stream_options is not None and body.stream_options.include_usage:
                yield event([], _usage(todo))
            yield "data: [DONE]\n\n"
        finally:
            for job in todo:
                job.cancelled = True  # the client went away: its choices leave the batch at the next step

    return app


def _field_path(error: ErrorDetails) -> str:
    """The dotted field of a pydantic error, without the union member it tried: pydantic says
    ('prompt', 'list[str]', 0) for `prompt: str | list[str]`; the client's field is prompt.0. The
    name of an unknown field is kept whatever it looks like."""
    loc = error["loc"]
    last = len(loc) - 1 if error["type"] == "extra_forbidden" else len(loc)
    return ".".join(
        str(p)
        for i, p in enumerate(loc)
        if i == last or not (isinstance(p, str) and _UNION_MEMBER.fullmatch(p))
    )


_UNION_MEMBER = re.compile(r"str|int|float|bool|[A-Z]\w*|\w+\[.*\]")


def _model_card(v: Variant) -> dict:
    return {"id": v.name, "object": "model", "created": 0, "owned_by": "strop", "description": v.description}


def _usage(todo: list[Job]) -> dict:
    prompt = sum(len(j.prompt) for j in {id(j.prompt): j for j in todo}.values())
    completion = sum(len(j.tokens) for j in todo)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _threadsafe(loop: asyncio.AbstractEventLoop, fn, *first):
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

"""A request checked before the engine sees it: the API key, the body, the model, the prompt, the caps.

The order is the contract: the key first (401), then the body's size and its schema (limits.py; the
first error is named by its dotted field, 400), the model name (404), the chat template's verdict on
the messages (400), then the server's caps in `jobs` (400 when the request could never be served, 429
when it could be later). Every refusal is an `ApiError`; nothing here touches the engine but its load.
"""

from __future__ import annotations

import hmac
import re
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from starlette.requests import ClientDisconnect

from strop.core.errors import StropError
from strop.models.engine import Request as Job
from strop.serve.errors import ApiError
from strop.serve.limits import ChatRequest, CompletionRequest
from strop.serve.state import ServerState
from strop.serve.variants import Variant

Body = TypeVar("Body", bound=BaseModel)


def authorize(request: Request, api_key: str | None) -> None:
    """401 unless the request carries `Authorization: Bearer <api_key>` (any request when no key is set)."""
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")


async def read(request: Request, schema: type[Body], state: ServerState) -> Body:
    """The authorized request's body as `schema`, read no further than the body cap."""
    authorize(request, state.api_key)
    cap = state.limits.body_bytes
    size, chunks = 0, []
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise ApiError(400, f"request body over {cap} bytes", code="body_too_large")
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


def variant(state: ServerState, name: str) -> Variant:
    """The served model called `name`; 404 naming the models there are."""
    if name not in state.variants:
        raise ApiError(
            404,
            f"model {name!r} is not served here; models: {', '.join(state.variants)}",
            param="model",
            code="model_not_found",
        )
    return state.variants[name]


def render(v: Variant, messages: list[dict]) -> list[int]:
    """The prompt ids of a conversation in `v`'s chat template; 400 when the template refuses it."""
    try:
        return v.template.prompt_ids(messages)
    except StropError as e:
        raise ApiError(400, f"messages: {e}", param="messages") from None


def jobs(
    state: ServerState, body: ChatRequest | CompletionRequest, prompts: list[list[int]], v: Variant
) -> list[Job]:
    """The engine requests for a body, after every cap; 400 or 429 when one is broken."""
    limits, context = state.limits, state.context
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
    load = state.engine.load  # read once: the message names the count the refusal was decided on
    if load + wanted > limits.queue:
        raise ApiError(
            429,
            f"the server is busy ({load} choices queued or decoding, limit {limits.queue}); retry",
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

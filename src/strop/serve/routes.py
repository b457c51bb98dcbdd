"""The endpoints: /health, /v1/models, /v1/models/{name}, /v1/chat/completions and /v1/completions.

Each handler reads its server's `ServerState` from the request, checks the request (validation.py),
and answers whole (reply.py) or as a stream (streaming.py). Only /health is open without the API key.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from strop.models.engine import Request as Job
from strop.rag.prompt import augment, sources
from strop.serve.errors import ApiError
from strop.serve.limits import ChatRequest, CompletionRequest
from strop.serve.reply import whole
from strop.serve.state import ServerState, state_of
from strop.serve.streaming import stream
from strop.serve.validation import authorize, jobs, read, render, variant
from strop.serve.variants import Variant

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    state = state_of(request)
    return {"status": "ok", "models": list(state.variants), "load": state.engine.load}


@router.get("/v1/models")
async def list_models(request: Request):
    state = state_of(request)
    authorize(request, state.api_key)
    return {"object": "list", "data": [_model_card(v) for v in state.variants.values()]}


@router.get("/v1/models/{name:path}")
async def get_model(name: str, request: Request):
    state = state_of(request)
    authorize(request, state.api_key)
    return _model_card(variant(state, name))


@router.post("/v1/chat/completions")
async def chat(request: Request):
    """With RAG on, the last user turn's passages go into the prompt (rag/prompt.augment) and the reply
    carries them as a top-level "sources" list (a stream's first chunk does)."""
    state = state_of(request)
    body = await read(request, ChatRequest, state)
    v = variant(state, body.model)
    conversation = body.conversation()
    extra: dict = {}
    if state.rag is not None:
        retriever, top_k, mode = state.rag
        question = next((m["content"] for m in reversed(conversation) if m["role"] == "user"), "")
        hits = await asyncio.to_thread(retriever.search, question, top_k, mode) if question else []
        conversation, extra = augment(conversation, hits), {"sources": sources(hits)}
    todo = jobs(state, body, [render(v, conversation)], v)
    return await _respond(state, todo, body, v, chat=True, extra=extra)


@router.post("/v1/completions")
async def complete(request: Request):
    state = state_of(request)
    body = await read(request, CompletionRequest, state)
    v = variant(state, body.model)
    tok = v.template.tokenizer
    prompts = [tok(p)["input_ids"] for p in body.prompts()]
    if not prompts or any(not p for p in prompts):
        raise ApiError(400, "prompt: empty", param="prompt")
    return await _respond(state, jobs(state, body, prompts, v), body, v, chat=False, extra={})


async def _respond(
    state: ServerState,
    todo: list[Job],
    body: ChatRequest | CompletionRequest,
    v: Variant,
    chat: bool,
    extra: dict,
):
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return stream(state.engine, todo, v.name, chat, include_usage, extra)
    return await whole(state.engine, todo, v.name, chat, extra)


def _model_card(v: Variant) -> dict:
    return {"id": v.name, "object": "model", "created": 0, "owned_by": "strop", "description": v.description}

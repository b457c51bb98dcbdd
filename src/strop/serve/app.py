"""The HTTP app: OpenAI's /v1/models, /v1/chat/completions and /v1/completions, and /health.

`build_app` wires the parts together: the routes (routes.py), the state they share (state.py, on
`app.state.server`), the handlers that give every failure OpenAI's error body (errors.py), and a
lifespan that runs the engine's thread while the app serves.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException

from strop.models.engine import Engine
from strop.serve.errors import ApiError, api_error, http_error, internal_error
from strop.serve.limits import Limits
from strop.serve.routes import router
from strop.serve.state import ServerState
from strop.serve.variants import Variant


def build_app(
    engine: Engine,
    variants: dict[str, Variant],
    limits: Limits,
    api_key: str | None,
    rag: tuple | None = None,
) -> FastAPI:
    """The app over `engine` serving `variants`; its lifespan starts and stops the engine. `rag`:
    (Retriever, top_k, mode): chat requests are answered with passages for their last user turn
    (rag/prompt.augment), and the response carries them as a top-level "sources" list (the first
    chunk of a stream does)."""
    app = FastAPI(title="strop", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = ServerState(engine, variants, limits, api_key, rag)
    app.exception_handler(ApiError)(api_error)
    app.exception_handler(StarletteHTTPException)(http_error)
    app.exception_handler(Exception)(internal_error)
    app.include_router(router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    engine = app.state.server.engine
    engine.start()
    try:
        yield
    finally:
        engine.stop()  # after uvicorn's graceful shutdown: in-flight requests have finished

"""What every handler of one server shares, held on `app.state.server` (routes read it from the request)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from strop.models.engine import Engine
from strop.serve.limits import Limits
from strop.serve.variants import Variant


@dataclass(frozen=True)
class ServerState:
    """`rag`: (Retriever, top_k, mode), or None for a server that answers without passages."""

    engine: Engine
    variants: dict[str, Variant]  # by model name, the first one the base (or the run) itself
    limits: Limits
    api_key: str | None  # None: no Authorization header is asked for
    rag: tuple | None = None

    @property
    def context(self) -> int:
        """The model's context length in tokens: prompt and reply together."""
        return self.engine.max_length


def state_of(request: Request) -> ServerState:
    """The state of the app that `request` reached (serve's own app also when the dashboard mounts it)."""
    return request.app.state.server

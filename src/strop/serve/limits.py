"""What a request may ask for: OpenAI's request bodies (unknown fields refused) and the server's caps.

Every value that reaches the engine is one it can decode: numbers are finite (NaN and Infinity are
refused), temperature is 0 (greedy) or in (0, 2] (any positive value samples stably, see
models/engine._draw: a tiny one is greedy in effect), top_p in (0, 1], a seed is a signed 64-bit
integer (what torch and OpenAI accept), a prompt list is not empty. validation.py checks the server's caps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 2048  # per choice
    n: int = 8
    stop: int = 4  # OpenAI's own limit on stop strings
    prompt_tokens: int | None = None  # None: the model's context length
    body_bytes: int = 1 << 20
    queue: int = 64  # choices waiting or decoding; beyond it a request gets 429 (400 if it alone is larger)
    max_batch: int = 16  # choices decoded together


SEED_RANGE = (-(1 << 63), (1 << 63) - 1)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # accepted at their neutral values only (a setting the engine cannot honour is refused by name)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None
    logit_bias: dict[str, float] | None = None

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def unsupported(self) -> str | None:
        """The first field set to something this server does not do."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name
        if self.logprobs:
            return "logprobs"
        if self.logit_bias:
            return "logit_bias"
        return None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[dict]:
        # OpenAI's "developer" role is the system prompt of newer models
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


class CompletionRequest(_Body):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def budget(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else 16  # OpenAI's default for completions

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        if self.best_of not in (None, 1):
            return "best_of"
        return super().unsupported()


_Body.model_rebuild()
ChatRequest.model_rebuild()
CompletionRequest.model_rebuild()

"""The `judge` section: a model behind any OpenAI-compatible endpoint that compares or grades replies
(eval/judge.py). The API key is read from the environment variable `api_key_env` names, never from a
config file, so a config can be shared and a run folder holds no secret."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from strop.core.section import Section


class JudgeConfig(Section):
    endpoint: str = Field(
        description="the judge: an OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (strop serve, "
        "llama.cpp's server, vLLM, Ollama's /v1, a hosted API), or a strop run folder or catalogue model, "
        "which strop then serves itself on loopback while it judges"
    )
    mode: Literal["pairwise", "rubric", "both"] = Field(
        "pairwise",
        description="end of a run: pairwise (tuned vs base replies, both orders), rubric (each reply "
        "graded 1-10) or both",
    )
    reference: bool = Field(True, description="show the judge each example's reference reply when it has one")
    agreement: str | None = Field(
        None,
        description="held-out preference pairs {prompt, chosen, rejected}: the judge is scored on them "
        "first, and its agreement with the known preference is stated beside every win rate",
    )
    agreement_limit: int = Field(64, ge=1, description="at most this many pairs of `agreement`")
    model: str | None = Field(
        None, description="the model name the endpoint serves (default: the first it lists)"
    )
    api_key_env: str | None = Field(
        None, description="the environment variable holding the API key (the key itself is never in a config)"
    )
    concurrency: int = Field(4, ge=1, le=64, description="judge requests in flight at once")
    retries: int = Field(
        4, ge=0, le=20, description="tries again after a 429, a 5xx, a timeout or a lost connection"
    )
    timeout: float = Field(120.0, gt=0, description="seconds one judge request may take")
    max_tokens: int = Field(512, ge=1, description="longest judgment the judge may write")
    pairwise_template: str | None = Field(
        None,
        description="a file holding the pairwise prompt ({question}, {answer_a}, {answer_b}, {reference}); "
        "default: the shipped MT-Bench-style template (strop/eval/data/judge_pairwise.txt)",
    )
    rubric_template: str | None = Field(
        None,
        description="a file holding the grading prompt ({question}, {answer}, {reference}, {rubric}); "
        "default: strop/eval/data/judge_rubric.txt",
    )
    rubric: str = Field(
        "helpfulness, relevance, accuracy, depth and clarity",
        description="what single-answer grading scores, in the judge's words",
    )
    cache: bool = Field(
        True, description="keep judgments, keyed by judge, prompt and replies: a rerun costs nothing"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_key_in_the_file(cls, data: Any) -> Any:
        if isinstance(data, dict) and "api_key" in data:
            raise ValueError(
                "api_key: a key is never read from a config file; put it in an environment variable and "
                "name that variable in judge.api_key_env"
            )
        return data

"""Trying a finished run: chat, predict or score.

Chat is `strop serve` itself: the run is loaded by `serve.run.build` (its chat template, its end-of-turn
ids, the continuous-batching engine) and its OpenAI-compatible app answers `/try/RUN/v1/...`, so the
page streams from the same `/v1/chat/completions` any OpenAI client would use. Classification and
reward runs are tried through the public API's `Classifier.predict` and `RewardModel.score`.
One run is loaded at a time: trying another unloads the first (a small machine holds one model well).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from strop.core.errors import StropError
from strop.models.load import read_run_model
from strop.serve.limits import Limits

CHAT_TASKS = {"sft", "dpo", "kto", "ppo", "grpo"}


def kind(run_dir: Path) -> str | None:
    """How a run is tried: "chat", "predict", "score", or None for a run without an exported model."""
    run = read_run_model(run_dir)
    if run is None:
        return None
    task = run.get("task", "sft")
    return {"classification": "predict", "reward": "score"}.get(task, "chat" if task in CHAT_TASKS else None)


class Playground:
    """The one loaded run, by its folder."""

    def __init__(self, device: str = "auto"):
        self.device = device
        self._lock = threading.Lock()
        self._dir: Path | None = None
        self._loaded: Any = None  # (app, engine, model name) for chat, a Classifier or RewardModel
        self._kind: str | None = None

    def load(self, run_dir: Path) -> tuple[str, Any]:
        """(kind, what answers it) for `run_dir`, loading it unless it is the loaded run (blocking)."""
        with self._lock:
            if self._dir == run_dir and self._loaded is not None:
                return self._kind or "", self._loaded
            how = kind(run_dir)
            if how is None:
                raise StropError(f"{run_dir}: not a finished run (no model/strop_model.json to load)")
            self._unload()
            if how == "chat":
                from strop.serve.run import build

                app, engine, variants = build(str(run_dir), {}, Limits(), None, self.device)
                engine.start()
                self._loaded = (app, engine, next(iter(variants)))
            elif how == "predict":
                from strop.api import Classifier

                self._loaded = Classifier(run_dir, device=self.device)
            else:
                from strop.api import RewardModel

                self._loaded = RewardModel(run_dir, device=self.device)
            self._dir, self._kind = run_dir, how
            return how, self._loaded

    def close(self) -> None:
        with self._lock:
            self._unload()

    def _unload(self) -> None:
        if self._kind == "chat" and self._loaded is not None:
            self._loaded[1].stop()
        self._dir, self._loaded, self._kind = None, None, None

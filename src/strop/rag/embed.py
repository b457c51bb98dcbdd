"""Sentence embeddings from an encoder: mean pooling over the attention mask, then L2 normalisation,
as sentence-transformers computes them for all-MiniLM-L6-v2 (checked against it in tests/test_slow_rag.py).

The encoder is any Hugging Face encoder folder, hub id or catalogue encoder (`minilm-l6`, the packaged
all-MiniLM-L6-v2). Texts longer than the model's window are truncated to it, as sentence-transformers does;
the chunker keeps chunks inside it so nothing is cut.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from strop.core.device import set_threads
from strop.core.progress import tqdm

log = logging.getLogger("strop.rag")


class Embedder:
    def __init__(self, model: str, batch_size: int = 32, threads: int | None = None) -> None:
        from transformers import AutoModel

        from strop.models.load import from_pretrained, load_tokenizer, resolve_source

        set_threads(threads)
        self.name = model
        source = resolve_source(model, causal_lm=False)
        self.tokenizer = load_tokenizer(source)
        self.model = from_pretrained(AutoModel, source, dtype=torch.float32).eval()
        self.batch_size = batch_size
        self.max_tokens = _window(source, self.tokenizer, self.model)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def count(self, text: str) -> int:
        """Tokens of `text` without the special tokens the encoder adds around it."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def windows(self, text: str, size: int) -> list[tuple[int, int]]:
        """Character spans of consecutive windows of `size` tokens."""
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]
        return [
            (offsets[i][0], offsets[min(i + size, len(offsets)) - 1][1]) for i in range(0, len(offsets), size)
        ]

    @torch.no_grad()
    def embed(self, texts: list[str], progress: bool = False, what: str = "embedding") -> torch.Tensor:
        """[len(texts), dim] float32 unit vectors; longest texts batched together, order kept."""
        out = torch.empty(len(texts), self.dim)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        bar = tqdm(total=len(texts), desc=what, unit="chunk", disable=not progress or not texts)
        for at in range(0, len(order), self.batch_size):
            rows = order[at : at + self.batch_size]
            batch = self.tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[rows] = torch.nn.functional.normalize(pooled, p=2, dim=1)
            bar.update(len(rows))
        bar.close()
        return out


def _window(source: str, tokenizer, model) -> int:
    """Tokens the encoder reads: sentence-transformers' max_seq_length when the folder has one (256 for
    all-MiniLM-L6-v2), else the tokenizer's or the position embeddings' limit."""
    st = Path(source) / "sentence_bert_config.json"
    if st.is_file():
        try:
            return int(json.loads(st.read_text())["max_seq_length"])
        except (ValueError, KeyError, TypeError):
            log.warning("%s: no max_seq_length; using the model's limit", st)
    limits = [getattr(model.config, "max_position_embeddings", None), tokenizer.model_max_length]
    valid = [int(n) for n in limits if isinstance(n, int) and 0 < n < 100_000]
    return min(valid) if valid else 512

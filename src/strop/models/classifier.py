"""A sequence classifier: any transformers backbone (encoder or decoder), pooled to one vector per
text, then optional dense layers and a linear layer over the labels.

Pooling: `mean` over real tokens (what sentence encoders such as all-MiniLM were trained for), `cls`
(the first token, BERT's convention) or `last` (the last real token: the only position of a causal
decoder that has read the whole text). The backbone is frozen (method `head`, feature-based), partly
trained (`freeze`), adapted (`lora`) or fully trained (`full`); the head always trains.

Saved as a folder: the backbone (a PEFT adapter, or the full backbone) in transformers' layout,
`head.safetensors`, `classifier.json` (labels, pooling, head shape) and the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from strop.core.errors import StropError
from strop.models.load import from_pretrained, load_adapter, load_model, resolve_source, strop_run
from strop.models.trainable import keep_blocks

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CLASSIFIER_FILE = "classifier.json"
HEAD_FILE = "head.safetensors"


class SequenceClassifier(nn.Module):
    def __init__(
        self,
        backbone: PreTrainedModel,
        labels: list[str],
        pooling: str,
        head_layers: list[int],
        dropout: float,
    ):
        super().__init__()
        self.backbone, self.labels, self.pooling, self.head_layers = (
            backbone,
            list(labels),
            pooling,
            list(head_layers),
        )
        width, layers = backbone.config.hidden_size, []
        for w in head_layers:
            layers += [nn.Dropout(dropout), nn.Linear(width, w), nn.GELU()]
            width = w
        layers += [nn.Dropout(dropout), nn.Linear(width, len(labels))]
        self.head = nn.Sequential(*layers)
        self.features: dict[bytes, torch.Tensor] = {}  # pooled features by token ids (cache_features)

    @property
    def config(self):  # what generic code (dtype, counting) reads from a model
        return self.backbone.config

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(b, t, h), (b, t) right-padded -> (b, h)."""
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "last":
            last = attention_mask.sum(1) - 1  # (b,)
            return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (b, t, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)

    @torch.no_grad()
    def cache_features(self, rows: list, pad_id: int, batch_size: int = 64, progress=None) -> None:
        """Pool every example's backbone output once (eval mode): a frozen backbone's features never
        change, so head-only (feature-based) training then runs the head alone, every epoch."""
        was_training = self.backbone.training
        self.backbone.eval()
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        device = next(self.backbone.parameters()).device
        for start in range(0, len(order), batch_size):
            chunk = [rows[i] for i in order[start : start + batch_size]]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, r in enumerate(chunk):
                ids[b, : len(r)], mask[b, : len(r)] = torch.as_tensor(r, dtype=torch.long), 1
            hidden = self.backbone(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            pooled = self.pool(hidden.last_hidden_state, mask.to(device)).float()
            for b, r in enumerate(chunk):
                self.features[_key(r)] = pooled[b].clone()
            if progress is not None:
                progress.update(len(chunk))
        self.backbone.train(was_training)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (b, labels). A frozen backbone runs without building a graph (feature-based training
        then costs a forward pass only), or not at all for texts whose features are cached."""
        frozen = not any(p.requires_grad for p in self.backbone.parameters())
        if attention_mask is None:
            ref = input_ids if input_ids is not None else inputs_embeds  # (b, t) or (b, t, h)
            assert ref is not None, "forward needs input_ids or inputs_embeds"
            attention_mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
        if frozen and self.features and input_ids is not None:
            lengths = attention_mask.sum(1).tolist()
            keys = [_key(row[:n].tolist()) for row, n in zip(input_ids.cpu(), lengths, strict=True)]
            if all(k in self.features for k in keys):
                return self.head(torch.stack([self.features[k] for k in keys]))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not (frozen and inputs_embeds is None)):
            hidden = self.backbone(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                use_cache=False,
            ).last_hidden_state  # (b, t, h)
        return self.head(self.pool(hidden, attention_mask).float())

    def input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def save(self, out: Path, keep_layers: int | None = None) -> None:
        """Into an existing folder: the backbone (an adapter, the full backbone, or nothing when it was
        frozen and is the base model's), the head and classifier.json."""
        if any(p.requires_grad for p in self.backbone.parameters()) or keep_layers:
            from strop.models.trainable import save_adapter_or_model

            save_adapter_or_model(self.backbone, out)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
            str(out / HEAD_FILE),
        )
        meta = {
            "labels": self.labels,
            "pooling": self.pooling,
            "head_layers": self.head_layers,
            "keep_layers": keep_layers,
        }
        (out / CLASSIFIER_FILE).write_text(json.dumps(meta, indent=2))


def _key(ids) -> bytes:
    return np.asarray(ids, dtype=np.int64).tobytes()


def default_pooling(backbone_config) -> str:
    """Encoders: mean over tokens; causal decoders: the last real token."""
    return "last" if getattr(backbone_config, "is_decoder", False) or _is_causal(backbone_config) else "mean"


def _is_causal(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForCausalLM") for a in archs) or config.model_type in {
        "llama",
        "gpt2",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "phi",
        "phi3",
        "gpt_neox",
        "olmo",
    }


def load_backbone(name: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
    """The bare transformer (no LM or pooler head) of any model source, including a strop LM run (its
    adapter merged)."""
    if strop_run(name) is not None:
        return load_model(name, device, dtype, trust_remote_code).base_model
    return _bare_model(resolve_source(name, causal_lm=False), device, dtype, trust_remote_code)


def _bare_model(source: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
    """transformers' AutoModel of a folder: the bare transformer of any architecture, encoders included."""
    from transformers import AutoModel

    model = from_pretrained(AutoModel, source, trust_remote_code, dtype=dtype, use_safetensors=True)
    return model.to(device)


def load_classifier(
    model_dir: Path, base: str, device: torch.device, dtype: torch.dtype
) -> SequenceClassifier:
    """A saved classifier; `base` is the model source it was trained from (for an adapter or a frozen,
    unsaved backbone)."""
    model_dir = Path(model_dir)
    meta_file = model_dir / CLASSIFIER_FILE
    if not meta_file.is_file():
        raise StropError(f"{model_dir}: not a strop classifier (no {CLASSIFIER_FILE})")
    meta = json.loads(meta_file.read_text())
    if (model_dir / "config.json").is_file():  # the full backbone was saved, as a bare AutoModel
        # (not through load_backbone: the folder is a strop run's, which it would read as a causal LM,
        # and an encoder such as DeBERTa-v2 or ModernBERT has no causal-LM class)
        backbone = _bare_model(str(model_dir), device, dtype)
    else:
        backbone = load_backbone(base, device, dtype)
        if meta.get("keep_layers"):
            keep_blocks(backbone, meta["keep_layers"])
        if (model_dir / "adapter_config.json").is_file():
            backbone = load_adapter(backbone, str(model_dir))
    model = SequenceClassifier(backbone, meta["labels"], meta["pooling"], meta["head_layers"], 0.0)
    model.head.load_state_dict(load_file(str(Path(model_dir) / HEAD_FILE)))
    return model.to(device).eval()

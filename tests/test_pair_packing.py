"""Packed preference pairs (train.batch_tokens for task dpo): each side of a pair is a segment of its
own, and the policy's per-reply log-probs, the DPO/ORPO losses and their counts equal those of the
padded pair batch of the same pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from strop.data.batches import collate_pairs
from strop.data.packing import collate_packed_pairs, pack, pair_lengths
from strop.data.tokenized import TokenizedSet
from strop.methods.dpo import DPO, reply_lengths, reply_logps
from strop.methods.orpo import ORPO
from strop.models.attention import enable_segment_attention

PAD = 0


def synthetic_pairs(n: int, vocab: int, seed: int = 0) -> TokenizedSet:
    """Pairs sharing a random prompt, replies of different lengths; only the replies are trained."""
    rng = np.random.default_rng(seed)
    chosen, rejected = [], []
    for _ in range(n):
        prompt = rng.integers(1, vocab, int(rng.integers(3, 12))).astype(np.int32)
        for side in (chosen, rejected):
            reply = rng.integers(1, vocab, int(rng.integers(2, 9))).astype(np.int32)
            side.append((np.concatenate([prompt, reply]), np.arange(len(prompt) + len(reply)) >= len(prompt)))
    ts = TokenizedSet([c[0] for c in chosen], [c[1] for c in chosen], [f"p{i}" for i in range(n)])
    ts.rejected = TokenizedSet([r[0] for r in rejected], [r[1] for r in rejected], list(ts.example_ids))
    ts.reference = rng.normal(-30, 5, (n, 2)).astype(np.float32)
    return ts


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_pairs_give_the_padded_log_probs(arch, tiny_llama, tiny_gpt2):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama if arch == "llama" else tiny_gpt2, dtype=torch.float32
    )
    model.eval()
    enable_segment_attention(model)
    ts = synthetic_pairs(7, model.config.vocab_size)
    rows = pack(pair_lengths(ts), 48)
    assert len(rows) > 1 and any(len(r) > 1 for r in rows)  # several pairs share a row
    packed = collate_packed_pairs(ts, rows, PAD)
    padded = collate_pairs(ts, [i for row in rows for i in row], PAD)
    with torch.no_grad():
        a, b = reply_logps(model, packed), reply_logps(model, padded)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-5)
    assert torch.equal(reply_lengths(packed), reply_lengths(padded))
    for objective in (DPO(beta=0.1), ORPO(beta=0.2)):
        p, q = objective.loss(model, packed), objective.loss(model, padded)
        assert p.count == q.count == 7
        assert p.total.item() == pytest.approx(q.total.item(), abs=1e-4)


def test_a_packed_dpo_run_trains(tiny_llama, tmp_path):
    import strop
    from test_preference import dpo_config

    cfg = dpo_config(tiny_llama, tmp_path)
    cfg["train"] = {**cfg["train"], "batch_tokens": 256, "max_steps": 4}
    result = strop.train(cfg, show_progress=False)
    assert result.metrics["steps"] == 4 and np.isfinite(result.metrics["loss"])

"""Padded vs packed forward + backward on CPU with the packaged SmolLM2-135M (fp32, full fine-tuning).

Eight examples with SFT-like lengths, one micro-batch, the SFT loss (summed cross-entropy on the
response tokens) and its backward. Throughput counts real tokens only; median of --repeats runs after
one warm-up.

    python bench/packing_cpu.py
    python bench/packing_cpu.py --examples 16 --budget 2048 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from strop.data.batches import IGNORE, collate
from strop.data.packing import MODEL_KEYS, collate_packed, pack
from strop.data.tokenized import TokenizedSet
from strop.models.attention import enable_segment_attention
from strop.models.load import load_causal_lm, resolve_source


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )


def timed(model, kwargs: dict, labels: torch.Tensor, repeats: int) -> float:
    times = []
    for k in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        sft_loss(model(**kwargs).logits, labels).backward()
        if k:  # the first run warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--examples", type=int, default=8)
    p.add_argument("--min-len", type=int, default=60)
    p.add_argument("--max-len", type=int, default=400)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    model = load_causal_lm(resolve_source(args.model), torch.device("cpu"), torch.float32)
    model.train()
    model.config.use_cache = False
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.min_len, args.max_len + 1, args.examples).tolist()
    ids = [rng.integers(10, model.config.vocab_size, n).astype(np.int32) for n in lengths]
    trained = [np.arange(n) >= n // 3 for n in lengths]  # a third prompt, the rest response
    ts = TokenizedSet(ids, trained, [str(i) for i in range(len(ids))])
    real = sum(lengths)
    print(f"{torch.get_num_threads()} threads; lengths {lengths} ({real} real tokens)")

    padded = collate(ts, list(range(len(ts))), 0)
    kw = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
    model.set_attn_implementation("sdpa")
    t_pad = timed(model, kw, padded["labels"], args.repeats)
    shape = tuple(padded["input_ids"].shape)
    print(f"padded  sdpa      {shape}: {t_pad:.3f} s, {real / t_pad:7.0f} real tokens/s")

    rows = pack(lengths, args.budget)
    packed = collate_packed(ts, rows, 0)
    shape = tuple(packed["input_ids"].shape)
    kw = {k: packed[k] for k in MODEL_KEYS}
    enable_segment_attention(model)
    t_seg = timed(model, kw, packed["labels"], args.repeats)
    print(
        f"packed  segments  {shape}: {t_seg:.3f} s, {real / t_seg:7.0f} real tokens/s ({t_pad / t_seg:.2f}x)"
    )

    # transformers' own packed path for reference: a dense block-diagonal mask built from position_ids
    model.set_attn_implementation("sdpa")
    kw = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]}
    t_dense = timed(model, kw, packed["labels"], args.repeats)
    print(f"packed  sdpa+mask {shape}: {t_dense:.3f} s, {real / t_dense:7.0f} real tokens/s")


if __name__ == "__main__":
    main()

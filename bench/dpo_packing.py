"""Padded vs packed DPO steps on CPU with the packaged SmolLM2-135M (fp32, LoRA r16 as the shipped
DPO config): the policy's forward + backward on the same preference pairs, once as a padded pair batch
(chosen rows then rejected rows, as `train.batch_size` gives) and once packed into rows of
`--budget` tokens (`train.batch_tokens`), both sides of a pair each a segment of its own.

Pairs are real HH-RLHF harmless-base pairs (../shared/data), rendered and cut as a DPO run renders
them (`data.max_length`). Throughput counts real tokens of both sides; median of --repeats runs after
one warm-up; the two layouts alternate so machine noise hits both alike. The per-reply log-probs of
the two layouts are compared too (they must agree).

    python bench/dpo_packing.py
    python bench/dpo_packing.py --pairs 16 --budget 1024 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from strop.core.config import DataConfig, DatasetSource, MethodConfig
from strop.data.batches import collate_pairs
from strop.data.packing import collate_packed_pairs, pack, pair_lengths
from strop.data.pairs import build_pairs
from strop.data.template import ChatTemplate, resolve_template
from strop.methods.dpo import DPO
from strop.models.attention import enable_segment_attention
from strop.models.load import load_causal_lm, load_tokenizer, resolve_source
from strop.models.trainable import apply_method

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_rlhf" / "harmless_base.train.jsonl"


def step_seconds(model, objective, batch: dict) -> float:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    objective.loss(model, batch).total.backward()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default=str(HH))
    p.add_argument("--pairs", type=int, default=8, help="pairs per step (the padded batch size)")
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument(
        "--budget", type=int, default=None, help="packed row budget (default: the padded batch's tokens)"
    )
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    source = resolve_source(args.model)
    tok = load_tokenizer(source)
    template = ChatTemplate(tok, resolve_template("auto", tok)[1])
    cfg = DataConfig(
        train=[DatasetSource(path=args.data, limit=args.pairs * 4)],
        val_fraction=0.0,
        max_length=args.max_length,
    )
    ts = build_pairs(cfg, template, 0).train
    ts.reference = torch.zeros(len(ts), 2).numpy()
    index = list(range(args.pairs))
    padded = collate_pairs(ts, index, tok.pad_token_id)
    real = int(padded["attention_mask"].sum())
    budget = args.budget or 2 * args.max_length * 4
    sub = ts.subset(index)
    rows = pack(pair_lengths(sub), budget)
    packed = collate_packed_pairs(sub, rows, tok.pad_token_id)

    model = load_causal_lm(source, torch.device("cpu"), torch.float32)
    model = apply_method(model, MethodConfig(name="lora", lora={"r": 16, "alpha": 32, "dropout": 0.0}))
    enable_segment_attention(model)
    model.train()
    objective = DPO()
    with torch.no_grad():
        agree = (objective.loss(model, packed).total - objective.loss(model, padded).total).abs().item()
    times: dict[str, list[float]] = {"padded": [], "packed": []}
    for k in range(args.repeats + 1):
        for name, batch in (("padded", padded), ("packed", packed)):
            t = step_seconds(model, objective, batch)
            if k:
                times[name].append(t)
    cells = {
        "padded": padded["input_ids"].numel(),
        "packed": packed["input_ids"].numel(),
    }
    print(
        f"{args.pairs} HH pairs, {real} real tokens (both sides), max_length {args.max_length}; "
        f"packed into {len(rows)} row(s) of <= {budget} tokens; |loss difference| {agree:.2e}"
    )
    print("| layout | tensor cells | s / step (median) | real tokens / s |")
    print("|---|---|---|---|")
    for name in ("padded", "packed"):
        s = statistics.median(times[name])
        print(f"| {name} | {cells[name]} | {s:.2f} | {real / s:.0f} |")
    speedup = statistics.median(times["padded"]) / statistics.median(times["packed"])
    print(f"packed / padded throughput: {speedup:.2f}x")


if __name__ == "__main__":
    main()

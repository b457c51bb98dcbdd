"""int8 on CPU: fp32 vs torch's dynamic int8 (what `--quantize int8` uses) vs torchao's int8 configs,
on the packaged model, in one run: decode tokens/s through strop's engine at batch 1 and 8 (greedy,
GSM8K questions) and perplexity on WikiText-2 test text.

    python bench/quantize.py            # 8 questions x 64 new tokens, 16 windows of 256 tokens (~6 min)
    python bench/quantize.py --quick

torchao is a bench-only dependency (`pip install -e '.[bench]'`); without it those rows are skipped.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import warnings
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def perplexity(model, tok, text: str, windows: int, width: int) -> float:
    ids = tok(text)["input_ids"][: windows * width]
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - width + 1, width):
            x = torch.tensor([ids[start : start + width]])
            loss = model(input_ids=x, labels=x).loss
            total, count = total + float(loss) * (width - 1), count + width - 1
    return math.exp(total / count)


def throughput(model, loaded, prompts, batch: int, max_new: int) -> tuple[float, list[list[int]]]:
    from strop.models.engine import Engine, Request

    reqs = [Request(p, max_new_tokens=max_new) for p in prompts]
    t0 = time.perf_counter()
    Engine(model, loaded.tokenizer, loaded.template.stop_ids, max_batch=batch).run(reqs)
    seconds = time.perf_counter() - t0
    return sum(len(r.tokens) for r in reqs) / seconds, [r.tokens for r in reqs]


def variants(base):
    yield "fp32", base
    from strop.models.quantize import quantize_model

    yield "torch dynamic int8 (--quantize int8)", quantize_model(copy.deepcopy(base), "int8")
    yield "torch dynamic int8, lm_head too", quantize_model(copy.deepcopy(base), "int8", skip=("down_proj",))
    yield "torch dynamic int8, every linear layer", quantize_model(copy.deepcopy(base), "int8", skip=())
    try:
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    except ImportError:
        print("torchao is not installed: its rows are skipped")
        return
    for name, config in (
        ("torchao int8 weight-only", Int8WeightOnlyConfig()),
        ("torchao int8 dyn-act + int8 weight", Int8DynamicActivationInt8WeightConfig()),
    ):
        model = copy.deepcopy(base)
        quantize_(model, config)
        yield name, model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.quick:
        args.questions, args.max_new_tokens, args.windows = 4, 32, 4
    warnings.filterwarnings("ignore")
    from strop.models.inference import load_for_inference

    loaded = load_for_inference(args.model, device="cpu")
    rows = [
        json.loads(x) for x in (SHARED / "gsm8k" / "train.jsonl").read_text().splitlines()[: args.questions]
    ]
    prompts = [loaded.template.prompt_ids([{"role": "user", "content": r["question"]}]) for r in rows]
    text = "\n".join(
        json.loads(x)["text"]
        for x in (SHARED / "wikitext2" / "wiki_test_articles.jsonl").read_text().splitlines()[:20]
    )
    print(
        f"{args.model}: {len(prompts)} GSM8K prompts x {args.max_new_tokens} new tokens (greedy); perplexity on "
        f"{args.windows} x {args.width} WikiText-2 tokens; {torch.get_num_threads()} threads",
        flush=True,
    )
    results, reference = [], None
    for name, model in variants(loaded.model):
        row = {"variant": name, "ppl": perplexity(model, loaded.tokenizer, text, args.windows, args.width)}
        for batch in (1, 8):
            row[f"tok_s_b{batch}"], tokens = throughput(model, loaded, prompts, batch, args.max_new_tokens)
            if batch == 1:
                reference = tokens if reference is None else reference
                row["same_greedy"] = sum(a == b for a, b in zip(tokens, reference, strict=True))
        results.append(row)
        print(
            f"  {name}: ppl {row['ppl']:.3f}, {row['tok_s_b1']:.2f} tok/s at batch 1, {row['tok_s_b8']:.2f} at 8, "
            f"{row['same_greedy']}/{len(prompts)} greedy replies as fp32",
            flush=True,
        )
    fp32 = results[0]
    print(
        "\n| variant | perplexity | Δ vs fp32 | tok/s batch 1 | × fp32 | tok/s batch 8 | × fp32 | greedy = fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['variant']} | {r['ppl']:.3f} | {100 * (r['ppl'] / fp32['ppl'] - 1):+.1f}% | {r['tok_s_b1']:.2f} | "
            f"{r['tok_s_b1'] / fp32['tok_s_b1']:.2f} | {r['tok_s_b8']:.2f} | {r['tok_s_b8'] / fp32['tok_s_b8']:.2f} | "
            f"{r['same_greedy']}/{len(prompts)} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

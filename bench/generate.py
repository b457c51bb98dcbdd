"""Generation throughput: transformers' `model.generate` in fixed batches (what `strop generate`,
`strop eval` and RL rollouts did before the decoding engine) vs strop's engine (continuous batching),
on the packaged model and the same GSM8K questions, greedy, at batch 1 and 8, in one run.

    python bench/generate.py                 # 16 questions, 128 new tokens (~8 min on 2 cores)
    python bench/generate.py --quick         # 8 questions, 48 new tokens

Tokens/s counts the reply tokens each request keeps (up to and including its end-of-turn), so a fixed
batch that runs on for its longest member gets no credit for the padding it decodes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


def fixed_batches(loaded, prompts: list[list[int]], batch: int, max_new: int) -> list[list[int]]:
    """The old path: prompts sorted by length, left-padded batches, `model.generate` on each."""
    tok, stops = loaded.tokenizer, sorted(loaded.template.stop_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(chunk):
            ids[r, width - len(prompts[i]) :], mask[r, width - len(prompts[i]) :] = (
                torch.tensor(prompts[i]),
                1,
            )
        with torch.inference_mode():
            gen = loaded.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=pad,
            )
        for r, i in enumerate(chunk):
            row = gen[r, width:].tolist()
            end = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
            out[i] = row[:end]
    return out


def engine(loaded, prompts: list[list[int]], batch: int, max_new: int) -> list[list[int]]:
    from strop.models.engine import Engine, Request

    reqs = [Request(p, max_new_tokens=max_new) for p in prompts]
    Engine(loaded.model, loaded.tokenizer, loaded.template.stop_ids, max_batch=batch).run(reqs)
    return [r.tokens for r in reqs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.quick:
        args.questions, args.max_new_tokens = 8, 48
    from strop.models.inference import load_for_inference

    torch.manual_seed(0)
    loaded = load_for_inference(args.model, device="cpu")
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()[: args.questions]]
    prompts = [loaded.template.prompt_ids([{"role": "user", "content": r["question"]}]) for r in rows]
    print(
        f"{len(prompts)} GSM8K questions, greedy, max {args.max_new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    results, replies = [], {}
    for batch in map(int, args.batches.split(",")):
        for name, fn in (("model.generate", fixed_batches), ("strop engine", engine)):
            t0 = time.perf_counter()
            out = fn(loaded, prompts, batch, args.max_new_tokens)
            seconds = time.perf_counter() - t0
            tokens = sum(map(len, out))
            replies[(name, batch)] = out
            results.append(
                {
                    "runner": name,
                    "batch": batch,
                    "seconds": round(seconds, 1),
                    "tokens": tokens,
                    "tokens_per_s": round(tokens / seconds, 2),
                }
            )
            print(
                f"  {name:15s} batch {batch}: {seconds:6.1f} s  {tokens} tokens  {tokens / seconds:6.2f} tok/s",
                flush=True,
            )
    print("\n| batch | model.generate tok/s | engine tok/s | engine / generate | same greedy tokens |")
    print("|---|---|---|---|---|")
    for batch in map(int, args.batches.split(",")):
        g, e = (
            next(r for r in results if r["runner"] == n and r["batch"] == batch)
            for n in ("model.generate", "strop engine")
        )
        same = sum(
            a == b
            for a, b in zip(replies[("model.generate", batch)], replies[("strop engine", batch)], strict=True)
        )
        print(
            f"| {batch} | {g['tokens_per_s']} | {e['tokens_per_s']} | "
            f"{e['tokens_per_s'] / g['tokens_per_s']:.2f}x | {same}/{len(prompts)} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

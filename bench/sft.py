"""Side-by-side SFT benchmark: strop vs TRL's SFTTrainer, same model, LoRA, rows, template, lengths,
learning rate and examples per optimizer step, in one run. Each trainer runs in its own process so
peak RSS is its own.

    python bench/sft.py            # 128 train rows, 64 validation rows (~20 min on 2 cores)
    python bench/sft.py --quick    # 32 / 16 rows
    python bench/sft.py --only strop

Needs `pip install -e '.[bench]'` (trl, psutil) for the TRL side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "instructions" / "alpaca_en_demo.train.jsonl"
RUNNERS = ("strop", "strop-packed", "trl", "trl-packing")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--train-rows", type=int, default=128)
    p.add_argument("--val-rows", type=int, default=64)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="examples per micro-batch")
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-dropout", type=float, default=0.0, help="peft's, strop's and TRL's default")
    p.add_argument("--quick", action="store_true", help="32 train / 16 validation rows")
    p.add_argument("--only", default=",".join(RUNNERS), help=f"comma-separated subset of {RUNNERS}")
    p.add_argument("--strop-set", action="append", default=[], help="extra strop config override")
    p.add_argument("--worker", choices=RUNNERS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.train_rows, args.val_rows = 32, 16
    if args.worker:
        result = WORKERS[args.worker](args)
        Path(args.out).write_text(json.dumps(result))
        return

    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak (2048x2048, {os.cpu_count()} CPUs): {peak:.1f} GFLOP/s", flush=True)
    results = {}
    for name in args.only.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "r.json"
            cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", name, "--out", str(out)]
            print(f"running {name} ...", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not out.exists():
                results[name] = {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
                Path(f"bench-{name}.log").write_text(proc.stdout + proc.stderr)
                print(f"  {name} failed: {results[name]['error']} (log: bench-{name}.log)", flush=True)
                continue
            results[name] = json.loads(out.read_text())
            print(f"  {json.dumps(results[name])}", flush=True)
    print_table(results, peak, args)


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def rows(args) -> tuple[list[dict], list[dict]]:
    data = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    return data[: args.train_rows], data[-args.val_rows :]


def _user(r: dict) -> str:
    from strop.data.formats import alpaca_user_turn

    return alpaca_user_turn(r["instruction"], r.get("input") or "")


def validation_loss(model, tokenizer, val_rows: list[dict], max_length: int) -> float:
    """The same evaluation for every runner: strop's template, masking and token-mean loss."""
    from strop.data.batches import collate
    from strop.data.formats import Record
    from strop.data.template import ChatTemplate, resolve_template
    from strop.data.tokenized import tokenize_records
    from strop.methods.sft import evaluate

    template = ChatTemplate(tokenizer, resolve_template("auto", tokenizer)[1])
    recs = [
        Record(str(i), ({"role": "user", "content": _user(r)}, {"role": "assistant", "content": r["output"]}))
        for i, r in enumerate(val_rows)
    ]
    ts = tokenize_records(recs, template, max_length, train_on_prompt=False)
    batches = [
        collate(ts, list(range(i, min(i + 4, len(ts)))), tokenizer.pad_token_id) for i in range(0, len(ts), 4)
    ]
    return evaluate(model, batches)["val_loss"]


def real_tokens(tokenizer, train_rows: list[dict], max_length: int) -> int:
    from strop.data.template import ChatTemplate, resolve_template

    template = ChatTemplate(tokenizer, resolve_template("auto", tokenizer)[1])
    msgs = [
        [{"role": "user", "content": _user(r)}, {"role": "assistant", "content": r["output"]}]
        for r in train_rows
    ]
    return sum(min(len(template.encode(m).ids), max_length) for m in msgs)


def run_strop(args, packed: bool = False) -> dict:
    import strop
    from strop.models.load import load_tokenizer, resolve_source

    train_rows, val_rows = rows(args)
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "train.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
        cfg = strop.load_config(
            {
                "name": "bench",
                "output_dir": tmp,
                "model": {"name": args.model},
                "data": {
                    "train": [str(f)],
                    "val_fraction": 0.0,
                    "max_length": args.max_length,
                    "cache_dir": tmp,
                },
                "method": {"name": "lora", "lora": {"r": 16, "alpha": 32, "dropout": args.lora_dropout}},
                "optim": {"lr": args.lr, "schedule": "linear", "grad_clip": 1.0},
                "train": {"batch_size": args.batch, "grad_accum": args.accum, "epochs": 1, "seed": 42},
            },
            # packed: rows of up to max_length tokens (~2 examples here) and twice the accumulation, so a
            # step holds about as many examples as batch x accum; rows of 1024 run no faster on CPU and
            # hold twice the activations
            args.strop_set
            + (
                [f"train.batch_tokens={args.max_length}", f"train.grad_accum={2 * args.accum}"]
                if packed
                else []
            ),
        )
        t0 = time.perf_counter()
        result = strop.train(cfg, show_progress=False)  # load, tokenize, train, save the adapter
        wall = time.perf_counter() - t0
        rss = peak_rss_gb()
        train_s = train_seconds(result.run_dir / "metrics.jsonl")
        from strop.models.inference import load_for_inference

        loaded = load_for_inference(str(result.run_dir))
        tok = load_tokenizer(resolve_source(args.model))
        val = validation_loss(loaded.model, tok, val_rows, args.max_length)
    return _summary(
        wall,
        train_s,
        rss,
        train_rows,
        real_tokens(tok, train_rows, args.max_length),
        val,
        result.metrics["steps"],
    )


def run_trl(args, packing: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from strop.models.load import load_causal_lm, load_tokenizer, resolve_source

    train_rows, val_rows = rows(args)
    t0 = time.perf_counter()  # end to end, as for strop: load, tokenize, train, save the adapter
    source = resolve_source(args.model)
    tok = load_tokenizer(source)
    model = load_causal_lm(source, torch.device("cpu"), torch.float32)
    ds = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": _user(r)}],
                "completion": [{"role": "assistant", "content": r["output"]}],
            }
            for r in train_rows
        ]
    )
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(
            output_dir=tmp,
            per_device_train_batch_size=args.batch,  # with packing: rows of max_length tokens
            gradient_accumulation_steps=args.accum,
            learning_rate=args.lr,
            num_train_epochs=1,
            lr_scheduler_type="linear",
            max_grad_norm=1.0,
            max_length=args.max_length,
            completion_only_loss=True,
            packing=packing,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=42,
        )
        lora = LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=args.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        trainer = SFTTrainer(
            model=model, args=config, train_dataset=ds, processing_class=tok, peft_config=lora
        )
        t1 = time.perf_counter()
        out = trainer.train()
        train_s = time.perf_counter() - t1
        trainer.save_model(tmp)
        wall = time.perf_counter() - t0
        rss = peak_rss_gb()
        val = validation_loss(trainer.model, tok, val_rows, args.max_length)
    return _summary(
        wall, train_s, rss, train_rows, real_tokens(tok, train_rows, args.max_length), val, out.global_step
    )


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def train_seconds(metrics_file: Path) -> float:
    """Seconds strop's training loop ran (first to last optimizer step), from the run's metrics.jsonl."""
    times = [json.loads(line).get("elapsed_s") for line in metrics_file.read_text().splitlines()]
    return max(t for t in times if t is not None)


def _summary(
    wall: float, train_s: float, rss: float, train_rows: list, tokens: int, val: float, steps: int
) -> dict:
    return {
        "wall_s": wall,
        "train_s": train_s,
        "peak_rss_gb": rss,
        "examples_per_s": len(train_rows) / wall,
        "real_tokens_per_s": tokens / wall,
        "val_loss": val,
        "steps": steps,
        "tokens": tokens,
    }


WORKERS = {
    "strop": run_strop,
    "strop-packed": lambda a: run_strop(a, packed=True),
    "trl": run_trl,
    "trl-packing": lambda a: run_trl(a, packing=True),
}


def print_table(results: dict, peak: float, args) -> None:
    n_params = 134_515_008  # SmolLM2-135M, tied embeddings counted once (the LM head's matmul)
    print(
        f"\nSFT, LoRA r16 all-linear, {args.train_rows} train rows / {args.val_rows} validation rows, "
        f"max_length {args.max_length}, {args.batch}x{args.accum} examples per step, lr {args.lr}, "
        f"LoRA dropout {args.lora_dropout}\n"
    )
    print(
        "| runner | examples/s | real tokens/s | wall s | train s | peak RSS GB | val loss | steps | MFU in training (4N/token) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    base = results.get("trl", {}).get("examples_per_s")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {' '.join(r['error'])[:80]} | | | | | | | |")
            continue
        mfu = r["tokens"] / r["train_s"] * 4 * n_params / (peak * 1e9)  # over the training loop's time
        speed = f" ({r['examples_per_s'] / base:.2f}x)" if base and name != "trl" else ""
        print(
            f"| {name} | {r['examples_per_s']:.3f}{speed} | {r['real_tokens_per_s']:.1f} | {r['wall_s']:.0f} | "
            f"{r['train_s']:.0f} | "
            f"{r['peak_rss_gb']:.2f} | {r['val_loss']:.4f} | {r['steps']} | {mfu:.0%} |"
        )


if __name__ == "__main__":
    main()

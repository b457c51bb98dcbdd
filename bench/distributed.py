"""One process x 2 threads vs 2 processes x 1 thread (DDP, then FSDP) on this CPU, at the same global
batch: training tokens/s (steps after the first) and peak resident memory of the largest process, as
`strop train` runs.

    python bench/distributed.py [--steps 8] [--batch 8] [--config quickstart] [--method lora|full]

Each arm is its own `strop train` (the second with `--nproc 2`); they run one after the other, never side
by side. Tokens/s is the run's own figure (metrics.jsonl: real tokens of all processes per step time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# runs the arm as its child and prints the peak RSS of the largest process under it (KiB)
MEASURE = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)"
)


def arm(
    name: str, config: str, out: Path, steps: int, batch: int, nproc: int, method: str, parallel: str = "ddp"
) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "strop",
        "train",
        config,
        "--no-progress",
        "--set",
        f"name={name}",
        "--set",
        f"output_dir={out}",
        "--set",
        f"train.max_steps={steps}",
        "--set",
        "eval.enabled=false",
        "--set",
        f"train.batch_size={batch // nproc}",
        "--set",
        f"train.eval_every={steps}",
        "--set",
        f"method.name={method}",
        "--set",
        f"train.parallel={parallel}",
    ]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"{name} failed:\n{p.stderr[-3000:]}")
    peak = int(p.stderr.strip().splitlines()[-1])  # KiB: the largest process of this arm's tree
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    return {"arm": name, "tokens_per_s": statistics.median(tps), "peak_rss_mb": peak / 1024, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8, help="global micro-batch")
    ap.add_argument("--config", default="quickstart")
    ap.add_argument("--method", default="lora", choices=["lora", "full"])
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="strop-bench-dist-"))
    common = (args.config, out, args.steps, args.batch)
    rows = [
        arm("one-x2-threads", *common, 1, args.method),
        arm("two-x1-thread-ddp", *common, 2, args.method),
        arm("two-x1-thread-fsdp", *common, 2, args.method, "fsdp"),
    ]
    print("| arm | tokens/s (median) | peak RSS of the largest process | wall s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} MB | {r['wall_s']:.0f} |")
    for r in rows[1:]:
        ratio = r["tokens_per_s"] / rows[0]["tokens_per_s"]
        print(
            f"ratio {r['arm']}/one tokens/s: {ratio:.2f}; memory {r['peak_rss_mb'] / rows[0]['peak_rss_mb']:.2f}"
        )


if __name__ == "__main__":
    main()

"""One process x 2 threads vs 2 processes x 1 thread (DDP, then FSDP) on this CPU, at the same global
batch: training tokens/s (steps after the first) and the resident memory of the largest process while the steps run
(sampled every 0.1 s) and over the whole run (loading and export included), as `strop train` runs.

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
    p = subprocess.Popen(
        [sys.executable, "-c", MEASURE, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics, train_peak = out / name / "metrics.jsonl", 0
    while p.poll() is None:  # the largest process's RSS while the steps run (until the last step's record)
        if metrics.exists() and f'"step": {steps},' in metrics.read_text():
            break
        train_peak = max(train_peak, _largest_rss(p.pid))
        time.sleep(0.1)
    _, err = p.communicate()
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"{name} failed:\n{err[-3000:]}")
    peak = int(err.strip().splitlines()[-1])  # KiB: the largest process of this arm's tree, whole run
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    return {
        "arm": name,
        "tokens_per_s": statistics.median(tps),
        "train_rss_mb": train_peak / 2**20,
        "peak_rss_mb": peak / 1024,
        "wall_s": wall,
    }


def _largest_rss(pid: int) -> int:
    """Bytes: the resident memory of the largest process under `pid`."""
    import psutil

    try:
        procs = psutil.Process(pid).children(recursive=True)
        return max((q.memory_info().rss for q in procs), default=0)
    except psutil.Error:
        return 0


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
    print(
        "| arm | tokens/s (median) | largest process while training | largest process, whole run | wall s |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['arm']} | {r['tokens_per_s']:.0f} | {r['train_rss_mb']:.0f} MB | {r['peak_rss_mb']:.0f} MB "
            f"| {r['wall_s']:.0f} |"
        )
    for r in rows[1:]:
        ratio = r["tokens_per_s"] / rows[0]["tokens_per_s"]
        mem = r["train_rss_mb"] / rows[0]["train_rss_mb"]
        print(f"ratio {r['arm']}/one: tokens/s {ratio:.2f}, memory while training {mem:.2f}")


if __name__ == "__main__":
    main()

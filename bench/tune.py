"""`strop tune --refit` on shared data, as a user would run it: the README's search figures.

    python bench/tune.py                      # both searches (~1 h on 2 cores)
    python bench/tune.py --only sentiment     # customer-review sentiment, packaged MiniLM + LoRA
    python bench/tune.py --only sft           # alpaca instructions, SmolLM2-135M-Instruct + LoRA

Each search splits its shared dataset with `strop data prepare` (80/10/10, deduplicated, stratified),
runs the example config in examples/tune/ (TPE, median pruning; 12 trials for sentiment, 8 for SFT), refits the best and the
default config and prints: trials by state, the steps pruning saved, wall time, the best parameters,
and default vs best on the held-out test set with the paired-bootstrap interval of the difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SEARCHES = {
    "sentiment": (
        "customer_reviews/train.jsonl",
        "reviews",
        ROOT / "examples" / "tune" / "sentiment-minilm.yaml",
    ),
    "sft": (
        "instructions/alpaca_en_demo.train.jsonl",
        "alpaca",
        ROOT / "examples" / "tune" / "sft-smollm2.yaml",
    ),
}


def strop(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "strop", *args], check=True)


def run(name: str, work: Path) -> dict:
    source, folder, config = SEARCHES[name]
    data = work / folder
    if not (data / "train.jsonl").is_file():
        strop("data", "prepare", str(SHARED / source), "--out", str(data), "--split", "0.8,0.1,0.1")
    sets = [f"data.{s}=[{data / (s + '.jsonl')}]" for s in ("train", "validation", "test")]
    t0 = time.time()
    strop(
        "tune",
        str(config),
        "--refit",
        "--set",
        f"output_dir={work / 'runs'}",
        *[x for s in sets for x in ("--set", s)],
    )
    seconds = time.time() - t0
    cfg_name = next(
        line.split(":", 1)[1].strip() for line in config.read_text().splitlines() if line.startswith("name:")
    )
    run_dir = work / "runs" / cfg_name
    study = json.loads((run_dir / "study.json").read_text())
    refit = json.loads((run_dir / "refit.json").read_text())
    return {"name": name, "seconds": seconds, "study": study, "refit": refit}


def show(r: dict) -> None:
    s, c = r["study"], r["study"]["compute"]
    states = {k: sum(t["state"] == k for t in s["trials"]) for k in ("complete", "pruned", "fail")}
    print(f"\n## {r['name']}: {len(s['trials'])} trials {states}, {r['seconds'] / 60:.1f} min with the refit")
    print(
        f"pruning saved {c['steps_saved']} of {c['steps_planned']} planned steps ({100 * (c['saved_fraction'] or 0):.0f}%), "
        f"~{(c['seconds_saved_estimate'] or 0) / 60:.1f} min of training"
    )
    b = s["best"]
    print(f"best trial {b['number']:03d}: {s['objective']} {b['value']:.4f}, {b['params']}")
    print("| test metric | base | default | best | best - default (95% CI) |\n|---|---|---|---|---|")
    for m in r["refit"]["metrics"]:
        d = m.get("best_vs_default")
        ci = f"{d['diff']:+.4f} ({d['ci'][0]:+.4f} to {d['ci'][1]:+.4f})" if d else "—"
        base = m.get("base")
        print(
            f"| {m['name']} | {'—' if base is None else f'{base:.4f}'} | {m['default']:.4f} | {m['best']:.4f} | {ci} |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=sorted(SEARCHES))
    p.add_argument("--work", default="/tmp/strop-bench-tune", help="data splits and runs go here")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = [run(n, work) for n in ([args.only] if args.only else list(SEARCHES))]
    for r in results:
        show(r)


if __name__ == "__main__":
    main()

"""Every `rl.loss` on the shipped GRPO recipe (grpo-arithmetic: SmolLM2-135M-Instruct, easy arithmetic,
reward 1 when the reply's last number is the answer), on the same budget, side by side:

    python bench/rl_variants.py                  # 6 losses x 30 steps (~6 min each on 2 CPU cores)
    python bench/rl_variants.py --steps 60 --only dapo grpo

Each run is `strop train` of the recipe with `rl.loss` (and the clip settings that loss's paper uses)
changed; it prints one Markdown row per loss: wall time, the mean rollout reward in the first and last
quarter of steps, the share of reply tokens clipped, and the greedy reward of the starting and the tuned
model on the 128 held-out test prompts with the 95% paired-bootstrap interval of the gain.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "src" / "strop" / "recipes" / "configs" / "grpo-arithmetic.yaml"
SETTINGS = {  # each loss with its paper's clip range (the recipe: DAPO's 0.2 / 0.28)
    "dapo": [],
    "grpo": ["rl.clip_high=null"],
    "dr_grpo": ["rl.clip_high=null"],
    "gspo": ["rl.clip=3.0e-4", "rl.clip_high=4.0e-4"],  # sequence-level ratios: a far narrower range
    "cispo": ["rl.clip_high=5.0"],  # the truncation of its detached weight
    "rloo": ["rl.clip_high=null"],
}


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def run(loss: str, steps: int, out: Path) -> dict:
    name = f"rl-{loss}-{steps}"
    sets = [f"name={name}", f"output_dir={out}", f"rl.loss={loss}", f"train.max_steps={steps}"]
    sets += [f"train.eval_every={steps}", *SETTINGS[loss]]
    argv = [sys.executable, "-m", "strop", "-q", "train", str(RECIPE), "--no-progress"]
    t0 = time.time()
    subprocess.run([*argv, *(a for s in sets for a in ("--set", s))], check=True)
    seconds = time.time() - t0
    run_dir = out / name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in records if "reward" in r]
    q = max(1, len(rewards) // 4)
    clipped = [r.get("clipfrac", 0.0) for r in records if "reward" in r]
    ev = json.loads((run_dir / "eval" / "summary.json").read_text())["reward"]
    return {
        "loss": loss,
        "steps": steps,
        "seconds": seconds,
        "rollout_first": mean(rewards[:q]),
        "rollout_last": mean(rewards[-q:]),
        "clipfrac": mean(clipped),
        "start": ev["start"],
        "tuned": ev["tuned"],
        "ci": ev["gain"]["ci"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "runs")
    args = parser.parse_args()
    rows = []
    print(
        "| rl.loss | steps | wall | rollout reward, first → last quarter | tokens clipped | "
        "held-out reward, base → tuned | 95% CI of the gain |"
    )
    print("|---|---|---|---|---|---|---|")
    for loss in args.only:
        r = run(loss, args.steps, args.out)
        rows.append(r)
        print(
            f"| {loss} | {r['steps']} | {r['seconds'] / 60:.1f} min | {r['rollout_first']:.3f} → "
            f"{r['rollout_last']:.3f} | {100 * r['clipfrac']:.1f}% | {r['start']:.3f} → {r['tuned']:.3f} | "
            f"{r['ci'][0]:+.3f} to {r['ci'][1]:+.3f} |",
            flush=True,
        )
    (args.out / "rl_variants.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""Does fine-tuning help? strop's shipped recipes on real data, a fixed small CPU budget, held-out rows:

    python bench/outcomes.py                      # every row at the full budget (~60 min on 2 CPU cores)
    python bench/outcomes.py --quick              # tiny budgets: checks the plumbing in a few minutes
    python bench/outcomes.py --only dpo reward    # some rows (the others keep their last results)
    python bench/outcomes.py --table              # only rewrite the Markdown table from the JSON

Each row is `strop train <shipped config>` with the data, the step budget and the evaluation set
overridden by `--set`; the run scores rows it never trained on, base (the starting model) vs tuned, and
this script takes the figures from the run's eval/ folder (summary.json and the per-example files), adds
a 95% paired-bootstrap interval of the gain where strop reports only the two figures, and writes
bench/results/outcomes.json and bench/results/outcomes.md (the table is generated from the JSON).

Data (/work/shared/data, see each folder's README) is split by position: training rows from the start
of a file, held-out rows from its end (`skip`), so they never meet; derived files (KTO feedback rows)
go to --work, never into the repository. Run folders go to --work/runs.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from strop.eval.bootstrap import paired_mean_difference
from strop.eval.extract import last_number
from strop.eval.metrics import build_metrics

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results"
GSM8K = SHARED / "gsm8k" / "train.jsonl"  # 7473 rows
ALPACA = SHARED / "instructions" / "alpaca_en_demo.train.jsonl"  # 785 rows
HH = SHARED / "hh_rlhf" / "harmless_base.train.jsonl"  # 2108 pairs
SST2 = SHARED / "sst2"  # train.jsonl 6911, validation.jsonl 872

# steps x batch, held-out rows and generation lengths per budget
BUDGETS = {
    "full": {
        "sft_steps": 12,
        "sft_batch": 8,
        "gen_test": 32,
        "gsm8k_test": 48,
        "gsm8k_tokens": 128,
        "instr_tokens": 64,
        "pref_steps": 8,
        "pref_batch": 8,
        "pref_test": 64,
        "cls_steps": 40,
        "cls_batch": 32,
        "distill_steps": 12,
    },
    "quick": {
        "sft_steps": 2,
        "sft_batch": 4,
        "gen_test": 4,
        "gsm8k_test": 4,
        "gsm8k_tokens": 32,
        "instr_tokens": 16,
        "pref_steps": 2,
        "pref_batch": 4,
        "pref_test": 8,
        "cls_steps": 4,
        "cls_batch": 16,
        "distill_steps": 2,
    },
}
COMMON = [  # one validation and one checkpoint at the end
    "train.grad_accum=1",
    "train.early_stopping.patience=null",
    "optim.warmup_steps=1",  # the recipes' 10-20 warmup steps would take up most of a 10-40 step budget
    # one thread: on 2 cores shared with other work, torch's 2 OpenMP threads spin-wait on each other and
    # greedy decoding ran ~19x slower (8 prompts x 32 tokens: 78 s with 2 threads, 4 s with 1)
    "train.threads=1",
]


# ---------------------------------------------------------------- running strop


REUSE = False  # --reuse: take a finished run folder's figures instead of training it again


def train(config: str, name: str, steps: int, batch: int, sets: list[str], work: Path) -> tuple[Path, float]:
    """`strop train CONFIG` with the budget and `sets`; a fresh run folder each time. (run_dir, seconds)"""
    run_dir = work / "runs" / name
    timing = work / "runs" / f"{name}.seconds"  # the wall time, kept beside the run folder
    if REUSE and (run_dir / "eval" / "summary.json").exists() and timing.exists():
        print(f"reusing {run_dir}", flush=True)
        return run_dir, float(timing.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    sets = [
        f"name={name}",
        f"output_dir={work / 'runs'}",
        f"train.max_steps={steps}",
        f"train.batch_size={batch}",
        f"train.eval_every={steps}",
        f"train.save_every={steps}",
        "train.keep_last=1",
        *COMMON,
        *sets,
    ]
    argv = [sys.executable, "-m", "strop", "-q", "train", config, "--no-progress"]
    argv += [a for s in sets for a in ("--set", s)]
    print("$ strop train " + config + " " + " ".join(f"--set '{s}'" for s in sets), flush=True)
    t0 = time.time()
    subprocess.run(argv, check=True)
    seconds = time.time() - t0
    timing.write_text(f"{seconds:.1f}\n")
    return run_dir, seconds


def src(path: Path, skip: int | None = None, limit: int | None = None) -> str:
    """One data source as a YAML flow mapping (`skip`/`limit` make disjoint slices of one file)."""
    parts = [f"path: {path}"] + [f"{k}: {v}" for k, v in (("skip", skip), ("limit", limit)) if v is not None]
    return "{" + ", ".join(parts) + "}"


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "eval" / "summary.json").read_text())


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def count(path: Path) -> int:
    return sum(1 for line in path.open() if line.strip())


def paired(before: list[float], after: list[float]) -> dict:
    """mean(after) - mean(before) with strop's paired bootstrap (1000 resamples, 95%)."""
    return paired_mean_difference([float(x) for x in before], [float(x) for x in after])


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson interval of a proportion k/n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [centre - half, centre + half]


def row(
    recipe: str,
    task: str,
    data: str,
    n_train: int,
    n_test: int,
    steps: int,
    batch: int,
    metric: str,
    base: float,
    tuned: float,
    gain: dict,
    seconds: float,
    need: str,
    **extra,
) -> dict:
    lo, hi = gain["ci"]
    verdict = "gain" if lo > 0 else "no measurable gain at this scale"
    return {
        "recipe": recipe,
        "task": task,
        "data": data,
        "train_rows": n_train,
        "heldout_rows": n_test,
        "steps": steps,
        "batch": batch,
        "metric": metric,
        "base": base,
        "tuned": tuned,
        "gain": gain["diff"],
        "ci95": [lo, hi],
        "verdict": verdict,
        "needed": "" if verdict == "gain" else need,
        "seconds": seconds,
        "status": "run",
        **extra,
    }


# ---------------------------------------------------------------- the rows


def sft_gsm8k(b: dict, work: Path) -> dict:
    """LoRA SFT (lora-alpaca) on GSM8K's first rows; exact match (`gsm8k` extractor) on its last rows."""
    n, steps, batch, test = b["sft_steps"] * b["sft_batch"], b["sft_steps"], b["sft_batch"], b["gsm8k_test"]
    run_dir, seconds = train(
        "lora-alpaca",
        "sft-gsm8k",
        steps,
        batch,
        [
            f"data.train=[{src(GSM8K, limit=n + 16)}]",
            "data.val_fraction=0.1",
            f"data.test=[{src(GSM8K, skip=count(GSM8K) - test)}]",
            "data.max_length=320",
            "eval.extract=gsm8k",
            "eval.metrics=[exact_match]",
            "eval.forgetting=false",
            f"eval.max_examples={test}",
            f"eval.max_new_tokens={b['gsm8k_tokens']}",
            f"eval.samples={test}",
        ],
        work,
    )
    s = summary(run_dir)
    m = s["metrics"]["exact_match"]
    preds = jsonl(run_dir / "eval" / "samples.jsonl")  # every example's base and tuned reply
    loose = {  # lm-eval's flexible extract (the last number of the reply) from the same replies, for scale
        side: [float(last_number(p[side]) == last_number(p["reference"])) for p in preds]
        for side in ("base", "tuned")
    }
    return row(
        "lora-alpaca",
        "sft",
        "gsm8k",
        n,
        test,
        steps,
        batch,
        "exact match (gsm8k `#### N`)",
        m["base"],
        m["tuned"],
        {"diff": m["diff"], "ci": m["ci95"]},
        seconds,
        "135M solves almost none; a bigger model (>= 1B) and thousands of steps",
        last_number={
            "base": float(np.mean(loose["base"])),
            "tuned": float(np.mean(loose["tuned"])),
            **paired(loose["base"], loose["tuned"]),
        },
        writes_answer_line={side: sum("####" in p[side] for p in preds) for side in ("base", "tuned")},
        reference_loss={k: v["loss"] for k, v in s["likelihood"].items()},
    )


def sft_instructions(b: dict, work: Path) -> dict:
    """LoRA SFT (lora-alpaca) on the Alpaca demo rows; ROUGE-L of greedy replies on its last rows."""
    n, steps, batch, test = b["sft_steps"] * b["sft_batch"], b["sft_steps"], b["sft_batch"], b["gen_test"]
    run_dir, seconds = train(
        "lora-alpaca",
        "sft-instructions",
        steps,
        batch,
        [
            f"data.train=[{src(ALPACA, limit=n + 16)}]",
            "data.val_fraction=0.1",
            f"data.test=[{src(ALPACA, skip=count(ALPACA) - test)}]",
            "data.max_length=256",
            "eval.metrics=[rouge_l]",
            "eval.forgetting=false",
            f"eval.max_examples={test}",
            f"eval.max_new_tokens={b['instr_tokens']}",
            f"eval.samples={test}",
        ],
        work,
    )
    m = summary(run_dir)["metrics"]["rouge_l"]
    return row(
        "lora-alpaca",
        "sft",
        "instructions/alpaca_en_demo",
        n,
        test,
        steps,
        batch,
        f"ROUGE-L (greedy, {b['instr_tokens']} new tokens)",
        m["base"],
        m["tuned"],
        {"diff": m["diff"], "ci": m["ci95"]},
        seconds,
        "hundreds of steps; longer replies (ROUGE-L on 64-token replies is noisy)",
        run_dir=str(run_dir),
    )


def preference_sets(b: dict) -> tuple[int, list[str]]:
    """HH harmless-base: training pairs from the file's start, held-out pairs from its end."""
    n = b["pref_steps"] * b["pref_batch"]
    test = b["pref_test"]
    return n, [
        f"data.train=[{src(HH, limit=n + 8)}]",
        "data.val_fraction=0.05",
        f"data.test=[{src(HH, skip=count(HH) - test)}]",
        "data.max_length=192",
        # one held-out pair nearly copies a training reply (see examples/kto-hh.yaml); kept, and counted
        "data.allow_leakage=true",
    ]


def pair_flips(pairs: list[dict]) -> tuple[list[float], list[float]]:
    """Per held-out pair: did the start / the tuned model give the chosen reply the higher log-prob?"""
    return (
        [float(p["start"][0] > p["start"][1]) for p in pairs],
        [float(p["tuned"][0] > p["tuned"][1]) for p in pairs],
    )


def dpo_like(config: str, name: str, b: dict, work: Path, need: str) -> dict:
    n, sets = preference_sets(b)
    run_dir, seconds = train(config, name, b["pref_steps"], b["pref_batch"], sets, work)
    s = summary(run_dir)
    before, after = pair_flips(jsonl(run_dir / "eval" / "pairs.jsonl"))
    acc = s["preference_accuracy"]
    return row(
        config,
        "dpo" if config == "dpo" else "dpo (loss orpo)",
        "hh_rlhf harmless-base pairs",
        n,
        s["pairs"],
        b["pref_steps"],
        b["pref_batch"],
        "held-out preference accuracy (summed log-prob)",
        acc["start"],
        acc["tuned"],
        paired(before, after),
        seconds,
        need,
        mcnemar=[acc["improved"], acc["worsened"], acc["p_value"]],
        per_token={k: s["preference_accuracy_per_token"][k] for k in ("start", "tuned", "p_value")},
        implicit_reward_accuracy=s["metrics"].get("reward_accuracy"),
    )


def dpo(b: dict, work: Path) -> dict:
    return dpo_like(
        "dpo",
        "dpo-hh",
        b,
        work,
        "~10x the pairs (README: 1,440 pairs, 180 steps, moved the per-token ranking)",
    )


def orpo(b: dict, work: Path) -> dict:
    return dpo_like(
        "orpo",
        "orpo-hh",
        b,
        work,
        "many more pairs or a bigger model (README: 456 pairs did not separate them)",
    )


def kto(b: dict, work: Path) -> dict:
    """KTO on feedback rows {prompt, completion, label} made from the same HH pairs (shuffled, so no pair
    sits together in a batch); held out: the end-of-file pairs, read as good/bad rows, which gives the
    paired preference accuracy."""
    n_pairs = b["pref_steps"] * b["pref_batch"] // 2 + 4
    pairs = jsonl(HH)[:n_pairs]
    rows = [
        {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
        for p in pairs
        for side in ("chosen", "rejected")
    ]
    random.Random(0).shuffle(rows)
    feedback = work / "data" / "hh_feedback.train.jsonl"
    feedback.parent.mkdir(parents=True, exist_ok=True)
    feedback.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, sets = preference_sets(b)
    sets = [f"data.train=[{src(feedback)}]", *sets[1:]]
    run_dir, seconds = train("kto", "kto-hh", b["pref_steps"], b["pref_batch"], sets, work)
    s = summary(run_dir)
    by_id = {r["id"]: r for r in jsonl(run_dir / "eval" / "rows.jsonl")}
    ids = sorted({i.rsplit("#", 1)[0] for i in by_id if i.endswith("#0") and i[:-1] + "1" in by_id})
    before = [float(by_id[i + "#0"]["start"] > by_id[i + "#1"]["start"]) for i in ids]
    after = [float(by_id[i + "#0"]["tuned"] > by_id[i + "#1"]["tuned"]) for i in ids]
    acc = s["preference_accuracy"]
    return row(
        "kto",
        "kto",
        "hh_rlhf pairs as feedback rows",
        len(rows),
        s.get("pairs", len(ids)),
        b["pref_steps"],
        b["pref_batch"],
        "held-out preference accuracy (summed log-prob)",
        acc["start"],
        acc["tuned"],
        paired(before, after),
        seconds,
        "thousands of rows (README: 182 rows moved nothing)",
        mcnemar=[acc["improved"], acc["worsened"], acc["p_value"]],
        auc=[s["start_metrics"].get("auc"), s["metrics"].get("auc")],
    )


def reward(b: dict, work: Path) -> dict:
    """Reward model (scalar head + LoRA); base = chance (0.5): an untrained head has no preference, its
    expected pairwise accuracy is 0.5. The interval is the Wilson interval of the tuned accuracy, less 0.5."""
    n, sets = preference_sets(b)
    run_dir, seconds = train("reward-model", "reward-hh", b["pref_steps"], b["pref_batch"], sets, work)
    s = summary(run_dir)
    acc, pairs = s["metrics"]["accuracy"], s["pairs"]
    lo, hi = wilson(round(acc * pairs), pairs)
    return row(
        "reward-model",
        "reward",
        "hh_rlhf harmless-base pairs",
        n,
        pairs,
        b["pref_steps"],
        b["pref_batch"],
        "held-out pairwise accuracy (base: chance 0.5)",
        0.5,
        acc,
        {"diff": acc - 0.5, "ci": [lo - 0.5, hi - 0.5]},
        seconds,
        "10-50x the steps (thousands of pairs)",
        margin=s["metrics"].get("margin"),
    )


def classification(b: dict, work: Path) -> dict:
    """sentiment-encoder-lora on SST-2's train rows; accuracy on its 872-row dev set (never trained on)
    vs the majority-label baseline strop reports, paired per sentence."""
    n, test = b["cls_steps"] * b["cls_batch"], SST2 / "validation.jsonl"
    n_test = count(test) if b is BUDGETS["full"] else 64
    run_dir, seconds = train(
        "sentiment-encoder-lora",
        "sst2-minilm",
        b["cls_steps"],
        b["cls_batch"],
        [
            f"data.train=[{src(SST2 / 'train.jsonl', limit=n + 64)}]",
            "data.val_fraction=0.05",
            f"data.test=[{src(test, limit=n_test)}]",
            "eval.max_examples=null",
        ],
        work,
    )
    s = summary(run_dir)
    preds = jsonl(run_dir / "eval" / "predictions.jsonl")
    majority = s["majority_label"]
    before = [float(p["label"] == majority) for p in preds]
    after = [float(p["predicted"] == p["label"]) for p in preds]
    m = s["metrics"]["accuracy"]
    return row(
        "sentiment-encoder-lora",
        "classification",
        "sst2 train / dev",
        n,
        s["examples"],
        b["cls_steps"],
        b["cls_batch"],
        f"accuracy (base: majority label '{majority}')",
        m["majority"],
        m["tuned"],
        paired(before, after),
        seconds,
        "more steps (an SST-2 epoch is 216 steps at batch 32)",
        model="minilm-l6",
        macro_f1=s["metrics"]["macro_f1"],
    )


def distillation(b: dict, work: Path, teacher: Path) -> dict:
    """distill-smollm2: a 10-block student (full FT) learns the instructions SFT run (the teacher) vs the
    same student with no teacher, same rows and steps; held-out ROUGE-L and reference loss, paired."""
    steps, batch, test = b["distill_steps"], b["sft_batch"], b["gen_test"]
    n = steps * batch
    sets = [
        f"data.train=[{src(ALPACA, limit=n + 16)}]",
        "data.val_fraction=0.1",
        f"data.test=[{src(ALPACA, skip=count(ALPACA) - test)}]",
        "data.max_length=256",
        "eval.metrics=[rouge_l]",
        "eval.forgetting=false",
        f"eval.max_examples={test}",
        f"eval.max_new_tokens={b['instr_tokens']}",
        f"eval.samples={test}",
    ]
    with_t, s1 = train(
        "distill-smollm2", "distill-teacher", steps, batch, [*sets, f"distill.teacher={teacher}"], work
    )
    without, s2 = train("distill-smollm2", "distill-none", steps, batch, [*sets, "distill=null"], work)
    a, c = summary(without), summary(with_t)
    rouge = build_metrics(["rouge_l"], None)[0].per_example
    pa = {p["id"]: p for p in jsonl(without / "eval" / "samples.jsonl")}
    pc = {p["id"]: p for p in jsonl(with_t / "eval" / "samples.jsonl")}
    ids = [i for i in pc if i in pa]
    key = "rouge_l"
    before = [rouge(pa[i]["tuned"], pa[i]["reference"]) for i in ids]
    after = [rouge(pc[i]["tuned"], pc[i]["reference"]) for i in ids]
    return row(
        "distill-smollm2",
        "sft + distill",
        "instructions/alpaca_en_demo",
        n,
        len(ids),
        steps,
        batch,
        "ROUGE-L: student with teacher (tuned) vs without (base)",
        a["metrics"][key]["tuned"],
        c["metrics"][key]["tuned"],
        paired(before, after),
        s1 + s2,
        "hundreds of steps for a 10-block student; a teacher trained longer than the SFT row's 12 steps",
        reference_loss={
            "no_teacher": a["likelihood"]["tuned"]["loss"],
            "teacher": c["likelihood"]["tuned"]["loss"],
        },
        seconds_each={"teacher": s1, "no_teacher": s2},
        teacher=str(teacher),
    )


RECIPES = {  # the shipped config each row runs
    "sft-gsm8k": "lora-alpaca",
    "sft-instructions": "lora-alpaca",
    "dpo": "dpo",
    "orpo": "orpo",
    "kto": "kto",
    "reward": "reward-model",
    "classification": "sentiment-encoder-lora",
    "distill": "distill-smollm2",
}
ROWS = {
    "sft-gsm8k": sft_gsm8k,
    "sft-instructions": sft_instructions,
    "dpo": dpo,
    "orpo": orpo,
    "kto": kto,
    "reward": reward,
    "classification": classification,
    "distill": distillation,
}


# ---------------------------------------------------------------- the table


def fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| recipe | data (train / held-out) | budget | metric | base | tuned | gain [95% CI] | verdict | wall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "run":
            lines.append(
                f"| {r['recipe']} | {r['data']} | – | {r.get('metric', '–')} | – | – | – | "
                f"not run: {r['why']} | – |"
            )
            continue
        lo, hi = r["ci95"]
        verdict = r["verdict"] + (f" (needs: {r['needed']})" if r["needed"] else "")
        lines.append(
            f"| {r['recipe']} | {r['data']} ({r['train_rows']} / {r['heldout_rows']}) | "
            f"{r['steps']} steps x {r['batch']} | {r['metric']} | {fmt(r['base'])} | {fmt(r['tuned'])} | "
            f"{r['gain']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {verdict} | {r['seconds'] / 60:.1f} min |"
        )
    total = sum(r.get("seconds", 0.0) for r in rows)
    lines += ["", "Per row, besides the headline metric:", ""]
    lines += [f"- {r['recipe']} ({r['data']}): {details(r)}" for r in rows if r["status"] == "run"]
    lines.append("")
    lines.append(f"Total wall time of the runs: {total / 60:.1f} min.")
    return "\n".join(lines) + "\n"


def details(r: dict) -> str:
    """The secondary figures each row keeps in the JSON, as one sentence."""
    out = []
    if "last_number" in r:
        ln = r["last_number"]
        out.append(
            f"last number of the reply correct (lm-eval flexible extract) {ln['base']:.3f} -> "
            f"{ln['tuned']:.3f} [{ln['ci'][0]:+.3f}, {ln['ci'][1]:+.3f}]"
        )
    if "writes_answer_line" in r:
        w = r["writes_answer_line"]
        out.append(
            f"replies with a `#### N` line: base {w['base']}, tuned {w['tuned']} of {r['heldout_rows']}"
        )
    if "reference_loss" in r:
        out.append(
            "held-out reference loss " + ", ".join(f"{k} {v:.3f}" for k, v in r["reference_loss"].items())
        )
    if "mcnemar" in r:
        up, down, p = r["mcnemar"]
        out.append(f"pairs flipped right/wrong {up}/{down} (McNemar p {p:.2f})")
    if "per_token" in r:
        pt = r["per_token"]
        out.append(
            f"per-token preference accuracy {pt['start']:.3f} -> {pt['tuned']:.3f} (p {pt['p_value']:.2f})"
        )
    if r.get("implicit_reward_accuracy") is not None:
        out.append(f"implicit reward accuracy {r['implicit_reward_accuracy']:.3f}")
    if "auc" in r and None not in r["auc"]:
        out.append(f"AUC good vs bad {r['auc'][0]:.3f} -> {r['auc'][1]:.3f}")
    if r.get("margin") is not None:
        out.append(f"mean reward margin {r['margin']:.3f}")
    if "macro_f1" in r:
        out.append(f"macro-F1 majority {r['macro_f1']['majority']:.3f} -> tuned {r['macro_f1']['tuned']:.3f}")
    if "seconds_each" in r:
        out.append("wall " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in r["seconds_each"].items()))
    return "; ".join(out) + "." if out else "–"


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "outcomes.json").write_text(json.dumps(results, indent=1) + "\n")
    rows = [results["rows"][k] for k in ROWS if k in results["rows"]]
    head = (
        "# Outcomes: base vs tuned on held-out rows, strop's shipped recipes, a small CPU budget\n\n"
        f"Generated by `python bench/outcomes.py{' --quick' if results['budget'] == 'quick' else ''}` "
        f"({results['when']}, {results['machine']}). SmolLM2-135M-Instruct for the generative rows, "
        "MiniLM-L6 for classification; LoRA unless the recipe says otherwise. Gain = tuned - base, 95% "
        'paired bootstrap over held-out rows (reward model: Wilson interval, base = chance). "gain" only '
        "when the interval excludes 0.\n\n"
    )
    (out / "outcomes.md").write_text(head + table(rows) + NOTES)


NOTES = """
How each base is defined: SFT rows: the starting model (adapter off) on the same prompts, greedy. DPO,
ORPO, KTO: the starting model's own log-probs (is the chosen reply more probable than the rejected one,
summed over its tokens). Reward model: chance (0.5), since an untrained scalar head has no preference.
Classification: always predicting the commonest training label, as strop's report does. Distillation:
the same 10-block student trained on the same rows and steps without a teacher (`distill: null`); the
teacher is the instructions SFT run of this table.
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny budgets, to check the plumbing")
    parser.add_argument("--only", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/outcomes"), help="run folders, derived data")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--table", action="store_true", help="only rewrite outcomes.md from outcomes.json")
    parser.add_argument(
        "--reuse", action="store_true", help="rescore finished run folders in --work, no training"
    )
    parser.add_argument(
        "--not-run",
        nargs="+",
        default=[],
        metavar="ROW=REASON",
        help="record rows left out, with the reason, as 'not run' in the table",
    )
    args = parser.parse_args()
    global REUSE
    REUSE = args.reuse
    budget = "quick" if args.quick else "full"
    path = args.out / "outcomes.json"
    if args.table:
        write(json.loads(path.read_text()), args.out)
        return
    old = json.loads(path.read_text()) if path.exists() else {}
    results = {
        "budget": budget,
        "settings": BUDGETS[budget],
        "when": time.strftime("%Y-%m-%d"),
        "machine": "2 CPU cores shared with other jobs, so wall times are upper bounds; torch 1 thread",
        "rows": old.get("rows", {}) if old.get("budget") == budget else {},
    }
    b = BUDGETS[budget]
    for item in args.not_run:
        name, _, why = item.partition("=")
        results["rows"][name] = {
            "recipe": RECIPES[name],
            "data": name,
            "status": "not run",
            "why": why or "left out",
        }
    for name in args.only:
        print(f"== {name}", flush=True)
        try:
            if name == "distill":
                teacher = args.work / "runs" / "sft-instructions"
                if not (teacher / "model").exists():
                    raise RuntimeError("needs the sft-instructions run as its teacher; run that row first")
                r = distillation(b, args.work, teacher)
            else:
                r = ROWS[name](b, args.work)
        except (subprocess.CalledProcessError, RuntimeError, KeyError, FileNotFoundError) as e:
            r = {"recipe": RECIPES[name], "data": name, "status": "failed", "why": f"{type(e).__name__}: {e}"}
        results["rows"][name] = r
        print(json.dumps(r), flush=True)
        write(results, args.out)
    print((args.out / "outcomes.md").read_text())


if __name__ == "__main__":
    main()

"""The evaluation parts of a report, from `eval/summary.json` and `eval/samples.jsonl`: the base-vs-tuned
metrics table with confidence intervals, forgetting on reference text, and a mix of paired samples.

Task metrics are read as higher-is-better (exact match, ROUGE-L, BLEU, accuracy, F1); likelihood rows
(loss, perplexity) are lower-is-better and carry no interval. `kshot_diff` is tuned − k-shot base.
"""

from __future__ import annotations

from strop.report.collect import dig, is_number
from strop.report.document import example, note, num, section, table, text, warning

MAX_SAMPLES = 8
SAMPLE_FIELDS = (
    ("Prompt", "input"),
    ("Reference", "reference"),
    ("Base", "base"),
    ("Tuned", "tuned"),
    ("k-shot base", "kshot"),
)
VERDICTS = ("tuned better", "base better", "tie", "unscored")  # the order samples are drawn in


def primary_metric(ev: dict, samples: list[dict]) -> str | None:
    """The metric the headline and sample verdicts use: the first one in the summary."""
    metrics = ev.get("metrics")
    if isinstance(metrics, dict) and ev.get("primary_metric") in metrics:
        return ev["primary_metric"]
    if isinstance(metrics, dict) and metrics:
        return next(iter(metrics))
    scores = dig(samples[0], "scores", "tuned") if samples else None
    return next(iter(scores), None) if isinstance(scores, dict) and scores else None


def eval_headline(ev: dict) -> str | None:
    """One sentence on the primary metric, e.g. 'Tuned beats base on exact_match by +0.12 (95% CI ...)'."""
    name = primary_metric(ev, [])
    m = dig(ev, "metrics", name) if name else None
    if not isinstance(m, dict) or not is_number(m.get("diff")):
        return None
    diff, ci = m["diff"], _ci(m.get("ci95"))
    if ci is None:
        return f"Tuned − base on {name}: {num(diff, signed=True)} (no confidence interval)."
    label = f"{_level(m)} CI {num(ci[0], signed=True)} to {num(ci[1], signed=True)}"
    if ci[0] > 0:
        return f"Tuned beats base on {name} by {num(diff, signed=True)} ({label})."
    if ci[1] < 0:
        return f"Tuned is worse than base on {name} by {num(diff, signed=True)} ({label})."
    return f"Tuned vs base on {name}: {num(diff, signed=True)} ({label}): no clear difference."


def eval_section(ev: dict) -> dict:
    title = "Evaluation (base vs tuned)"
    if not ev:
        return section(title, [note("No evaluation in this run (no eval/summary.json).")])
    metrics = ev.get("metrics")
    metrics = metrics if isinstance(metrics, dict) else {}
    kshot = "kshot" in (ev.get("models") or []) or any(
        isinstance(m, dict) and "kshot" in m for m in metrics.values()
    )
    k = ev.get("kshot")
    kname = f"{k}-shot base" if k else "k-shot base"
    level = next((_level(m) for m in metrics.values() if isinstance(m, dict)), "95%")
    header = ["metric", "base", "tuned"] + ([kname] if kshot else []) + [f"tuned − base ({level} CI)"]
    header += [f"tuned − {kname} ({level} CI)"] if kshot else []
    rows = [_metric_row(name, m, kshot) for name, m in metrics.items() if isinstance(m, dict)]
    for key, label in (("loss", "loss (lower is better)"), ("ppl", "perplexity (lower is better)")):
        pair = {model: dig(ev, "likelihood", model, key) for model in ("base", "tuned")}
        if any(v is not None for v in pair.values()):
            rows.append(_metric_row(label, pair, kshot))
    blocks = [text(_eval_intro(ev, kname if kshot else None))]
    blocks.append(table(header, rows) if rows else note("The summary lists no metrics."))
    return section(title, blocks)


def forgetting_section(ev: dict) -> dict:
    f = ev.get("forgetting")
    title = "Forgetting"
    if not isinstance(f, dict) or not is_number(f.get("relative_change")):
        return section(title, [note("Not measured in this run (no forgetting entry in eval/summary.json).")])
    rel, threshold = f["relative_change"], f.get("threshold")
    line = (
        f"Perplexity on reference text ({f.get('reference') or 'unnamed'}): base {num(f.get('base_ppl'))}, "
        f"tuned {num(f.get('tuned_ppl'))} ({rel:+.1%}"
        + (f"; warning threshold {threshold:+.0%})." if is_number(threshold) else ").")
    )
    if f.get("warning"):
        return section(
            title,
            [
                text(line),
                warning(
                    f"Forgetting: perplexity on general text rose {rel:+.1%}, past the threshold. The tuned model "
                    "may have lost general ability: lower the learning rate, train fewer steps, use a smaller "
                    "LoRA rank, or mix general text into the training data."
                ),
            ],
        )
    return section(title, [text(line + " Within the threshold: no sign of forgetting.")])


def forgetting_headline(ev: dict) -> str | None:
    f = ev.get("forgetting")
    if isinstance(f, dict) and f.get("warning") and is_number(f.get("relative_change")):
        return f"⚠ Forgetting: perplexity on general reference text rose {f['relative_change']:+.1%}."
    return None


def pick_samples(samples: list[dict], metric: str | None) -> list[tuple[dict, str]]:
    """Up to MAX_SAMPLES (sample, verdict) pairs, drawn in turn from each verdict so wins and losses both
    show, returned in file order."""
    groups: dict[str, list[int]] = {v: [] for v in VERDICTS}
    for i, s in enumerate(samples):
        groups[_verdict(s, metric)].append(i)
    chosen: list[int] = []
    while len(chosen) < min(MAX_SAMPLES, len(samples)):
        for v in VERDICTS:
            if groups[v] and len(chosen) < MAX_SAMPLES:
                chosen.append(groups[v].pop(0))
    return [(samples[i], _verdict(samples[i], metric)) for i in sorted(chosen)]


def samples_section(samples: list[dict], metric: str | None) -> dict:
    title = "Samples"
    if not samples:
        return section(title, [note("No samples in this run (no eval/samples.jsonl).")])
    picked = pick_samples(samples, metric)
    blocks = [
        text(f"{len(picked)} of {len(samples)} evaluated examples, a mix of wins and losses for tuned.")
    ]
    for s, verdict in picked:
        base, tuned = dig(s, "scores", "base", metric), dig(s, "scores", "tuned", metric)
        scored = (
            f": {verdict} on {metric} (base {num(base)}, tuned {num(tuned)})" if verdict != "unscored" else ""
        )
        fields = [(label, s[key]) for label, key in SAMPLE_FIELDS if s.get(key) is not None]
        blocks.append(example(f"Example {s.get('id', '?')}{scored}", fields))
    return section(title, blocks)


def _metric_row(name: str, m: dict, kshot: bool) -> list[str]:
    """metric | base | tuned | [k-shot] | tuned − base (CI) | [tuned − k-shot (CI)]; a missing diff is
    computed from the two values, without an interval."""
    row = [name, num(m.get("base")), num(m.get("tuned"))] + ([num(m.get("kshot"))] if kshot else [])
    row.append(_diff_cell(m.get("diff"), m.get("ci95"), m.get("base"), m.get("tuned")))
    if kshot:
        row.append(_diff_cell(m.get("kshot_diff"), m.get("kshot_ci95"), m.get("kshot"), m.get("tuned")))
    return row


def _verdict(s: dict, metric: str | None) -> str:
    base, tuned = dig(s, "scores", "base", metric), dig(s, "scores", "tuned", metric)
    if metric is None or not (is_number(base) and is_number(tuned)):
        return "unscored"
    return "tuned better" if tuned > base else "base better" if base > tuned else "tie"


def _eval_intro(ev: dict, kname: str | None) -> str:
    n, split = ev.get("examples"), ev.get("set") or "evaluation"
    line = (
        f"Scored on {num(n)} examples of the {split} set" if n is not None else f"Scored on the {split} set"
    )
    line += f" ({ev['set_note']})." if ev.get("set_note") else "."
    gen = ev.get("generation") if isinstance(ev.get("generation"), dict) else {}
    if gen:
        temp = gen.get("temperature")
        mode = "greedy decoding" if temp in (0, 0.0) else f"sampling at temperature {num(temp)}"
        line += f" Outputs by {mode}, up to {num(gen.get('max_new_tokens'))} new tokens."
    if kname:
        line += f" {kname}: the base model with training examples in its prompt."
    return line


def _diff_cell(diff, ci, a, b) -> str:
    if not is_number(diff):
        diff = b - a if is_number(a) and is_number(b) else None
    if diff is None:
        return "—"
    ci = _ci(ci)
    return num(diff, signed=True) + (
        f" ({num(ci[0], signed=True)} to {num(ci[1], signed=True)})" if ci else ""
    )


def _ci(ci) -> tuple[float, float] | None:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(is_number(c) for c in ci):
        return float(ci[0]), float(ci[1])
    return None


def _level(m: dict) -> str:
    level = m.get("ci_level")
    return f"{level:.0%}" if is_number(level) else "95%"

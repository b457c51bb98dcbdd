"""The report's parts for preference runs (task reward, dpo or kto): the per-step pair metrics, the held-out
table (for DPO the starting model beside the tuned one), and findings that the loss curve cannot give:
whether the held-out ranking moved, and whether DPO pushed down the chosen replies too."""

from __future__ import annotations

import math

from strop.report.collect import dig, is_number
from strop.report.diagnose import finding, series, smooth
from strop.report.document import image, note, num, section, table, text
from strop.report.plots import FIGSIZE, new_figure, to_png

DISPLACED = 1.0  # nats per reply: a fall of the chosen replies' log-prob worth a finding


def is_preference(ev: dict, config: dict | None) -> bool:
    return (isinstance(ev, dict) and ev.get("task") in PREFERENCE_TASKS) or (
        isinstance(config, dict) and config.get("task") in PREFERENCE_TASKS
    )


PREFERENCE_TASKS = ("reward", "dpo", "kto")


def preference_headline(ev: dict) -> str | None:
    m = ev.get("metrics") if isinstance(ev, dict) else None
    if not isinstance(m, dict):
        return None
    if ev.get("task") == "kto":
        pa = ev.get("preference_accuracy") or {}
        paired = (
            f"; on {num(ev['pairs'])} prompts with a good and a bad completion the policy prefers the good "
            f"one {_acc(pa.get('start'))} → {_acc(pa.get('tuned'))}{_p(pa)}"
            if pa
            else ""
        )
        start = ev.get("start_metrics") or {}
        return (
            f"On {num(ev.get('rows'))} held-out {ev.get('set')} rows: the log-ratio separates good from bad "
            f"completions with AUC {_acc(start.get('auc'))} → {_acc(m.get('auc'))}{paired}."
        )
    where = f"{num(ev.get('pairs', ev.get('examples')))} held-out {ev.get('set')} pairs"
    if ev.get("task") == "dpo":
        pa = ev.get("preference_accuracy") or {}
        pt = ev.get("preference_accuracy_per_token") or {}
        return (
            f"On {where}: the implicit reward ranks {_pct(m.get('reward_accuracy'))} right; the policy's own "
            f"preference accuracy {_acc(pa.get('start'))} → {_acc(pa.get('tuned'))}{_p(pa)} "
            f"(per token {_acc(pt.get('start'))} → {_acc(pt.get('tuned'))}{_p(pt)})."
        )
    if is_number(m.get("accuracy")):
        return f"On {where}: the reward model ranks {_pct(m['accuracy'])} right (mean margin {num(m.get('margin'))})."
    if is_number(m.get("pearson")):
        return f"On {where.replace('pairs', 'replies')}: Pearson {num(m['pearson'])} with the ratings."
    return None


def preference_section(ev: dict, records: list[dict]) -> dict:
    if (ev or {}).get("task") == "kto":
        return kto_section(ev)
    dpo = (ev or {}).get("task") == "dpo" or any("reward_margin" in r for r in records)
    title = "Preferences (DPO)" if dpo else "Preferences (reward model)"
    blocks = [
        image("pairs", pairs_plot(records, dpo), "pair accuracy and margin per step"),
        image("logps", logps_plot(records), "log-probs of chosen and rejected replies per step")
        if dpo
        else None,
    ]
    metrics = ev.get("metrics") if isinstance(ev, dict) else None
    if not isinstance(metrics, dict):
        return section(title, [*blocks, note("No evaluation in this run (no eval/summary.json).")])
    n = ev.get("pairs", ev.get("examples"))
    unit = "pairs" if "pairs" in ev else "rated replies"
    blocks.append(text(f"Scored on {num(n)} {ev.get('set')} {unit}, never trained on."))
    if ev.get("task") == "dpo":
        start = ev.get("start_metrics")
        start = start if isinstance(start, dict) else {}
        objective = ev.get("objective") or "dpo"
        # DPO's implicit reward is a log-ratio to the start, so the start ties on every pair; a
        # reference-free loss's reward (SimPO, ORPO: scaled mean log-probs) is not
        free = ev.get("reference_free", objective == "simpo")  # runs before the flag existed: simpo
        start_acc = _acc(start.get("reward_accuracy")) if free else "—"
        rows = [
            _start_tuned("preference accuracy (summed log-prob)", ev.get("preference_accuracy")),
            _start_tuned("preference accuracy (per token)", ev.get("preference_accuracy_per_token")),
            ["implicit reward accuracy", start_acc, _with_ci(metrics.get("reward_accuracy"), n), ""],
            [
                "implicit reward margin",
                _f4(start.get("reward_margin", 0.0)),
                _f4(metrics.get("reward_margin")),
                "",
            ],
            [f"loss ({objective})", _f4(start.get("loss")), _f4(metrics.get("loss")), ""],
            ["mean log-prob, chosen", _f4(start.get("logps_chosen")), _f4(metrics.get("logps_chosen")), ""],
            [
                "mean log-prob, rejected",
                _f4(start.get("logps_rejected")),
                _f4(metrics.get("logps_rejected")),
                "",
            ],
        ]
        blocks.append(table(["", "starting model", "tuned", "pairs flipped right / wrong (McNemar p)"], rows))
        blocks.append(
            note(
                "Preference accuracy: the share of pairs whose chosen reply the model itself finds more "
                "probable. Implicit reward: β × the policy/starting log-ratio, the quantity DPO trains. "
                "Each pair's log-probs are in eval/pairs.jsonl."
            )
        )
    else:
        rows = [[name, _with_ci(v, n) if name == "accuracy" else num(v)] for name, v in metrics.items()]
        blocks.append(table(["metric", "value"], rows))
    return section(title, blocks)


def kto_section(ev: dict) -> dict:
    """KTO's held-out table: the starting model beside the tuned one."""
    start, tuned = ev.get("start_metrics") or {}, ev.get("metrics") or {}
    rows = [
        [label, _f4(start.get(key)), _f4(tuned.get(key)), ""]
        for label, key in (
            ("AUC of the log-ratio, good vs bad", "auc"),
            ("reward accuracy (sign matches the label)", "reward_accuracy"),
            ("loss (kto)", "loss"),
            ("mean log-ratio, good completions", "logratio_good"),
            ("mean log-ratio, bad completions", "logratio_bad"),
        )
    ]
    if ev.get("preference_accuracy"):
        rows.insert(0, _start_tuned("preference accuracy (paired prompts)", ev["preference_accuracy"]))
    blocks = [
        text(f"Scored on {num(ev.get('rows'))} {ev.get('set')} rows, never trained on."),
        table(["", "start", "tuned", "pairs flipped right / wrong"], rows),
    ]
    return section("Preferences (KTO)", blocks)


def preference_findings(ev: dict, records: list[dict]) -> list[dict]:
    """DPO: whether the held-out preference moved and whether the chosen log-prob fell during training.
    Reward models: whether held-out accuracy is clearly above chance."""
    out = []
    pa, pt = dig(ev, "preference_accuracy"), dig(ev, "preference_accuracy_per_token")
    if isinstance(pa, dict) and is_number(pa.get("start")) and is_number(pa.get("tuned")):
        pt = pt if isinstance(pt, dict) and is_number(pt.get("tuned")) else None
        tested = [v for v in (pa, pt) if v is not None]
        adjusted = _holm([v.get("p_value") for v in tested])  # two tests of one question
        rose = [v["tuned"] > v["start"] and p < 0.05 for v, p in zip(tested, adjusted, strict=True)]
        verdict = (
            ": the tuned policy prefers the chosen replies more than the start did."
            if any(rose)
            else ": no clear gain (McNemar p >= 0.05 after Holm's correction for the two measures, or a "
            "fall); the tuned policy does not yet prefer "
            "the chosen replies more than the start did."
        )
        out.append(
            finding(
                "preference",
                "ok" if any(rose) else "warning",
                f"Held-out preference accuracy {_acc(pa['start'])} → {_acc(pa['tuned'])}{_p(pa)}"
                + (f" (per token {_acc(pt['start'])} → {_acc(pt['tuned'])}{_p(pt)})" if pt else "")
                + verdict,
            )
        )
    before, after = dig(ev, "start_metrics", "loss"), dig(ev, "metrics", "loss")
    if is_number(before) and is_number(after):  # one pass over the pairs: each step's loss is on new pairs
        fell = after < before
        out.append(
            finding(
                "heldout_loss",
                "ok" if fell else "warning",
                f"Held-out {ev.get('objective') or 'dpo'} loss {_f4(before)} at the start, {_f4(after)} tuned"
                + ("." if fell else ": training did not lower it on pairs it never saw."),
            )
        )
    shift = _logp_shift(ev, records)
    if shift is not None and shift[0] < -DISPLACED:
        dc, dr, where = shift
        out.append(
            finding(
                "displacement",
                "warning" if dr >= dc else "info",
                f"The chosen replies' summed log-prob fell by {num(-dc)} (rejected: {num(dr, signed=True)}) "
                f"{where}: the gap widened partly by making both replies less likely. Read the model's "
                "replies; a lower optim.lr (or, for sigmoid/ipo, a larger dpo.beta) limits it.",
            )
        )
    acc = dig(ev, "metrics", "accuracy")
    n = ev.get("pairs") if isinstance(ev, dict) else None
    if ev.get("task") == "reward" and is_number(acc) and is_number(n) and n:
        lo, _ = _wilson(acc, n)
        out.append(
            finding(
                "accuracy",
                "ok" if lo > 0.5 else "warning",
                f"Held-out accuracy {_acc(acc)} on {num(n)} pairs (95% CI from {_acc(lo)}): "
                + ("above chance." if lo > 0.5 else "not clearly above chance (0.5)."),
            )
        )
    return out


def _logp_shift(ev: dict, records: list[dict]) -> tuple[float, float, str] | None:
    """(change of the chosen and of the rejected replies' mean summed log-prob, where measured): on the
    held-out pairs, start vs tuned, when the summary has both; else the first vs the last quarter of the
    training steps, which see different pairs, so only a large change there means much."""
    start, tuned = dig(ev, "start_metrics"), dig(ev, "metrics")
    keys = ("logps_chosen", "logps_rejected")
    if isinstance(start, dict) and isinstance(tuned, dict) and all(is_number(start.get(k)) for k in keys):
        if all(is_number(tuned.get(k)) for k in keys):
            dc, dr = (tuned[k] - start[k] for k in keys)
            return dc, dr, f"on the {num(ev.get('pairs'))} held-out pairs, start to tuned"
    _, chosen = series(records, "logps_chosen")
    _, rejected = series(records, "logps_rejected")
    if len(chosen) < 8 or len(rejected) != len(chosen):
        return None
    q = max(2, len(chosen) // 4)
    dc = float(chosen[-q:].mean() - chosen[:q].mean())
    dr = float(rejected[-q:].mean() - rejected[:q].mean())
    return dc, dr, "from the first to the last quarter of training steps"


def pairs_plot(records: list[dict], dpo: bool) -> bytes | None:
    """Share of pairs ranked right and the mean margin per step (raw faint, smoothed), with the
    validation points."""
    acc_key, margin_key = ("reward_accuracy", "reward_margin") if dpo else ("accuracy", "margin")
    steps, acc = series([r for r in records if "loss" in r], acc_key)
    if len(acc) == 0:
        return None
    fig, ax = new_figure(FIGSIZE)
    ax.plot(steps, acc, color="C0", alpha=0.3, linewidth=1)
    ax.plot(steps, smooth(acc, min_span=5), color="C0", linewidth=2, label="accuracy (train, smoothed)")
    vsteps, vacc = series(records, f"val_{acc_key}")
    if len(vacc):
        ax.plot(vsteps, vacc, color="C1", marker="o", markersize=4, label="accuracy (validation)")
    ax.axhline(0.5, color="0.6", linewidth=0.8, linestyle=":")
    ax.set(xlabel="step", ylabel="pairs ranked right", title="Pairs ranked right and margin")
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    msteps, margin = series([r for r in records if "loss" in r], margin_key)
    if len(margin):
        twin = ax.twinx()
        twin.plot(msteps, smooth(margin, min_span=5), color="C3", linestyle="--", linewidth=1, label="margin")
        twin.set_ylabel("mean margin", fontsize=8)
        twin.legend(fontsize=8, frameon=False, loc="lower right")
    return to_png(fig)


def logps_plot(records: list[dict]) -> bytes | None:
    steps, chosen = series(records, "logps_chosen")
    rsteps, rejected = series(records, "logps_rejected")
    if len(chosen) == 0:
        return None
    fig, ax = new_figure(FIGSIZE)
    ax.plot(steps, smooth(chosen, min_span=5), color="C2", linewidth=2, label="chosen (smoothed)")
    ax.plot(rsteps, smooth(rejected, min_span=5), color="C3", linewidth=2, label="rejected (smoothed)")
    ax.set(xlabel="step", ylabel="summed log-prob per reply", title="Policy log-probs of the replies")
    ax.legend(fontsize=8, frameon=False)
    return to_png(fig)


def _start_tuned(label: str, v) -> list[str]:
    v = v if isinstance(v, dict) else {}
    flips = f"{v['improved']} / {v['worsened']} (p {_pval(v['p_value'])})" if "improved" in v else "—"
    return [label, _acc(v.get("start")), _acc(v.get("tuned")), flips]


def _holm(p_values: list) -> list[float]:
    """Holm-Bonferroni adjusted p-values (a missing p, from summaries older than the test, is 1)."""
    ps = [p if is_number(p) else 1.0 for p in p_values]
    order = sorted(range(len(ps)), key=ps.__getitem__)
    adjusted, running = [1.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def _p(v) -> str:
    return f" (p {_pval(v['p_value'])})" if isinstance(v, dict) and is_number(v.get("p_value")) else ""


def _pval(p: float) -> str:
    return f"{p:.3g}"


def _f4(x) -> str:
    return f"{x:.4f}" if is_number(x) else "—"


def _acc(x) -> str:
    return f"{x:.3f}" if is_number(x) else "—"


def _with_ci(acc, n) -> str:
    if not (is_number(acc) and is_number(n) and n):
        return num(acc)
    lo, hi = _wilson(acc, n)
    return f"{_acc(acc)} (95% CI {_acc(lo)}–{_acc(hi)})"


def _wilson(p: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion p over n trials."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def _pct(x) -> str:
    return f"{x:.1%}" if is_number(x) else "—"

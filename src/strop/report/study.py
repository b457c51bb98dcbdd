"""The report of a `strop tune` search, from the files it leaves (`study.json`, and `refit.json` after
--refit): the best trial, the trials table, the optimisation history, every trial's validation curve
with the pruned ones marked, parameter importances and the compute pruning saved."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from strop.report.document import duration, image, note, section, table, text, warning, write_document
from strop.report.plots import FIGSIZE, SHORT_FIGSIZE, new_figure, to_png


def write_study_report(run_dir: Path) -> Path:
    data = json.loads((run_dir / "study.json").read_text())
    refit_file = run_dir / "refit.json"
    refit = json.loads(refit_file.read_text()) if refit_file.is_file() else None
    return write_document(study_document(data, refit, run_dir), run_dir, "report")["html"]


def study_document(data: dict, refit: dict | None, run_dir: Path) -> dict:
    trials = data["trials"]
    states = {s: sum(t["state"] == s for t in trials) for s in ("complete", "pruned", "fail", "running")}
    best = data["best"]
    headline = [
        f"{len(trials)} trials: {states['complete']} complete, {states['pruned']} pruned, "
        f"{states['fail']} failed (planned: {data['planned']} finished)",
        f"objective: {data['objective']} ({data['direction']}), sampler {data['sampler']}, "
        f"pruner {data['pruner']}",
    ]
    if best:
        headline.append(
            f"best: trial {best['number']:03d}, {data['objective']} {_objective(best['value'])} with "
            + ", ".join(f"{k} = {_value(v)}" for k, v in best["params"].items())
        )
    c = data["compute"]
    if c["steps_planned"]:
        headline.append(
            f"pruning saved {c['steps_saved']:,} of {c['steps_planned']:,} planned steps "
            f"({100 * (c['saved_fraction'] or 0):.0f}%, about {duration(c['seconds_saved_estimate'])})"
        )
    sections = []
    if refit:
        sections.append(_refit_section(refit))
    sections += [
        _trials_section(data),
        section(
            "Optimisation history",
            [image("history", history_plot(data), "objective by trial, best so far")],
        ),
        section(
            "Validation curves",
            [
                text(
                    f"{data['intermediate']} at each validation, the value the pruner compared; pruned "
                    "trials are red and end where they were stopped."
                ),
                image("curves", curves_plot(data), "intermediate values by trial"),
            ],
        ),
        _importance_section(data),
    ]
    if best and data.get("best_config"):
        sections.append(
            section(
                "Best config",
                [text(f"{data['best_config']}: train it with `strop train {data['best_config']}`")],
            )
        )
    return {
        "title": f"Search {run_dir.name}",
        "subtitle": str(run_dir),
        "headline": headline,
        "sections": sections,
    }


def _trials_section(data: dict) -> dict:
    keys = data["space"]
    rows = []
    for t in data["trials"]:
        state = t["state"] + (" (interrupted, queued again)" if t["interrupted"] else "")
        steps = f"{t['steps']}/{t['total_steps']}" if t["steps"] is not None else "—"
        rows.append(
            [f"{t['number']:03d}", state, _objective(t["value"])]
            + [_value(t["params"].get(k)) for k in keys]
            + [steps, duration(t["seconds"]), t["folder"] or ""]
        )
    blocks = [table(["trial", "state", data["objective"], *keys, "steps", "time", "folder"], rows)]
    for t in data["trials"]:
        if t["error"]:
            blocks.append(warning(f"trial {t['number']:03d} failed: {t['error']}"))
    return section("Trials", blocks)


def _importance_section(data: dict) -> dict:
    imp = data["importances"]
    if not imp["values"]:
        return section("Parameter importances", [note(imp["note"])])
    rows = [[k, f"{v:.3f}"] for k, v in sorted(imp["values"].items(), key=lambda kv: -kv[1])]
    return section(
        "Parameter importances",
        [
            table(["parameter", "importance"], rows),
            image("importances", importance_plot(imp["values"]), "parameter importances"),
            note(imp["note"] + "; with a dozen trials, a rough guide rather than a measurement"),
        ],
    )


def _refit_section(refit: dict) -> dict:
    blocks = [
        text(
            f"The best config and the default config, each trained once more and evaluated on data.test "
            f"({refit['examples']} examples), which no trial saw."
        )
    ]
    header = [
        "metric",
        refit["base_name"],
        "default",
        "best",
        "best − default (95% CI)",
        "best − base (95% CI)",
    ]
    rows = []
    for m in refit["metrics"]:
        rows.append(
            [
                m["name"],
                _score(m.get("base")),
                _score(m["default"]),
                _score(m["best"]),
                _diff(m.get("best_vs_default")),
                _diff(m.get("best_vs_base")),
            ]
        )
    blocks.append(table(header, rows))
    blocks.append(note(f"runs: {refit['runs']['default']} and {refit['runs']['best']}"))
    return section("Held-out test: base vs default vs best", blocks)


def _score(x: float | None, signed: bool = False) -> str:
    """Test metrics of close configs differ in the third decimal: three, fixed, so a column lines up."""
    return "—" if x is None else f"{x:+.3f}" if signed else f"{x:.3f}"


def _diff(d: dict | None) -> str:
    if not d:
        return "—"
    lo, hi = d["ci"]
    return f"{_score(d['diff'], True)} ({_score(lo, True)} to {_score(hi, True)})"


def _objective(v) -> str:
    """Objective values differ in the third or fourth digit between good trials: four significant ones."""
    return "—" if v is None else f"{v:.4g}"


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "—" if v is None else str(v)


def history_plot(data: dict) -> bytes | None:
    done = [t for t in data["trials"] if t["state"] == "complete"]
    if not done:
        return None
    fig, ax = new_figure(FIGSIZE)
    x = np.array([t["number"] for t in done])
    y = np.array([t["value"] for t in done])
    ax.scatter(x, y, color="C0", s=18, label="complete trial", zorder=3)
    acc = np.minimum.accumulate if data["direction"] == "minimize" else np.maximum.accumulate
    ax.step(x, acc(y), where="post", color="C2", linewidth=1.5, label="best so far")
    pruned = [t["number"] for t in data["trials"] if t["state"] == "pruned"]
    if pruned:
        ax.scatter(
            pruned,
            [y.min() if data["direction"] == "maximize" else y.max()] * len(pruned),
            marker="x",
            color="C3",
            label="pruned (no final value)",
            zorder=3,
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="trial", ylabel=data["objective"], title="Optimisation history")
    ax.legend(fontsize=8, frameon=False)
    return to_png(fig)


def curves_plot(data: dict) -> bytes | None:
    trials = [t for t in data["trials"] if t["intermediate"]]
    if not trials:
        return None
    fig, ax = new_figure(FIGSIZE)
    labelled: set[str] = set()
    for t in trials:
        steps = [int(s) for s in t["intermediate"]]
        values = list(t["intermediate"].values())
        pruned = t["state"] == "pruned"
        kind = "pruned" if pruned else t["state"]
        ax.plot(
            steps,
            values,
            color="C3" if pruned else "C0",
            alpha=0.9 if pruned else 0.6,
            linewidth=1.2,
            marker="x" if pruned else ".",
            label=kind if kind not in labelled else None,
        )
        labelled.add(kind)
    ax.set(xlabel="step", ylabel=data["intermediate"], title="Validation at each eval_every")
    ax.legend(fontsize=8, frameon=False)
    return to_png(fig)


def importance_plot(values: dict[str, float]) -> bytes | None:
    if not values:
        return None
    items = sorted(values.items(), key=lambda kv: kv[1])
    fig, ax = new_figure(SHORT_FIGSIZE)
    ax.barh([k for k, _ in items], [v for _, v in items], color="C4")
    ax.set(xlabel="importance", title="Parameter importances")
    return to_png(fig)

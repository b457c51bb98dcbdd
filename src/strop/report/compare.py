"""`write_comparison(run_dirs, out)`: several runs side by side, as compare.html and compare.md.

Shows overlaid training and validation loss curves (legend = run name), the config settings that
differ between runs (identical ones are left out: they explain nothing), final training metrics, and
each run's tuned evaluation metrics with tuned − base in parentheses.
"""

from __future__ import annotations

import json
from pathlib import Path

from strop.core.errors import StropError
from strop.report.collect import Run, dig, is_number, read_run, training_facts
from strop.report.diagnose import diagnose, series
from strop.report.document import duration, image, note, num, section, table, write_document
from strop.report.plots import overlay_plot

SAME_IN_EVERY_RUN = ("name",)  # shown as the column header instead


def write_comparison(run_dirs: list[Path], out: Path) -> dict[str, Path]:
    """Write `out/compare.html` (self-contained) and `out/compare.md` (+ `out/compare_files/*.png`);
    returns {"html", "md"} -> path. Raises StropError for no runs or a folder that does not exist."""
    if not run_dirs:
        raise StropError("compare: give at least one run directory")
    for d in run_dirs:
        if not Path(d).is_dir():
            raise StropError(f"compare: {d} is not a run directory")
    runs = [read_run(Path(d)) for d in run_dirs]
    names = _unique_names(runs)
    train = {n: series(r.records, "loss") for n, r in zip(names, runs, strict=True)}
    val = {n: series(r.records, "val_loss") for n, r in zip(names, runs, strict=True)}
    doc = {
        "title": f"Comparison of {len(runs)} runs",
        "subtitle": ", ".join(names),
        "headline": [],
        "sections": [
            section(
                "Runs",
                [table(["run", "directory"], [[n, str(r.dir)] for n, r in zip(names, runs, strict=True)])],
            ),
            section(
                "Training loss",
                [
                    image(
                        "train_loss",
                        overlay_plot(train, "Training loss (smoothed)", smoothed=True),
                        "training loss",
                    )
                    or note("No run logged training loss.")
                ],
            ),
            section(
                "Validation loss",
                [
                    image("val_loss", overlay_plot(val, "Validation loss", smoothed=False), "validation loss")
                    or note("No run logged validation loss.")
                ],
            ),
            _config_section(runs, names),
            _metrics_section(runs, names),
            _eval_section(runs, names),
        ],
    }
    return write_document(doc, Path(out), "compare")


def config_differences(configs: list[dict]) -> dict[str, list[str | None]]:
    """Dotted key -> each config's value (None where absent), for keys whose values differ."""
    flat = [_flatten(c) for c in configs]
    keys = sorted({k for f in flat for k in f} - set(SAME_IN_EVERY_RUN))
    return {k: [f.get(k) for f in flat] for k in keys if len({f.get(k) for f in flat}) > 1}


def _config_section(runs: list[Run], names: list[str]) -> dict:
    if not any(r.config for r in runs):
        return section("Config differences", [note("No run has a config.yaml.")])
    diff = config_differences([r.config for r in runs])
    if not diff:
        return section("Config differences", [note("The configs are identical apart from the run name.")])
    rows = [[k] + ["—" if v is None else v for v in values] for k, values in diff.items()]
    return section("Config differences", [table(["setting", *names], rows)])


def _metrics_section(runs: list[Run], names: list[str]) -> dict:
    facts = [training_facts(r) for r in runs]
    warnings = [
        ", ".join(sorted({d["kind"] for d in diagnose(r.records, r.result) if d["severity"] == "warning"}))
        or "none"
        for r in runs
    ]
    rows = [
        ["final training loss", *(num(f["loss"]) for f in facts)],
        ["final validation loss", *(num(f["val_loss"]) for f in facts)],
        ["best validation loss", *(num(f["best_val_loss"]) for f in facts)],
        ["best step", *(num(f["best_step"]) for f in facts)],
        ["steps", *(num(f["steps"]) for f in facts)],
        ["training time", *(duration(f["seconds"]) for f in facts)],
        ["median tokens/s", *(num(f["median_tokens_per_s"]) for f in facts)],
        ["diagnosis warnings", *warnings],
    ]
    return section("Final metrics", [table(["", *names], rows)])


def _eval_section(runs: list[Run], names: list[str]) -> dict:
    title = "Evaluation (tuned model)"
    metrics: list[str] = []
    for r in runs:
        for m in r.eval.get("metrics") or {}:
            metrics += [m] if m not in metrics else []
    if not metrics and not any(r.eval for r in runs):
        return section(title, [note("No run has an evaluation (eval/summary.json).")])
    rows = [[m, *(_tuned_cell(dig(r.eval, "metrics", m)) for r in runs)] for m in metrics]
    rows.append(["perplexity", *(num(dig(r.eval, "likelihood", "tuned", "ppl")) for r in runs)])
    rows.append(["forgetting (ppl change)", *(_forgetting_cell(r.eval) for r in runs)])
    if any(isinstance(r.eval.get("judge"), dict) for r in runs):
        rows.append(["judge: tuned win rate over base", *(_judge_cell(r.eval, "pairwise") for r in runs)])
        rows.append(
            ["judge: agreement with known preferences", *(_judge_cell(r.eval, "agreement") for r in runs)]
        )
    rows.append(
        ["examples / set", *(f"{num(r.eval.get('examples'))} / {r.eval.get('set') or '—'}" for r in runs)]
    )
    return section(title, [note("Tuned value; tuned − base in parentheses."), table(["", *names], rows)])


def _tuned_cell(m) -> str:
    if not isinstance(m, dict):
        return "—"
    diff = f" ({num(m['diff'], signed=True)})" if is_number(m.get("diff")) else ""
    return num(m.get("tuned")) + diff


def _judge_cell(ev: dict, part: str) -> str:
    value, ci = dig(ev, "judge", part, "win_rate"), dig(ev, "judge", part, "ci")
    if not is_number(value):
        return "—" if part == "pairwise" or not isinstance(ev.get("judge"), dict) else "not checked"
    ci_text = f" ({num(ci[0])} to {num(ci[1])})" if isinstance(ci, list) and len(ci) == 2 else ""
    return f"{num(value)}{ci_text}, {dig(ev, 'judge', 'judge', 'model') or '?'}"


def _examples_cell(ev: dict) -> str:
    return f"{num(ev.get('examples'))} / {ev.get('set') or '—'}" if ev else "—"


def _forgetting_cell(ev: dict) -> str:
    rel = dig(ev, "forgetting", "relative_change")
    if not is_number(rel):
        return "—"
    return f"{rel:+.1%}" + (" ⚠" if dig(ev, "forgetting", "warning") else "")


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, str) else json.dumps(v, default=str)
    return out


def _unique_names(runs: list[Run]) -> list[str]:
    """Run names as legends; when two runs share a name, their folder names, then a counter, tell them apart."""
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        names = [r.dir.name for r in runs]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out

"""`write_report(run_dir)`: the run report, as report.html (self-contained), report.md and report.json.

Sections, in order: summary (headline + diagnosis), config, data, training curves, throughput,
evaluation, forgetting, samples. Each is built from whatever the run directory holds; a section whose
files are missing says so in one line instead of failing (see `collect` for what is read).
"""

from __future__ import annotations

from pathlib import Path

from strop.core.errors import StropError
from strop.core.io import atomic_write_json
from strop.report.classification import classification_headline, classification_section, is_classification
from strop.report.collect import Run, config_summary, dig, is_number, read_run, training_facts
from strop.report.diagnose import diagnose
from strop.report.document import (
    count,
    duration,
    findings,
    image,
    note,
    num,
    section,
    table,
    text,
    warning,
    write_document,
)
from strop.report.evaluation import (
    eval_headline,
    eval_section,
    forgetting_headline,
    forgetting_section,
    pick_samples,
    primary_metric,
    samples_section,
)
from strop.report.judge import judge_headline, judge_section
from strop.report.plots import length_plot, loss_plot, lr_plot
from strop.report.preference import (
    is_preference,
    preference_findings,
    preference_headline,
    preference_section,
)
from strop.report.rl import is_rl, rl_findings, rl_headline, rl_section


def write_report(run_dir: Path) -> dict[str, Path]:
    """Write report.json, report.md (+ report_files/*.png) and report.html into `run_dir`, each
    atomically; returns {"json", "md", "html"} -> path. Works on any subset of the run's files;
    raises StropError when `run_dir` is not a folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise StropError(f"report: {run_dir} is not a run directory")
    run = read_run(run_dir)
    facts = training_facts(run)
    diagnosis = (
        rl_findings(run.records, run.result)
        if is_rl(run.eval, run.config)
        else diagnose(run.records, run.result)
    )
    if is_preference(run.eval, run.config):
        extra = preference_findings(run.eval, run.records)
        if any(f["kind"] == "heldout_loss" for f in extra):  # better evidence than the training loss's
            diagnosis = [d for d in diagnosis if d["kind"] not in ("underfitting", "instability")]
        diagnosis += extra
    headline = _headline(run, facts)
    metric = primary_metric(run.eval, run.samples)
    judged = judge_section(run.eval)
    doc = {
        "title": f"Run report: {run.name}",
        "subtitle": f"Run directory: {run_dir}",
        "headline": headline,
        "sections": [
            section("Summary", [findings(diagnosis), *(note(n) for n in run.notes)]),
            _config_section(run),
            _data_section(run),
            _training_section(run, facts),
            _throughput_section(run, facts),
            _eval_section(run, run_dir),
            forgetting_section(run.eval),
            *([judged] if judged is not None else []),
            samples_section(run.samples, metric),
        ],
    }
    paths = write_document(doc, run_dir, "report")
    report = {
        "run": run.name,
        "headline": headline,
        "diagnosis": diagnosis,
        "config": config_summary(run.config),
        "data": run.data or None,
        "training": facts,
        "eval": run.eval or None,
        "samples_shown": [s.get("id") for s, _ in pick_samples(run.samples, metric)],
        "notes": run.notes,
    }
    paths["json"] = run_dir / "report.json"
    atomic_write_json(paths["json"], report)
    return paths


def _headline(run: Run, facts: dict) -> list[str]:
    if is_rl(run.eval, run.config):
        lines = [rl_headline(run.eval)]
    elif is_preference(run.eval, run.config):
        lines = [preference_headline(run.eval)]
    elif is_classification(run.eval):
        lines = [classification_headline(run.eval)]
    else:
        lines = [eval_headline(run.eval)]
    if facts["steps"] is not None:
        line = f"Trained {num(facts['steps'])} steps"
        line += " (stopped early)" if facts["stopped_early"] else ""
        if _setup_heavy(facts):  # e.g. DPO's reference pass and held-out scoring
            line += f" in {duration(facts['loop_seconds'])} (the whole run: {duration(facts['seconds'])})"
        elif facts["seconds"] is not None:
            line += f" in {duration(facts['seconds'])}"
        if is_number(facts["loss"]) and not is_rl(run.eval, run.config):  # RL losses are surrogates
            line += f"; final training loss {num(facts['loss'])}"
        if is_number(facts["best_val_loss"]):
            line += f"; best validation loss {num(facts['best_val_loss'])} at step {num(facts['best_step'])}"
        lines.append(line + ".")
    lines.append(judge_headline(run.eval))
    lines.append(forgetting_headline(run.eval))
    return [line for line in lines if line]


def _eval_section(run: Run, run_dir: Path) -> dict:
    if is_rl(run.eval, run.config):
        return rl_section(run_dir, run.eval, run.records)
    if is_preference(run.eval, run.config):
        return preference_section(run.eval, run.records)
    if is_classification(run.eval):
        return classification_section(run.eval)
    return eval_section(run.eval)


def _config_section(run: Run) -> dict:
    summary = config_summary(run.config)
    if not summary:
        return section("Config", [note("No config.yaml in this run.")])
    return section("Config", [table(["setting", "value"], [[k, v] for k, v in summary.items()])])


def _data_section(run: Run) -> dict:
    d = run.data
    if not d:
        return section("Data", [note("No data_summary.json in this run.")])
    parts = [
        f"{num(d['train_examples'])} training examples" if "train_examples" in d else None,
        f"{num(d['train_pairs'])} training pairs" if "train_pairs" in d else None,
        f"{num(d['validation_pairs'])} validation pairs" if "validation_pairs" in d else None,
        f"{num(d['train_pairs_with_margin'])} with a margin" if d.get("train_pairs_with_margin") else None,
        f"{num(d['train_prompts'])} training prompts" if "train_prompts" in d else None,
        f"{num(d['validation_prompts'])} validation prompts" if "validation_prompts" in d else None,
        f"{num(d['validation_examples'])} validation examples" if "validation_examples" in d else None,
        f"{num(d['train_label_tokens'])} label tokens in training" if "train_label_tokens" in d else None,
        f"template: {d['template']}" if d.get("template") else None,
    ]
    blocks = [text("; ".join(p for p in parts if p) + ".") if any(parts) else None]
    sources = [s for s in d.get("sources") or [] if isinstance(s, dict)]
    if sources:
        keys = ["split", "format", "rows", "examples_in", "truncated", "dropped_no_response", "cached"]
        rows = [[Path(str(s.get("path", "?"))).name] + [_cell(s.get(k)) for k in keys] for s in sources]
        header = ["source", "split", "format", "rows", "examples", "truncated", "no response", "cached"]
        blocks.append(table(header, rows))
    max_length = dig(run.config, "data", "max_length")
    pairs = "truncated_pairs" in d
    blocks.append(text(_pairs_line(d, max_length) if pairs else _dropped_line(d, sources, max_length)))
    blocks += _leakage_blocks(d.get("leakage"))
    pct = d.get("length_percentiles")
    pct = pct if isinstance(pct, dict) else {}
    stats = sorted({k for v in pct.values() if isinstance(v, dict) for k in v}, key=_stat_order)
    if stats:
        rows = [[split] + [num(v.get(k)) for k in stats] for split, v in pct.items() if isinstance(v, dict)]
        blocks.append(table(["tokens per example"] + stats, rows))
    hist = length_plot(d.get("length_histogram"), dig(run.config, "data", "max_length"))
    blocks.append(image("lengths", hist, "token length histogram per split"))
    return section("Data", blocks)


def _leakage_blocks(leak) -> list[dict]:
    """A warning per evaluation split holding (near-)copies of training examples, naming a few ids."""
    if not isinstance(leak, dict) or not leak.get("checked"):
        return []
    blocks = []
    for split in ("validation", "test"):
        found = leak.get(f"train_{split}")
        if not isinstance(found, dict):
            continue
        n = (found.get("exact") or 0) + (found.get("near") or 0)
        if not n:
            blocks.append(note(f"No {split} example duplicates or nearly duplicates a training example."))
            continue
        pairs = "; ".join(f"{p[0]} ~ {p[1]} ({p[2]})" for p in (found.get("pairs") or [])[:5] if len(p) == 3)
        blocks.append(
            warning(
                f"Leakage: {n} {split}/training pair(s) are exact or near duplicates "
                f"({found.get('exact', 0)} exact, {found.get('near', 0)} near), so {split} scores may be "
                f"inflated. E.g. {pairs}."
            )
        )
    return blocks


def _dropped_line(d: dict, sources: list[dict], max_length) -> str:
    truncated = sum(s["truncated"] for s in sources if is_number(s.get("truncated")))
    no_response = sum(s["dropped_no_response"] for s in sources if is_number(s.get("dropped_no_response")))
    dup = d.get("validation_duplicates_removed", d.get("validation_duplicates_of_train_removed"))
    parts = []
    if truncated:
        limit = f" ({num(max_length)} tokens)" if max_length is not None else ""
        parts.append(f"{num(truncated)} example(s) truncated to max_length{limit}")
    if no_response:
        parts.append(f"{num(no_response)} row(s) dropped for having no response")
    if is_number(dup) and dup:
        parts.append(f"{num(dup)} validation row(s) removed as duplicates of training rows")
    return (
        ("Changed or dropped: " + "; ".join(parts) + ".") if parts else "No rows were dropped or truncated."
    )


def _pairs_line(d: dict, max_length) -> str:
    limit = f" at {num(max_length)} tokens" if max_length is not None else ""
    return (
        f"Preference pairs: {num(d.get('truncated_pairs'))} truncated{limit} (the prompt's oldest tokens "
        f"first; {num(d.get('replies_cut_pairs'))} with a reply cut at its end), {num(d.get('dropped_pairs'))} "
        "dropped (nothing left to compare)."
    )


def _training_section(run: Run, facts: dict) -> dict:
    plot = loss_plot(run.records, facts["best_step"])
    if plot is None:
        return section("Training curves", [note("No training records (metrics.jsonl is missing or empty).")])
    rows = [
        ["final training loss", num(facts["loss"])],
        ["final validation loss", num(facts["val_loss"])],
        ["best validation loss", f"{num(facts['best_val_loss'])} at step {num(facts['best_step'])}"]
        if is_number(facts["best_val_loss"])
        else None,
        ["steps", num(facts["steps"])],
        ["skipped non-finite steps", num(facts["skipped_steps"])]
        if facts["skipped_steps"] is not None
        else None,
        ["stopped early", "yes" if facts["stopped_early"] else "no"]
        if facts["stopped_early"] is not None
        else None,
    ]
    return section(
        "Training curves",
        [
            image("loss", plot, "training and validation loss per step"),
            image("lr", lr_plot(run.records), "learning rate per step"),
            table(["", "value"], [r for r in rows if r]),
        ],
    )


def _setup_heavy(facts: dict) -> bool:
    """The run spent over a fifth of its time outside the training loop (data, reference, evaluation)."""
    loop, whole = facts.get("loop_seconds"), facts.get("seconds")
    return is_number(loop) and is_number(whole) and whole > 1.25 * loop


def _throughput_section(run: Run, facts: dict) -> dict:
    times = [["total training time", duration(facts["seconds"])]]
    if _setup_heavy(facts):
        times = [
            ["training loop time", duration(facts["loop_seconds"])],
            ["whole run time", duration(facts["seconds"])],
        ]
    rows = [
        ["median training tokens/s", num(facts["median_tokens_per_s"])],
        *times,
        [_unit(run), num(facts["label_tokens"])],
    ]
    trainable, total = facts["trainable_parameters"], facts["total_parameters"]
    if is_number(trainable) and is_number(total) and total > 0:
        rows.append(
            ["trainable parameters", f"{count(trainable)} of {count(total)} ({trainable / total:.2%})"]
        )
    evals = run.eval.get("throughput")
    for model, t in evals.items() if isinstance(evals, dict) else ():
        if isinstance(t, dict):
            rows.append(
                [f"eval {model}", f"{num(t.get('examples_per_s'))} examples/s ({duration(t.get('seconds'))})"]
            )
    rows = [r for r in rows if r[1] != "—"]
    if not rows:
        return section("Throughput", [note("No timing was recorded.")])
    return section("Throughput", [table(["", "value"], rows)])


def _unit(run: Run) -> str:
    """What the loss was averaged over, summed over the steps."""
    task = run.config.get("task", "") if isinstance(run.config, dict) else ""
    if task == "reward" and dig(run.config, "reward_model", "target") == "ratings":
        return "rated replies trained on"
    return {
        "reward": "pairs trained on",
        "dpo": "pairs trained on",
        "classification": "examples trained on",
    }.get(task, "label tokens trained on")


def _cell(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    return num(v)


def _stat_order(key: str) -> tuple:
    # min < p50 < p90 < p99 < max; anything else after, alphabetically
    if key.startswith("p") and key[1:].isdigit():
        return (1, int(key[1:]), key)
    return {"min": (0, 0, key), "max": (2, 0, key)}.get(key, (3, 0, key))

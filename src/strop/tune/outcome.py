"""What a search leaves once its trials are done: `study.json` (every trial as plain data), `best.yaml`
(the searched config with the best trial's parameters) and the study report."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from strop.core.config import RunConfig, load_config, to_yaml
from strop.core.io import atomic_write_json, atomic_write_text
from strop.core.search_config import SearchConfig
from strop.report.study import write_study_report
from strop.tune import study as studies
from strop.tune.space import apply_params
from strop.tune.trial import Objective

log = logging.getLogger("strop.tune")


@dataclass
class TuneResult:
    run_dir: Path
    best: dict | None  # {"number", "value", "params"}
    best_config: Path | None
    report: Path | None
    counts: dict  # trials by state
    refit: dict | None = None


def study_data(study: optuna.Study, objective: Objective, search: SearchConfig, planned: int) -> dict:
    trials = [_trial(t, objective) for t in study.get_trials(deepcopy=False)]
    complete = [t for t in trials if t["state"] == "complete"]
    best = None
    if complete:
        pick = min if objective.direction == "minimize" else max
        b = pick(complete, key=lambda t: t["value"])
        best = {"number": b["number"], "value": b["value"], "params": b["params"], "folder": b["folder"]}
    return {
        "objective": objective.name,
        "direction": objective.direction,
        "intermediate": objective.intermediate,
        "sampler": search.sampler,
        "pruner": search.pruner,
        "planned": planned,
        "space": sorted({k for t in trials for k in t["params"]}),
        "trials": trials,
        "best": best,
        "importances": _importances(study),
        "compute": _compute(trials),
    }


def write_outcome(
    study, cfg: RunConfig, search: SearchConfig, objective: Objective, base: dict, planned: int
):
    data = study_data(study, objective, search, planned)
    run_dir = cfg.run_dir
    best_config = None
    if data["best"]:
        best = data["best"]
        raw = apply_params(base, best["params"])
        raw["name"] = f"{cfg.name}-best"
        best_config = run_dir / "best.yaml"
        header = (
            f"# strop tune {run_dir}: trial {best['number']:03d}'s parameters "
            f"({objective.name} {best['value']:.6g}); train it with `strop train {best_config}`\n"
        )
        atomic_write_text(best_config, header + to_yaml(load_config(raw)))
        data["best_config"] = str(best_config)
    atomic_write_json(run_dir / "study.json", data)
    report = write_study_report(run_dir)
    return TuneResult(run_dir, data["best"], best_config, report, studies.counts(study))


def _trial(t: optuna.trial.FrozenTrial, objective: Objective) -> dict:
    attrs = t.user_attrs
    seconds = attrs.get("seconds")
    if seconds is None and t.datetime_start and t.datetime_complete:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds()
    return {
        "number": t.number,
        "state": t.state.name.lower(),
        "params": dict(t.params),
        "value": t.value if t.state == TrialState.COMPLETE else None,
        "seconds": seconds,
        "train_seconds": attrs.get("train_seconds"),
        "steps": attrs.get("steps"),
        "total_steps": attrs.get("total_steps"),
        "folder": attrs.get("folder"),
        "error": attrs.get("error"),
        "interrupted": bool(attrs.get("interrupted")),
        "retry_of": attrs.get("retry_of"),
        # as the run logged them (the study saw a maximised objective's val_loss negated)
        "intermediate": {int(s): objective.sign * v for s, v in sorted(t.intermediate_values.items())},
    }


def _importances(study: optuna.Study) -> dict:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varied = {k for t in complete for k in t.params if len({repr(u.params.get(k)) for u in complete}) > 1}
    if len(complete) < 3 or not varied:
        return {"values": None, "note": "needs at least 3 complete trials with varied parameters"}
    try:
        values = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as e:
        return {"values": None, "note": f"not computed: {e}"}
    return {"values": {k: float(v) for k, v in values.items()}, "note": "fANOVA (Optuna), normalised to 1"}


def _compute(trials: list[dict]) -> dict:
    """Steps the trials ran, and the steps pruning saved: what each pruned trial would still have run."""
    ran = sum(t["steps"] or 0 for t in trials if t["state"] in ("complete", "pruned"))
    planned = sum(t["total_steps"] or 0 for t in trials if t["state"] in ("complete", "pruned"))
    saved_steps, saved_s = 0, 0.0
    for t in trials:
        if t["state"] == "pruned" and t["total_steps"] and t["steps"]:
            left = t["total_steps"] - t["steps"]
            saved_steps += left
            if t["train_seconds"]:  # the loop's own time per step: start-up is not saved by pruning
                saved_s += t["train_seconds"] / t["steps"] * left
    seconds = sum(t["seconds"] or 0 for t in trials if t["state"] in ("complete", "pruned"))
    return {
        "steps_run": ran,
        "steps_planned": planned,
        "steps_saved": saved_steps,
        "saved_fraction": saved_steps / planned if planned else None,
        "seconds": seconds,
        "seconds_saved_estimate": saved_s if math.isfinite(saved_s) else None,
    }

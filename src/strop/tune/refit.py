"""`strop tune --refit`: the best config and the default config (the searched one, as written), each
trained again as an ordinary run with data.test, then compared on that test set: base, default and
best side by side with paired-bootstrap intervals of best − default and best − base.

Both runs score the same test examples in the same order (the same data.test and eval settings), so
their per-example predictions pair up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from strop.core import signals
from strop.core.config import RunConfig, load_config, to_yaml
from strop.core.errors import StropError
from strop.core.io import atomic_write_json, atomic_write_text
from strop.eval.bootstrap import paired_bootstrap
from strop.eval.extract import get_extractor
from strop.eval.metrics import build_metrics
from strop.eval.suite import metric_names
from strop.report.study import write_study_report

CLASSIFIER_METRICS = ["accuracy", "macro_f1"]


def refit_and_compare(cfg: RunConfig, result, show_progress: bool = True) -> dict:
    out = cfg.run_dir / "refit"
    runs = {}
    for name, source in (("default", None), ("best", result.best_config)):
        raw = (
            load_config(source).model_dump(mode="json", exclude={"search"})
            if source
            else cfg.model_dump(mode="json", exclude={"search"})
        )
        raw.update(name=name, output_dir=str(out))
        run_cfg = load_config(raw)
        runs[name] = run_cfg.run_dir
        if (run_cfg.run_dir / "result.json").is_file():
            continue  # trained by an earlier --refit of this search
        print(f"refit: training the {name} config ({run_cfg.run_dir})", file=sys.stderr, flush=True)
        _train(run_cfg, show_progress)
    comparison = compare(cfg, runs["default"], runs["best"])
    atomic_write_json(cfg.run_dir / "refit.json", comparison)
    write_study_report(cfg.run_dir)
    return comparison


def _train(cfg: RunConfig, show_progress: bool) -> None:
    """An ordinary `strop train` in a child process (its output shown as it goes)."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.run_dir / "config.yaml"
    atomic_write_text(path, to_yaml(cfg))
    cmd = [sys.executable, "-m", "strop", "train", str(path)] + ([] if show_progress else ["--no-progress"])
    code = subprocess.call(cmd, env={**os.environ, signals.PARENT_ENV: str(os.getpid())})
    if code != 0:
        raise StropError(f"refit: training {cfg.run_dir} failed (exit status {code}); its output is above")


def compare(cfg: RunConfig, default_dir: Path, best_dir: Path) -> dict:
    """base / default / best on the test set, per metric, with paired-bootstrap intervals."""
    if cfg.task == "classification":
        rows_d, rows_b = (
            _jsonl(default_dir / "eval" / "predictions.jsonl"),
            _jsonl(best_dir / "eval" / "predictions.jsonl"),
        )
        refs = [r["label"] for r in rows_b]
        preds = {"default": [r["predicted"] for r in rows_d], "best": [r["predicted"] for r in rows_b]}
        base_name, names, extract = "majority label", CLASSIFIER_METRICS, None
        majority = _summary(best_dir).get("majority_label")
        preds["base"] = [str(majority)] * len(refs)
    elif cfg.task == "sft":
        rows_d, rows_b = (
            _jsonl(default_dir / "eval" / "samples.jsonl"),
            _jsonl(best_dir / "eval" / "samples.jsonl"),
        )
        refs = [r["reference"] for r in rows_b]
        preds = {"default": [r["tuned"] for r in rows_d], "best": [r["tuned"] for r in rows_b]}
        if all("base" in r for r in rows_b):
            preds["base"] = [r["base"] for r in rows_b]
        base_name, names, extract = "base model", metric_names(cfg.eval), get_extractor(cfg.eval.extract)
    else:
        return _loss_only(cfg, default_dir, best_dir)
    if not refs or len(rows_d) != len(rows_b):
        raise StropError(
            f"refit: {default_dir} and {best_dir} did not evaluate the same test examples; see their eval/"
        )
    metrics = []
    for metric in build_metrics(names, extract):
        row: dict = {"name": metric.name}
        for who, p in preds.items():
            row[who] = metric.score(p, refs)
        row["best_vs_default"] = paired_bootstrap(
            metric, refs, preds["default"], preds["best"], cfg.eval.bootstrap
        )
        if "base" in preds:
            row["best_vs_base"] = paired_bootstrap(
                metric, refs, preds["base"], preds["best"], cfg.eval.bootstrap
            )
        metrics.append(row)
    metrics += _test_loss(default_dir, best_dir)
    return {
        "examples": len(refs),
        "base_name": base_name,
        "metrics": metrics,
        "runs": {"default": str(default_dir), "best": str(best_dir)},
    }


def _test_loss(default_dir: Path, best_dir: Path) -> list[dict]:
    """SFT: the test set's loss of each run (no per-example values are kept, so no interval)."""
    d, b = _summary(default_dir).get("likelihood", {}), _summary(best_dir).get("likelihood", {})
    if "tuned" not in d or "tuned" not in b:
        return []
    return [
        {
            "name": "test loss",
            "base": b.get("base", {}).get("loss"),
            "default": d["tuned"]["loss"],
            "best": b["tuned"]["loss"],
        }
    ]


def _loss_only(cfg: RunConfig, default_dir: Path, best_dir: Path) -> dict:
    d, b = _result(default_dir), _result(best_dir)
    return {
        "examples": None,
        "base_name": "base",
        "metrics": [
            {"name": "best val_loss", "default": d.get("best_val_loss"), "best": b.get("best_val_loss")}
        ],
        "runs": {"default": str(default_dir), "best": str(best_dir)},
    }


def _summary(run_dir: Path) -> dict:
    path = run_dir / "eval" / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _result(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text()).get("metrics", {})


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise StropError(f"refit: {path} is missing: was the run's evaluation switched off (eval.enabled)?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

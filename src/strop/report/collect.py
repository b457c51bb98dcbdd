"""Read a run directory into plain facts.

Files read (all optional; a report is written from whatever is there):
    config.yaml  data_summary.json  metrics.jsonl  result.json  eval/summary.json  eval/samples.jsonl
A missing file leaves its field empty; an unreadable one also adds a line to `Run.notes`, so a report
of a crashed or half-written run says what it could not read instead of failing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeGuard

import numpy as np
import yaml


@dataclass
class Run:
    dir: Path
    name: str
    config: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)  # metrics.jsonl rows, in file order
    result: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)  # eval/summary.json
    samples: list[dict] = field(default_factory=list)  # eval/samples.jsonl rows
    notes: list[str] = field(default_factory=list)  # files that exist but could not be read


def read_run(run_dir: Path) -> Run:
    run_dir = Path(run_dir)
    notes: list[str] = []
    config = _read_dict(run_dir / "config.yaml", yaml.safe_load, notes)
    name = config.get("name")
    return Run(
        dir=run_dir,
        name=name if isinstance(name, str) else run_dir.name,
        config=config,
        data=_read_dict(run_dir / "data_summary.json", json.loads, notes),
        records=_read_jsonl(run_dir / "metrics.jsonl", notes),
        result=_read_dict(run_dir / "result.json", json.loads, notes),
        eval=_read_dict(run_dir / "eval" / "summary.json", json.loads, notes),
        samples=_read_jsonl(run_dir / "eval" / "samples.jsonl", notes),
        notes=notes,
    )


def dig(obj, *keys):
    """obj[k1][k2]...; None where a level is missing or is not a dict (no KeyError from odd files)."""
    for k in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(k)
    return obj


def is_number(x) -> TypeGuard[float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _read_dict(path: Path, parse, notes: list[str]) -> dict:
    if not path.is_file():
        return {}
    try:
        value = parse(path.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        notes.append(f"{path.name}: could not be read ({type(e).__name__}); its sections are left out.")
        return {}
    if not isinstance(value, dict):
        notes.append(f"{path.name}: expected a mapping, found {type(value).__name__}; left out.")
        return {}
    return value


def _read_jsonl(path: Path, notes: list[str]) -> list[dict]:
    if not path.is_file():
        return []
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1  # e.g. the last line of a run killed mid-write
            continue
        if isinstance(row, dict):
            rows.append(row)
    if bad:
        notes.append(f"{path.name}: skipped {bad} unreadable line(s).")
    return rows


# ---- facts ------------------------------------------------------------------------------------------


def config_summary(cfg: dict) -> dict[str, str]:
    """The settings that shape a run, as label -> short text; labels whose settings are absent are left out."""
    out: dict[str, str] = {}
    model = dig(cfg, "model", "name")
    if model is not None:
        out["model"] = str(model)
    method = dig(cfg, "method", "name")
    if method is not None:
        out["method"] = _method_text(cfg["method"])
    optim = dig(cfg, "optim")
    if isinstance(optim, dict):
        out["optimizer"] = _join(
            [
                optim.get("name"),
                _kv("lr", optim.get("lr")),
                optim.get("schedule") and f"{optim['schedule']} schedule",
                _kv("warmup steps", optim.get("warmup_steps")),
                _kv("weight decay", optim.get("weight_decay")),
                _kv("grad clip", optim.get("grad_clip")),
            ]
        )
    train = dig(cfg, "train")
    if isinstance(train, dict):
        if train.get("batch_tokens"):
            batch = f"{train['batch_tokens']} tokens"
        elif train.get("batch_size") is not None:
            batch = f"{train['batch_size']} examples"
        else:
            batch = None
        if batch:
            out["batch"] = f"{batch} × {train.get('grad_accum') or 1} accumulation step(s)"
        length = _join([_kv("epochs", train.get("epochs")), _kv("max steps", train.get("max_steps"))])
        if length:
            out["length"] = length
        if train.get("seed") is not None:
            out["seed"] = str(train["seed"])
    for key in ("max_length", "template"):
        if dig(cfg, "data", key) is not None:
            out[key] = str(cfg["data"][key])
    return out


LORA_FIELDS = (("r", "r"), ("alpha", "alpha"), ("dropout", "dropout"), ("targets", "target_modules"))


def _method_text(method: dict) -> str:
    name = str(method.get("name"))
    if name == "lora" and isinstance(method.get("lora"), dict):
        lora = method["lora"]
        parts = [_kv(label, lora.get(key)) for label, key in LORA_FIELDS]
        return f"lora ({_join(parts)})" if any(parts) else name
    if name == "freeze" and isinstance(method.get("freeze"), dict):
        n = method["freeze"].get("train_last_n_blocks")
        return f"freeze (last {n} blocks trained)" if n is not None else name
    return name


def _kv(label: str, value) -> str | None:
    if value is None or value == [] or value == "":
        return None
    if isinstance(value, list):
        value = ", ".join(map(str, value))
    return f"{label} {value}"


def _join(parts: list) -> str:
    return ", ".join(str(p) for p in parts if p)


def training_facts(run: Run) -> dict:
    """Final metrics and throughput: result.json where present, else read off the curve."""
    m = dig(run.result, "metrics")
    m = m if isinstance(m, dict) else {}
    train = [r for r in run.records if is_number(r.get("loss"))]
    val = [r for r in run.records if is_number(r.get("val_loss"))]
    tps = [r["tokens_per_s"] for r in train if is_number(r.get("tokens_per_s"))]
    elapsed = [r["elapsed_s"] for r in run.records if is_number(r.get("elapsed_s"))]
    label_tokens = [r["label_tokens"] for r in train if is_number(r.get("label_tokens"))]
    best = min(val, key=lambda r: r["val_loss"]) if val else {}
    seconds = run.result.get("seconds")
    return {
        "steps": m.get("steps", train[-1].get("step") if train else None),
        "loss": m.get("loss", train[-1]["loss"] if train else None),
        "val_loss": m.get("val_loss", val[-1]["val_loss"] if val else None),
        "best_step": m.get("best_step", best.get("step")),
        "best_val_loss": m.get("best_val_loss", best.get("val_loss")),
        "skipped_steps": m.get("skipped_steps"),
        "stopped_early": m.get("stopped_early"),
        "trainable_parameters": m.get("trainable_parameters"),
        "total_parameters": m.get("total_parameters"),
        "seconds": seconds if is_number(seconds) else _loop_seconds(elapsed),
        "loop_seconds": _loop_seconds(elapsed),
        "median_tokens_per_s": float(np.median(tps)) if tps else None,
        "label_tokens": int(sum(label_tokens)) if label_tokens else None,
    }


def _loop_seconds(elapsed: list[float]) -> float | None:
    """Wall time of the training loop; `elapsed_s` restarts at each resume, so the segments add up."""
    if not elapsed:
        return None
    total = 0.0
    for before, after in zip(elapsed, elapsed[1:], strict=False):
        total += before if after < before else 0.0
    return total + elapsed[-1]

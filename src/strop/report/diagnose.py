"""Read the training curves the way a practitioner would: overfitting, underfitting, instability.

`diagnose(records, result)` takes the rows of `metrics.jsonl` (training rows carry "loss", validation
rows "val_loss") and `result.json` (or None), and returns plain sentences `{"kind", "severity", "text"}`.
"warning" means something to act on; "info" is context. A healthy run gets one "ok" item and no warning.
The thresholds below are what "barely moved", "rose" and "spiked" mean.
"""

from __future__ import annotations

import math
from typing import TypeGuard

import numpy as np

MIN_TRAIN_POINTS = 5  # fewer logged training steps than this: too little to judge the curve
EDGE_FRACTION = 0.1  # "start" and "end" of a curve = mean of its first / last 10% of points
UNDERFIT_MIN_DROP = 0.05  # training loss that falls less than 5% start-to-end barely moved
OVERFIT_MIN_RISE = 0.02  # validation loss must end 2% above its minimum to count as rising
SPIKE_FACTOR = 3.0  # a step loss above 3x the median of the steps before it is a spike
GRAD_SPIKE_FACTOR = 5.0  # grad norms are noisier than losses, so their bar is higher
SPIKE_WINDOW = 20  # the running median looks back this many logged steps
SPIKE_MIN_HISTORY = 5  # and judges only once it has this many
MAX_NAMED_STEPS = 5  # name at most this many spike steps in a sentence
SMOOTH_POINTS = 20  # the smoothed curve averages over about n / 20 points (EMA span)


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that carry a finite number under `key`, in file order."""
    pairs = [(r.get("step"), r[key]) for r in records if _finite(r.get(key)) and _finite(r.get("step"))]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pairs, strict=True)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def smooth(values: np.ndarray, min_span: int = 1) -> np.ndarray:
    """Bias-corrected exponential moving average with a span of ~len/SMOOTH_POINTS points (at least
    `min_span`)."""
    span = max(min_span, len(values) // SMOOTH_POINTS)
    alpha = 2.0 / (span + 1)
    out, avg, weight = np.empty(len(values)), 0.0, 0.0
    for i, v in enumerate(values):
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha  # corrects the pull toward 0 at the start
        out[i] = avg / weight
    return out


def diagnose(records: list[dict], result: dict | None) -> list[dict]:
    """Findings in reading order: hard failures (skipped / non-finite steps) first, then the curve's
    trend, spikes and overfitting; an "ok" item leads when nothing earned a warning."""
    metrics = (result or {}).get("metrics")
    metrics = metrics if isinstance(metrics, dict) else {}
    out: list[dict] = []
    skipped = metrics.get("skipped_steps")
    if _finite(skipped) and skipped > 0:
        out.append(
            finding(
                "instability",
                "warning",
                f"{int(skipped)} step(s) were skipped because the loss or gradients were not finite "
                "(NaN or inf): lower the learning rate or check the data for broken rows.",
            )
        )
    steps, loss = series(records, "loss")
    nonfinite = sum(1 for r in records if "loss" in r and not _finite(r["loss"]))
    if nonfinite:
        out.append(
            finding("instability", "warning", f"{nonfinite} logged training loss(es) were not finite.")
        )
    if len(loss) == 0:
        out.append(finding("too_few_points", "info", "No training steps were logged: nothing to judge."))
        return out
    if len(loss) < MIN_TRAIN_POINTS:
        out.append(
            finding(
                "too_few_points",
                "info",
                f"Only {len(loss)} training step(s) were logged: too little to judge the curves.",
            )
        )
        return out
    out += _trend(loss, records)
    out += _spikes(steps, loss, records)
    val_steps, val = series(records, "val_loss")
    if len(val) == 0:
        out.append(
            finding(
                "no_validation",
                "info",
                "No validation loss was logged, so overfitting cannot be checked "
                "(set data.validation or data.val_fraction).",
            )
        )
    else:
        over = _overfitting(steps, smooth(loss), val_steps, val, metrics.get("best_step"))
        if over:
            out.append(over)
    if metrics.get("stopped_early") is True:
        out.append(
            finding(
                "stopped_early",
                "info",
                f"Training stopped early at step {metrics.get('steps', '?')} because validation loss "
                "stopped improving.",
            )
        )
    if not any(i["severity"] == "warning" for i in out):
        out.insert(0, _ok(loss, val_steps, val))
    return out


def _trend(loss: np.ndarray, records: list[dict]) -> list[dict]:
    start, end = _edges(loss)
    if start <= 0:
        return []
    drop = (start - end) / start
    if drop <= -UNDERFIT_MIN_DROP:
        return [
            finding(
                "instability",
                "warning",
                f"Training loss ended higher than it started ({start:#.3g} → {end:#.3g}, {-drop:+.0%}): "
                "training diverged; lower the learning rate.",
            )
        ]
    if drop < UNDERFIT_MIN_DROP:
        _, lrs = series(records, "lr")
        lr = f" (peak learning rate {lrs.max():.3g})" if len(lrs) else ""
        return [
            finding(
                "underfitting",
                "warning",
                f"Training loss barely moved ({start:#.3g} → {end:#.3g}, {-drop:+.1%} over {len(loss)} logged "
                f"steps): the model is underfitting. Train for more steps or raise the learning rate{lr}.",
            )
        ]
    return []


def _spikes(steps: np.ndarray, loss: np.ndarray, records: list[dict]) -> list[dict]:
    out = []
    spiky = _spike_steps(steps, loss, SPIKE_FACTOR)
    if spiky:
        out.append(
            finding(
                "instability",
                "warning",
                f"Training loss spiked at {_name_steps(spiky)} (above {SPIKE_FACTOR:g}× the running "
                "median): lower the learning rate, lengthen warmup, or check those batches.",
            )
        )
    gsteps, gnorm = series(records, "grad_norm")
    gspiky = _spike_steps(gsteps, gnorm, GRAD_SPIKE_FACTOR)
    if gspiky:
        out.append(
            finding(
                "instability",
                "info",
                f"Gradient norm spiked at {_name_steps(gspiky)} (above {GRAD_SPIKE_FACTOR:g}× the "
                "running median); gradient clipping (optim.grad_clip) limits their effect.",
            )
        )
    return out


def _spike_steps(steps: np.ndarray, values: np.ndarray, factor: float) -> list[int]:
    found = []
    for i in range(SPIKE_MIN_HISTORY, len(values)):
        median = np.median(values[max(0, i - SPIKE_WINDOW) : i])
        if median > 0 and values[i] > factor * median:
            found.append(int(steps[i]))
    return found


def _overfitting(steps, smoothed, val_steps, val, best_step) -> dict | None:
    b = int(np.argmin(val))
    rise = val[-1] / val[b] - 1 if val[b] > 0 else 0.0
    if b == len(val) - 1 or rise < OVERFIT_MIN_RISE:
        return None
    # the training loss (smoothed) where validation was best vs where it ended
    train_at_best, train_at_end = np.interp([val_steps[b], val_steps[-1]], steps, smoothed)
    if train_at_end >= train_at_best:
        return None  # both rose: that is instability or a schedule problem, not overfitting
    best, last = int(val_steps[b]), int(val_steps[-1])
    text = (
        f"Validation loss was lowest at step {best} ({val[b]:#.3g}) and rose {rise:.0%} by step {last} "
        f"while training loss kept falling ({train_at_best:#.3g} → {train_at_end:#.3g}): the model began "
        "to overfit"
    )
    if _finite(best_step) and int(best_step) == best:
        text += f"; the best checkpoint (step {best}) was kept."
    else:
        text += (
            f". Stop near step {best} (train.early_stopping), train fewer steps or epochs, or add more data."
        )
    return finding("overfitting", "warning", text)


def _ok(loss: np.ndarray, val_steps: np.ndarray, val: np.ndarray) -> dict:
    start, end = _edges(loss)
    fell = f" {(start - end) / start:.0%}" if start > 0 else ""
    text = f"Training loss fell{fell} ({start:#.3g} → {end:#.3g}) with no loss spikes"
    if len(val):
        b = int(np.argmin(val))
        text += f"; validation loss was best at step {int(val_steps[b])} ({val[b]:#.3g})"
    return finding("ok", "info", text + ".")


def _edges(values: np.ndarray) -> tuple[float, float]:
    k = max(1, math.ceil(len(values) * EDGE_FRACTION))
    return float(values[:k].mean()), float(values[-k:].mean())


def _name_steps(steps: list[int]) -> str:
    """'step 30' or 'steps 12, 30 and 4 more'."""
    named = ", ".join(str(s) for s in steps[:MAX_NAMED_STEPS])
    more = len(steps) - MAX_NAMED_STEPS
    return f"step{'s' if len(steps) > 1 else ''} {named}" + (f" and {more} more" if more > 0 else "")


def finding(kind: str, severity: str, text: str) -> dict:
    return {"kind": kind, "severity": severity, "text": text}


def _finite(x) -> TypeGuard[float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

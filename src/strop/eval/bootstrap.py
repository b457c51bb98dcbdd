"""Paired bootstrap: how sure is "tuned beats base by d"?

Both models answered the same examples, so resampling examples (with replacement) and recomputing
both scores on each resample gives the distribution of the difference with the per-example pairing
kept; the 2.5th and 97.5th percentiles bound a 95% interval (Efron & Tibshirani 1993; Koehn 2004 for
MT metrics).
"""

from __future__ import annotations

import numpy as np

from strop.eval.metrics import Metric


def paired_bootstrap(
    metric: Metric,
    refs: list[str],
    preds_a: list[str],
    preds_b: list[str],
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """Difference score(b) - score(a) on the full set, with its bootstrap confidence interval."""
    n = len(refs)
    diff = metric.score(preds_b, refs) - metric.score(preds_a, refs)
    if metric.corpus is None:  # a mean: score every example once, then resample the score arrays
        per_example = metric.per_example
        assert per_example is not None, "a Metric has per_example or corpus"
        a = [per_example(p, r) for p, r in zip(preds_a, refs, strict=True)]
        b = [per_example(p, r) for p, r in zip(preds_b, refs, strict=True)]
        return {**paired_mean_difference(a, b, resamples, level, seed), "diff": float(diff)}
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    diffs = np.array(
        [
            metric.score([preds_b[i] for i in d], [refs[i] for i in d])
            - metric.score([preds_a[i] for i in d], [refs[i] for i in d])
            for d in draws
        ]
    )
    tail = (1 - level) / 2
    lo, hi = np.quantile(diffs, [tail, 1 - tail])
    return {"diff": float(diff), "ci": [float(lo), float(hi)], "level": level, "resamples": resamples}


def paired_mean_difference(
    a: list[float], b: list[float], resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> dict:
    """mean(b) - mean(a) over paired per-example scores (the same prompts), with its bootstrap interval:
    what an RL run's base-vs-tuned reward on held-out prompts reports."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired scores: {len(a)} and {len(b)} examples")
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    diffs = (y[draws] - x[draws]).mean(axis=1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(diffs, [tail, 1 - tail])
    diff = float(y.mean() - x.mean())
    return {"diff": diff, "ci": [float(lo), float(hi)], "level": level, "resamples": resamples}


def bootstrap_mean(scores: list[float], resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """The mean of per-example scores (a judge's win rate, its grades) with its bootstrap interval."""
    if not scores:
        raise ValueError("bootstrap_mean: no scores")
    x = np.asarray(scores, dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    tail = (1 - level) / 2
    lo, hi = np.quantile(x[draws].mean(axis=1), [tail, 1 - tail])
    return {"mean": float(x.mean()), "ci": [float(lo), float(hi)], "level": level, "resamples": resamples}

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
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    if metric.corpus is None:  # a mean: score every example once, then resample the score arrays
        per_example = metric.per_example
        assert per_example is not None, "a Metric has per_example or corpus"
        a = np.array([per_example(p, r) for p, r in zip(preds_a, refs, strict=True)])
        b = np.array([per_example(p, r) for p, r in zip(preds_b, refs, strict=True)])
        diffs = (b[draws] - a[draws]).mean(axis=1)
    else:
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

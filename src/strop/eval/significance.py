"""Exact McNemar test: did the same items flip from wrong to right more often than from right to wrong?

For paired yes/no outcomes (a pair ranked right by the starting and by the tuned model), only the
discordant items carry information: under "no change" each is equally likely to go either way, so the
count that improved is Binomial(improved + worsened, 1/2) (McNemar 1947; the exact form avoids the
chi-square approximation's trouble with small counts).
"""

from __future__ import annotations

import math

import numpy as np


def mcnemar(before: np.ndarray, after: np.ndarray) -> dict:
    """{"improved": wrong -> right, "worsened": right -> wrong, "p_value": exact two-sided}."""
    before, after = np.asarray(before, bool), np.asarray(after, bool)
    improved, worsened = int(np.sum(~before & after)), int(np.sum(before & ~after))
    return {"improved": improved, "worsened": worsened, "p_value": binomial_two_sided(improved, worsened)}


def binomial_two_sided(a: int, b: int) -> float:
    """P(a split at least as uneven as a : b) for n = a + b fair coin flips."""
    n, k = a + b, min(a, b)
    if n == 0:
        return 1.0
    # in logs, so tens of thousands of discordant pairs cost a loop over k, not giant integers
    logs = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
        for i in range(k + 1)
    ]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(x - top) for x in logs)
    return min(1.0, 2 * tail)

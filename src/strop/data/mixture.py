"""A mixture of training sources: each sampled to its share (`data.mixture`), repeats given their own ids."""

from __future__ import annotations

import logging

import numpy as np

from strop.core.config import DataConfig
from strop.core.errors import DataError
from strop.data.tokenized import TokenizedSet

log = logging.getLogger("strop.data")


def mix(
    parts: list[TokenizedSet], ratios: list[float], names: list[str], cfg: DataConfig, seed: int
) -> tuple[list[TokenizedSet], dict]:
    """Sample each source to its share of the mixture; returns the sampled parts and what was realized.

    Without replacement the mixture is as large as the ratios allow with no example repeated (the
    source that runs out first sets the size), or `mixture.examples` if smaller. With replacement it
    has `mixture.examples` examples (default: all sources' examples together); a source short of its
    share is repeated, each repeat with its own id (`id~repK`) so splits and reports can tell copies.
    """
    mixture = cfg.mixture
    assert mixture is not None  # build_datasets mixes only when data.mixture is given
    sizes, total_ratio = [len(p) for p in parts], sum(ratios)
    shares = [r / total_ratio for r in ratios]
    if mixture.replacement:
        n = mixture.examples or sum(sizes)
    else:
        n = int(min(size / share for size, share in zip(sizes, shares, strict=True)))
        if mixture.examples:
            if mixture.examples > n:
                raise DataError(
                    f"data.mixture.examples: {mixture.examples} examples at these ratios need repeats "
                    f"(without them at most {n}); set data.mixture.replacement: true or ask for fewer"
                )
            n = mixture.examples
    counts = _largest_remainder([share * n for share in shares])
    rng = np.random.default_rng([seed, 7])
    out, realized = [], {}
    for part, count, name, share in zip(parts, counts, names, shares, strict=True):
        if count <= len(part) or not mixture.replacement:
            picked = sorted(rng.choice(len(part), size=count, replace=False).tolist())
            sub = part.subset(picked)
        else:  # every example once, the rest drawn with replacement
            extra = rng.choice(len(part), size=count - len(part), replace=True).tolist()
            sub = part.subset(list(range(len(part))) + extra)
            seen: dict[str, int] = {}
            for i in range(len(part), len(sub)):
                eid = sub.example_ids[i]
                seen[eid] = seen.get(eid, 0) + 1
                sub.example_ids[i] = f"{eid}~rep{seen[eid]}"
        out.append(sub)
        realized[name] = {"available": len(part), "used": count, "target_share": round(share, 4)}
    for v in realized.values():
        v["share"] = round(v["used"] / max(1, n), 4)
    log.info(
        "data: mixture of %d examples: %s",
        n,
        ", ".join(f"{k} {v['used']} ({v['share']:.0%})" for k, v in realized.items()),
    )
    return out, realized


def _largest_remainder(quotas: list[float]) -> list[int]:
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: counts[i] - quotas[i])
    for i in by_remainder[: round(sum(quotas)) - sum(counts)]:
        counts[i] += 1
    return counts

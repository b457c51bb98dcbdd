"""The pairwise preference losses a config can name (`dpo.loss`), each a PairObjective in its own file."""

from __future__ import annotations

from collections.abc import Callable

from strop.methods.dpo import DPO, IPO, PairObjective
from strop.methods.orpo import ORPO
from strop.methods.simpo import SimPO

PAIR_LOSSES: dict[str, Callable[[float], PairObjective]] = {
    "sigmoid": DPO,
    "ipo": IPO,
    "simpo": SimPO,
    "orpo": ORPO,
}


def pair_objective(d) -> PairObjective:
    """The objective a `dpo:` config section (core/config.DPOConfig) asks for."""
    if d.loss == "sigmoid":
        return DPO(d.beta, d.label_smoothing)
    if d.loss == "simpo":
        return SimPO(d.beta, d.simpo_gamma, d.label_smoothing)
    return PAIR_LOSSES[d.loss](d.beta)

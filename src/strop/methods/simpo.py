"""SimPO (Meng et al. 2024, https://arxiv.org/abs/2405.14734; TRL's CPOTrainer loss_type="simpo"):
reference-free; a reply's reward is beta x its mean log-prob per token, and the chosen reply must win by
the margin gamma (`preference.simpo_loss`)."""

from __future__ import annotations

from strop.methods.dpo import PairObjective
from strop.methods.preference import simpo_loss


class SimPO(PairObjective):
    name = "simpo"
    needs = frozenset()

    def __init__(self, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0):
        self.beta, self.gamma, self.label_smoothing = beta, gamma, label_smoothing

    def pair_loss(self, chosen, rejected, chosen_len, rejected_len, reference):
        mean, m = simpo_loss(
            chosen / chosen_len, rejected / rejected_len, self.beta, self.gamma, self.label_smoothing
        )
        m |= {
            "logps/chosen": chosen.detach().mean().item(),
            "logps/rejected": rejected.detach().mean().item(),
        }
        return mean, m

"""ORPO: odds-ratio preference optimisation (Hong et al. 2024, https://arxiv.org/abs/2403.07691; TRL's
ORPOTrainer). Reference-free and SFT in one: the chosen reply's negative log-likelihood plus a term that
raises the odds of the chosen reply over the rejected one,

    loss = NLL(chosen) - beta * log sigmoid(log odds(chosen) - log odds(rejected)),
    odds(y) = P(y) / (1 - P(y)),  log P(y) = the mean log-prob per reply token,

so it can start from a base model with no SFT stage and no reference pass. beta is the paper's lambda.
NLL(chosen) is each chosen reply's mean token loss, averaged over the pairs (TRL averages over the
batch's chosen tokens: the same when the replies are equally long).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from strop.methods.dpo import PairObjective


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -ln 2 (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float = 0.1
) -> tuple[torch.Tensor, dict[str, float]]:
    """(mean loss over the B pairs, metrics) from the policy's mean log-prob per reply token, (B,) each.
    Metrics: nll_loss, log_odds_ratio (mean log sigmoid of the log odds ratio), log_odds_chosen (mean
    log odds ratio), rewards/{chosen,rejected} = beta x mean log-probs (TRL's), their accuracy and
    margin, logps/{chosen,rejected} (mean log-probs per token)."""
    c, r = chosen_mean.float(), rejected_mean.float()
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))  # (B,)
    ratio = F.logsigmoid(log_odds)  # (B,)
    losses = -c - beta * ratio
    cr, rr = beta * c.detach(), beta * r.detach()
    metrics = {
        "nll_loss": (-c).detach().mean().item(),
        "log_odds_ratio": ratio.detach().mean().item(),
        "log_odds_chosen": log_odds.detach().mean().item(),
        "rewards/chosen": cr.mean().item(),
        "rewards/rejected": rr.mean().item(),
        "rewards/accuracy": (cr > rr).float().mean().item(),
        "rewards/margin": (cr - rr).mean().item(),
        "logps/chosen": c.detach().mean().item(),
        "logps/rejected": r.detach().mean().item(),
    }
    return losses.mean(), metrics


class ORPO(PairObjective):
    name = "orpo"
    needs = frozenset()

    def __init__(self, beta: float = 0.1):
        self.beta = beta

    def pair_loss(self, chosen, rejected, chosen_len, rejected_len, reference):
        return orpo_loss(chosen / chosen_len, rejected / rejected_len, self.beta)

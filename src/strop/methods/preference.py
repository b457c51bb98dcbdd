"""Preference objectives on log-probs and rewards: DPO, IPO, SimPO and the Bradley-Terry reward-model loss.

Pure functions of tensors: the caller runs the policy, the reference and the reward model, and passes
per-sequence log-probs (`sequence_logps`) or scalar rewards. Every loss is a mean over the pairs of the
batch; metrics are python floats for logging.
DPO: Rafailov et al. 2023, https://arxiv.org/abs/2305.18290 (cDPO label smoothing: Mitchell 2023,
https://ericmitchell.ai/cdpo.pdf). IPO: Azar et al. 2023, https://arxiv.org/abs/2310.12036.
SimPO: Meng et al. 2024, https://arxiv.org/abs/2405.14734 (TRL's CPOTrainer loss_type="simpo").
Bradley-Terry with a margin: Touvron et al. 2023 (Llama 2, Eq. 2), https://arxiv.org/abs/2307.09288.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo")


def token_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float32 log p(labels[:, t+1] | ..t) per position, (B, T-1); 0 where mask[:, 1:] is False.

    logits (B, T, V) in any float dtype, labels (B, T) ids (anything, e.g. -100, where masked),
    mask (B, T) bool over labels. Position t of the logits predicts label t+1.
    """
    targets = labels[:, 1:].masked_fill(~mask[:, 1:], 0)  # (B, T-1); a valid id where masked
    rows = []
    # one row at a time: under no_grad (the reference pass) the float32 (T-1, V) copy exists once, not
    # B times; with grad, autograd keeps each row's copy for backward, as a full float32 cast would
    for row_logits, row_targets in zip(logits[:, :-1], targets, strict=True):
        row = row_logits.float()  # (T-1, V)
        picked = row.gather(-1, row_targets[:, None]).squeeze(-1)  # (T-1,)
        rows.append(picked - torch.logsumexp(row, dim=-1))  # log_softmax at the label, (T-1,)
    return torch.stack(rows).masked_fill(~mask[:, 1:], 0.0)  # (B, T-1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence sum of the label tokens' log-probs, float32 (B,). Arguments as in `token_logps`."""
    return token_logps(logits, labels, mask).sum(dim=-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(mean loss over the B pairs, metrics) from per-sequence log-probs, each (B,).

    With h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected):
      sigmoid: -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h), eps = label_smoothing
               (cDPO: the preference label is taken as flipped with probability eps);
      ipo:     (h - 1 / (2 * beta))^2, beta being the paper's tau. The paper's h is over whole sequences;
               pass per-token mean log-probs instead of sums for the length-normalized form TRL uses.
    Policy == reference gives h = 0, so the sigmoid loss is log 2 for any eps.
    Metrics: rewards/{chosen,rejected} (mean of beta * policy/ref log-ratio), rewards/accuracy (share of
    pairs whose chosen reward is larger), rewards/margin (mean difference), logps/{chosen,rejected}.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing: expected a value in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to the sigmoid loss only, not to ipo")
    chosen_logratio = policy_chosen - ref_chosen  # (B,)
    rejected_logratio = policy_rejected - ref_rejected  # (B,)
    h = chosen_logratio - rejected_logratio  # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * chosen_logratio.detach()  # (B,): DPO's implicit reward, up to a prompt term
    rejected_rewards = beta * rejected_logratio.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": policy_chosen.detach().mean().item(),
        "logps/rejected": policy_rejected.detach().mean().item(),
    }
    return losses.mean(), metrics


def simpo_loss(
    chosen_mean: torch.Tensor,
    rejected_mean: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(mean loss over the B pairs, metrics) from the policy's mean log-prob per reply token, each (B,).

    No reference model: the reward of a reply is beta x its mean token log-prob, and the chosen reply
    must win by the margin gamma: with z = beta * (chosen_mean - rejected_mean) - gamma,
    loss = -(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z), eps = label_smoothing.
    Metrics: rewards/{chosen,rejected,accuracy,margin} as `dpo_loss`, from these rewards.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing: expected a value in [0, 0.5), got {label_smoothing}")
    chosen_rewards, rejected_rewards = beta * chosen_mean, beta * rejected_mean  # (B,)
    z = chosen_rewards - rejected_rewards - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {
        "rewards/chosen": c.mean().item(),
        "rewards/rejected": r.mean().item(),
        "rewards/accuracy": (c > r).float().mean().item(),
        "rewards/margin": (c - r).mean().item(),
    }
    return losses.mean(), metrics


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """(mean over the B pairs of -logsigmoid(r_chosen - r_rejected - margin), metrics); tensors (B,).

    The margin (Llama 2) asks for a larger gap on pairs rated far apart; None means 0.
    Metrics: accuracy (share of pairs with r_chosen > r_rejected), margin (mean r_chosen - r_rejected).
    """
    diff = chosen_rewards - rejected_rewards  # (B,)
    losses = -F.logsigmoid(diff if margin is None else diff - margin)
    metrics = {
        "accuracy": (diff > 0).float().mean().item(),
        "margin": diff.detach().mean().item(),
    }
    return losses.mean(), metrics

"""PPO and GRPO loss terms on per-token tensors: KL-shaped rewards, GAE, clipped policy and value losses
(the objectives using them are the classes in rl.py and rl_losses.py).

Pure functions of tensors laid out (B, T) over response tokens, right-padded, with a bool `mask` of the
valid positions. "Masked mean" is one mean over every valid token of the batch (not a mean of
per-sequence means), so long responses weigh in proportion to their tokens.
PPO: Schulman et al. 2017, https://arxiv.org/abs/1707.06347. GAE: Schulman et al. 2015,
https://arxiv.org/abs/1506.02438. KL-penalized reward and adaptive KL: Ziegler et al. 2019,
https://arxiv.org/abs/1909.08593. GRPO: Shao et al. 2024 (DeepSeekMath), https://arxiv.org/abs/2402.03300.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where mask is True; x broadcasts against mask (B, T)."""
    # where, not x * mask: a nan or inf at a padded position must not reach the mean
    return torch.where(mask, x, 0.0).sum() / mask.sum()


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the valid positions (unbiased variance, as TRL and OpenAI's lm-human-
    preferences); 0 at padded positions. x, mask (B, T); at least two valid positions."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1)
    return ((x - mean) * torch.rsqrt(var + 1e-8)).masked_fill(~mask, 0.0)


@torch.no_grad()
def kl_penalty_rewards(
    scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards (B, T): -kl_coef * (logp - ref_logp) at each valid token, plus the sequence's
    score (B,) at its last valid token; 0 at padding. Every row needs at least one valid token.

    The per-token log-ratio is the sampled estimate of KL(policy || reference) that keeps the policy
    near the reference while it climbs the reward model's score (Ziegler et al., Eq. 2).
    """
    rewards = (-kl_coef * (logps - ref_logps)).masked_fill(~mask, 0.0)  # (B, T)
    last = mask.sum(dim=1, keepdim=True) - 1  # (B, 1): right padding, so the last valid index
    return rewards.scatter_add(1, last, scores[:, None].to(rewards.dtype))


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (B, T), by generalized advantage estimation, 0 at padding.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, walked backwards;
    past a row's last valid token V and A are 0 (the episode ends there). returns = A + V, the value
    target. rewards, values (B, T) float, mask (B, T) bool, right-padded.
    """
    values = values.masked_fill(~mask, 0.0)  # (B, T): the episode is over past the end
    rewards = rewards.masked_fill(~mask, 0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # (B, T): V_{t+1}
    deltas = rewards + gamma * next_values - values  # (B, T), 0 at padding
    running = torch.zeros_like(values[:, 0])  # (B,): A_{t+1}
    steps = []
    for t in reversed(range(values.size(1))):
        running = deltas[:, t] + gamma * lam * running
        steps.append(running)
    advantages = torch.stack(steps[::-1], dim=1)  # (B, T)
    return advantages, advantages + values


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Per token (B, T): max(-A * ratio, -A * clamp(ratio, low, high)), PPO's pessimistic bound (symmetric
    clip: low = 1 - clip, high = 1 + clip; DAPO widens `high`). advantages (B, T) or (B, 1)."""
    return torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, low, high))


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(clipped surrogate loss, metrics): masked mean of max(-A * ratio, -A * clamp(ratio, 1 - clip,
    1 + clip)) with ratio = exp(logps - old_logps).

    logps (B, T) carry the gradient; old_logps (B, T) are the rollout's; advantages (B, T), or (B, 1)
    for GRPO's one advantage per sequence. Metrics: clipfrac (share of valid tokens where the clipped
    term is the larger), approx_kl (masked mean of 0.5 * (logps - old_logps)^2), ratio (masked mean).
    """
    log_ratio = logps - old_logps  # (B, T)
    ratio = torch.exp(log_ratio)
    per_token = clipped_surrogate(ratio, advantages, 1.0 - clip, 1.0 + clip)  # (B, T)
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((per_token > -advantages * ratio).float(), mask).item(),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask).item(),
            "ratio": masked_mean(ratio, mask).item(),
        }
    return loss, metrics


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(clipped value loss, metrics): 0.5 * masked mean of max((V - R)^2, (V_clipped - R)^2), with
    V_clipped = old_values + clamp(values - old_values, -clip, clip), as in OpenAI baselines' ppo2 and TRL.

    All (B, T). Taking the max means a value moved further than clip from the rollout's gets no
    gradient toward moving further. Metrics: vf_clipfrac (share of valid tokens where the clipped error is
    the larger).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)  # (B, T)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        metrics = {"vf_clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask).item()}
    return loss, metrics


@dataclass
class AdaptiveKLController:
    """The KL coefficient, moved toward a target KL (Ziegler et al. 2019, Sec. 2.2).

    update: e = clip(current_kl / target - 1, -0.2, 0.2); value *= 1 + e * n_steps / horizon.
    """

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> float:
        """current_kl: the mean per-sequence KL of the last batch; n_steps: sequences in it."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (N,): (r - mean of its group) / (std of its group + eps), float32.

    rewards (N,) hold N / group_size groups of consecutive completions of one prompt each. The std is
    unbiased (n - 1), as in TRL's GRPOTrainer; a group whose rewards are all equal gets advantage 0.
    """
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(
            f"group_size: expected at least 2 and a divisor of the {rewards.numel()} rewards, got {group_size}"
        )
    groups = rewards.float().view(-1, group_size)  # (N / G, G)
    mean = groups.mean(dim=1, keepdim=True)  # (N / G, 1)
    std = groups.std(dim=1, keepdim=True)  # (N / G, 1), unbiased
    return ((groups - mean) / (std + eps)).view(-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of exp(ref - logp) - (ref - logp) - 1: an unbiased, never negative per-token estimate
    of KL(policy || reference) on samples from the policy (Schulman 2020, http://joschu.net/blog/kl-approx.html),
    the penalty GRPO adds to its loss. logps carry the gradient; all (B, T)."""
    d = ref_logps - logps
    return masked_mean(torch.exp(d) - d - 1.0, mask)

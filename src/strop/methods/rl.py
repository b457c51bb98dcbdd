"""Objectives over rollout batches (training/rollout.py samples them, training/rl_loop.py drives them):
the `RolloutObjective` protocol and PPO; the group-relative losses (GRPO, DAPO, Dr. GRPO, GSPO, CISPO,
RLOO) are in rl_losses.py.

A rollout batch holds right-padded prompt + reply rows (`input_ids`, `attention_mask`, `labels` with
IGNORE outside the replies) and, laid out (B, T) over reply tokens with `response_mask`: the rollout's
own log-probs (`old_logps`), the reference's (`ref_logps`), PPO's value estimates (`old_values`), and
what the objective's `prepare` adds (advantages, returns, the replies kept). Log-probs are of the
logits divided by the sampling temperature, so they are those of the distribution the replies were
drawn from. PPO: Schulman et al. 2017 (https://arxiv.org/abs/1707.06347) with a value head sharing the
policy's body (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593).
"""

from __future__ import annotations

import torch
from torch import nn

from strop.core import distributed
from strop.methods.logprobs import label_logps
from strop.methods.objective import Loss
from strop.methods.ppo_losses import gae, kl_penalty_rewards, ppo_policy_loss, ppo_value_loss, whiten


class ValueHead(nn.Module):
    """V(state) from the policy's last hidden state (detached in `response_logps`: only the head learns
    from the value loss); starts at 0 everywhere (zero weights)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)  # (...,)


def response_logps(
    model: nn.Module, batch: dict, temperature: float = 1.0, value_head: ValueHead | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs, values) of each reply token, (B, T) laid out as `response_mask`; values None
    without a value head. The value at a token is that of the state the token was sampled from."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    token, hidden = label_logps(model, inputs, batch["labels"], temperature, value_head is not None)
    mask = batch["response_mask"]  # (B, T_reply): each row's first n positions, n = its reply length
    logps = torch.zeros(mask.shape, device=token.device, dtype=torch.float32).masked_scatter(mask, token)
    values = None
    if value_head is not None:
        assert hidden is not None  # label_logps gives the hidden states when asked
        # detached: the critic's early, large errors must not move the policy they share a body with
        values = torch.zeros_like(logps).masked_scatter(mask, value_head(hidden.detach()).float())
    return logps, values


class RolloutObjective:
    """An objective over rollout batches. `needs`: "rollouts" (the run skeleton trains it with the
    rollout loop, not `fit`), "reference" when it compares the policy with the starting model (a KL
    term or penalty; without it the reference pass is skipped), "value_head" when it trains a critic,
    which it then holds as `value_head` (PPO). Per rollout the loop adds the old and reference
    log-probs (and values) to the batch and then `prepare`'s tensors; `loss` on a micro-batch of it
    gives the loss summed over the objective's units (reply tokens or replies), their count and sums
    of its statistics, so the optimizer step (training/step.py) averages over a whole mini-batch.
    `kl_coef` is the loop's: an adaptive KL moves it between rollouts."""

    name = ""
    needs: frozenset[str] = frozenset({"rollouts", "reference"})
    value_head: ValueHead | None = None
    temperature: float = 1.0
    kl_coef: float = 0.0

    def prepare(
        self, batch: dict, scores: torch.Tensor, kl_seq: torch.Tensor, lengths: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """What `loss` reads besides the rollout: from the rewards (B,), the sampled KL of each reply to
        the reference (B,) and the reply lengths (B,) of this process's rows."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict) -> Loss:
        raise NotImplementedError


class PPO(RolloutObjective):
    """Clipped surrogate + vf_coef x clipped value loss, a mean over reply tokens (methods/ppo_losses.py),
    on per-token advantages: GAE of the KL-penalised rewards, whitened over the whole rollout."""

    name = "ppo"
    needs = frozenset({"rollouts", "reference", "value_head"})

    def __init__(
        self,
        value_head: ValueHead,
        temperature: float,
        clip: float,
        value_clip: float,
        vf_coef: float,
        kl_coef: float,
        gamma: float,
        lam: float,
        reference: bool = True,
    ):
        self.value_head, self.temperature, self.clip, self.kl_coef = value_head, temperature, clip, kl_coef
        self.value_clip, self.vf_coef, self.gamma, self.lam = value_clip, vf_coef, gamma, lam
        if not reference:  # no KL penalty to keep, none to adapt: no reference pass
            self.needs = self.needs - {"reference"}

    def prepare(self, batch, scores, kl_seq, lengths):
        mask = batch["response_mask"]
        rewards = kl_penalty_rewards(scores, batch["old_logps"], batch["ref_logps"], mask, self.kl_coef)
        advantages, returns = gae(rewards, batch["old_values"], mask, self.gamma, self.lam)
        return {"advantages": whiten_rollout(advantages, mask), "returns": returns}

    def loss(self, model, batch) -> Loss:
        logps, values = response_logps(model, batch, self.temperature, self.value_head)
        assert values is not None  # there is a value head
        mask = batch["response_mask"]
        pg, metrics = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, self.clip)
        vf, vf_metrics = ppo_value_loss(values, batch["old_values"], batch["returns"], mask, self.value_clip)
        n = int(mask.sum())  # masked means over the micro-batch's reply tokens, as sums
        stats = {"pg_loss": pg.item(), "vf_loss": vf.item(), **metrics, **vf_metrics}
        return Loss((pg + self.vf_coef * vf) * n, n, {k: v * n for k, v in stats.items()})


def whiten_rollout(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ppo_losses.whiten over the valid positions of every process's rows (the whole rollout); x unchanged
    with fewer than two."""
    if not distributed.WORLD.active:
        return whiten(x, mask) if mask.sum() > 1 else x
    device = x.device
    n, total = distributed.sum_floats([float(mask.sum()), float(x[mask].double().sum())], device)
    if n <= 1:
        return x
    mean = total / n
    sq = distributed.sum_floats([float(((x[mask].double() - mean) ** 2).sum())], device)[0]
    var = sq / (n - 1)
    return ((x - mean) * (var + 1e-8) ** -0.5).masked_fill(~mask, 0.0)

"""PPO and GRPO as objectives over a rollout batch (training/rollout.py samples it).

A rollout batch holds right-padded prompt + reply rows (`input_ids`, `attention_mask`, `labels` with
IGNORE outside the replies) and, laid out (B, T) over reply tokens with `response_mask`: the rollout's
own log-probs (`old_logps`), the reference's (`ref_logps`), and per method `advantages` + `returns` +
`old_values` (PPO) or one `advantages` value per reply (GRPO). Log-probs are of the logits divided by
the sampling temperature, so they are those of the distribution the replies were drawn from.
PPO: Schulman et al. 2017 (https://arxiv.org/abs/1707.06347) with a value head sharing the policy's
body (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593); GRPO: Shao et al. 2024
(https://arxiv.org/abs/2402.03300).
"""

from __future__ import annotations

import torch
from torch import nn

from strop.methods.logprobs import label_logps
from strop.methods.objective import Loss
from strop.methods.ppo_losses import k3_kl, ppo_policy_loss, ppo_value_loss


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
    """A loss over rollout batches (training/rollout.py) whose unit is the reply token: `loss` gives the
    sum over the micro-batch's reply tokens of `token_mean`'s loss, their count and sums of its
    statistics, so the optimizer step (training/step.py) makes it the masked mean over a whole
    mini-batch however it is split. Subclasses set `token_mean`; `kl_coef` is the rollout loop's (an
    adaptive KL moves it between steps)."""

    def __init__(self, temperature: float, clip: float, kl_coef: float):
        self.temperature, self.clip, self.kl_coef = temperature, clip, kl_coef

    def token_mean(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """(the loss's masked mean over the batch's reply tokens, masked means of the statistics)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict) -> Loss:
        mean, metrics = self.token_mean(model, batch)
        n = int(batch["response_mask"].sum())
        return Loss(mean * n, n, {k: v * n for k, v in metrics.items()})


class PPO(RolloutObjective):
    """Clipped surrogate + vf_coef x clipped value loss, over per-token advantages and returns (GAE of
    the KL-penalised rewards: the rollout loop's preparation) and the rollout's values."""

    def __init__(
        self, value_head: ValueHead, temperature: float, clip: float, value_clip: float, vf_coef: float
    ):
        super().__init__(temperature, clip, 0.0)
        self.value_head, self.value_clip, self.vf_coef = value_head, value_clip, vf_coef

    def token_mean(self, model, batch):
        logps, values = response_logps(model, batch, self.temperature, self.value_head)
        assert values is not None  # there is a value head
        mask = batch["response_mask"]
        pg, metrics = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, self.clip)
        vf, vf_metrics = ppo_value_loss(values, batch["old_values"], batch["returns"], mask, self.value_clip)
        return pg + self.vf_coef * vf, {"pg_loss": pg.item(), "vf_loss": vf.item(), **metrics, **vf_metrics}


class GRPO(RolloutObjective):
    """Clipped surrogate with one group-relative advantage per reply, + kl_coef x k3 KL to the reference.

    Averaged over all reply tokens of the batch (DAPO's token-level mean, Yu et al. 2025,
    https://arxiv.org/abs/2503.14476), not per reply first as DeepSeekMath wrote it: long replies are
    not down-weighted per token."""

    def token_mean(self, model, batch):
        logps, _ = response_logps(model, batch, self.temperature)
        mask = batch["response_mask"]
        pg, metrics = ppo_policy_loss(
            logps, batch["old_logps"], batch["advantages"][:, None], mask, self.clip
        )
        kl = k3_kl(logps, batch["ref_logps"], mask)
        return pg + self.kl_coef * kl, {"pg_loss": pg.item(), "kl_loss": kl.item(), **metrics}

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
from torch.utils.checkpoint import checkpoint

from strop.data.batches import IGNORE
from strop.methods.lm_loss import hidden_and_head
from strop.methods.ppo_losses import k3_kl, ppo_policy_loss, ppo_value_loss

CHUNK = 512  # reply positions whose (chunk, V) logits exist at once


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
    labels = batch["labels"]
    keep = labels[:, 1:] != IGNORE  # (B, T-1): positions that predict a reply token
    targets = labels[:, 1:][keep]  # (N,)
    parts = hidden_and_head(model)
    if parts is None:
        out = model(**inputs, output_hidden_states=value_head is not None)
        logits = out.logits[:, :-1][keep].float() / temperature  # (N, V)
        token = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
        hidden = out.hidden_states[-1][:, :-1][keep] if value_head is not None else None
    else:
        backbone, head = parts
        hidden = backbone(**inputs, use_cache=False).last_hidden_state[:, :-1][keep]  # (N, d)
        pieces = [
            checkpoint(
                _picked_logps,
                hidden[i : i + CHUNK],
                head.weight,
                targets[i : i + CHUNK],
                temperature,
                use_reentrant=False,
            )
            for i in range(0, hidden.size(0), CHUNK)
        ]
        token = torch.cat(pieces) if pieces else hidden.new_zeros(0)
    mask = batch["response_mask"]  # (B, T_reply): each row's first n positions, n = its reply length
    logps = torch.zeros(mask.shape, device=token.device, dtype=torch.float32).masked_scatter(
        mask, token.float()
    )
    values = None
    if value_head is not None:
        assert hidden is not None  # computed above whenever there is a value head
        # detached: the critic's early, large errors must not move the policy they share a body with
        values = torch.zeros_like(logps).masked_scatter(mask, value_head(hidden.detach()).float())
    return logps, values


def _picked_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float):
    logits = (hidden @ weight.T).float() / temperature  # (chunk, V)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)


def ppo_loss(
    model: nn.Module,
    value_head: ValueHead,
    batch: dict,
    temperature: float,
    clip: float,
    value_clip: float,
    vf_coef: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate + vf_coef x clipped value loss, masked means over the batch's reply tokens."""
    logps, values = response_logps(model, batch, temperature, value_head)
    assert values is not None  # there is a value head
    mask = batch["response_mask"]
    pg, metrics = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, clip)
    vf, vf_metrics = ppo_value_loss(values, batch["old_values"], batch["returns"], mask, value_clip)
    return pg + vf_coef * vf, {"pg_loss": pg.item(), "vf_loss": vf.item(), **metrics, **vf_metrics}


def grpo_loss(
    model: nn.Module, batch: dict, temperature: float, clip: float, kl_coef: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate with one group-relative advantage per reply, + kl_coef x k3 KL to the reference.

    Averaged over all reply tokens of the batch (DAPO's token-level mean, Yu et al. 2025,
    https://arxiv.org/abs/2503.14476), not per reply first as DeepSeekMath wrote it: long replies are
    not down-weighted per token."""
    logps, _ = response_logps(model, batch, temperature)
    mask = batch["response_mask"]
    pg, metrics = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"][:, None], mask, clip)
    kl = k3_kl(logps, batch["ref_logps"], mask)
    return pg + kl_coef * kl, {"pg_loss": pg.item(), "kl_loss": kl.item(), **metrics}

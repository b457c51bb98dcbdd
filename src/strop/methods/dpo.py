"""Direct preference optimisation as an objective: the policy's log-probs of the chosen and rejected
replies against the reference's (computed once before training and carried in the batch), through
`preference.dpo_loss` (sigmoid DPO, cDPO label smoothing or IPO). Rafailov et al. 2023,
https://arxiv.org/abs/2305.18290. `loss_type="simpo"` uses `preference.simpo_loss` instead: mean
log-probs per reply token and no reference.

Batches hold the chosen rows then the rejected rows (data/batches.py), so one forward pass scores both.
Log-probs come from the label positions only, with the LM head applied in chunks that are recomputed in
backward, so (tokens x vocabulary) logits are never held for the whole batch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from strop.data.batches import IGNORE
from strop.methods.lm_loss import hidden_and_head
from strop.methods.preference import dpo_loss, sequence_logps, simpo_loss

CHUNK = 512  # label positions whose (chunk, V) logits exist at once


def reply_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of log-probs of each row's label tokens, float32 (B,)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["labels"]
    keep = labels[:, 1:] != IGNORE  # (B, T-1)
    parts = hidden_and_head(model)
    if parts is None:
        logits = model(**inputs).logits  # (B, T, V)
        return sequence_logps(logits, labels, labels != IGNORE)
    backbone, head = parts
    hidden = backbone(**inputs, use_cache=False).last_hidden_state[:, :-1][keep]  # (N, d)
    targets = labels[:, 1:][keep]  # (N,)
    pieces = [
        checkpoint(
            _picked_logps, hidden[i : i + CHUNK], head.weight, targets[i : i + CHUNK], use_reentrant=False
        )
        for i in range(0, hidden.size(0), CHUNK)
    ]
    token = torch.cat(pieces) if pieces else hidden.new_zeros(0)  # (N,)
    rows = keep.nonzero()[:, 0]  # (N,) the row of each label position
    return torch.zeros(labels.size(0), device=token.device).index_add(0, rows, token.float())


def _picked_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.T).float()  # (chunk, V)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)


def reply_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Label tokens per row, float (B,), at least 1: the denominators of per-token log-probs."""
    return (batch["labels"][:, 1:] != IGNORE).sum(-1).clamp(min=1).float()


def split_pairs(values: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    n = int(batch["pairs"])
    return values[:n], values[n:]


def loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, int, dict[str, float]]:
    """(sum over pairs of the DPO loss, pairs, sums over pairs of the step metrics): the implicit
    reward accuracy and margin, the rewards and the policy's log-probs of chosen and rejected replies
    (both falling together is DPO's known failure mode)."""
    chosen, rejected = split_pairs(reply_logps(model, batch), batch)
    c_len, r_len = split_pairs(reply_lengths(batch), batch)
    ref = batch.get("reference")
    mean, m = pair_loss(chosen, rejected, c_len, r_len, ref, beta, loss_type, label_smoothing, simpo_gamma)
    k = len(chosen)
    return mean * k, k, {name: m[key] * k for name, key in STEP_METRICS.items()}


def pair_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    chosen_len: torch.Tensor,
    rejected_len: torch.Tensor,
    reference: torch.Tensor | None,
    beta: float,
    loss_type: str,
    label_smoothing: float,
    simpo_gamma: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of `loss_type` from summed reply log-probs (B,), reply lengths (B,) and the reference's
    (B, 2) log-probs (unused by simpo); metrics as `preference.dpo_loss`."""
    if loss_type == "simpo":
        mean, m = simpo_loss(chosen / chosen_len, rejected / rejected_len, beta, simpo_gamma, label_smoothing)
        m |= {
            "logps/chosen": chosen.detach().mean().item(),
            "logps/rejected": rejected.detach().mean().item(),
        }
        return mean, m
    ref = reference.to(chosen.device)
    return dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta, loss_type, label_smoothing)


STEP_METRICS = {  # logged name -> dpo_loss metric (a mean over the pairs)
    "reward_accuracy": "rewards/accuracy",
    "reward_margin": "rewards/margin",
    "reward_chosen": "rewards/chosen",
    "reward_rejected": "rewards/rejected",
    "logps_chosen": "logps/chosen",
    "logps_rejected": "logps/rejected",
}


@torch.no_grad()
def pair_logps(model: torch.nn.Module, batches) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probs of each pair's chosen and rejected reply under `model` (eval mode), and the
    replies' label-token counts: two (pairs, 2) float arrays, in batch order."""
    was_training = model.training
    model.eval()
    logps, lengths = [], []
    for batch in batches:
        chosen, rejected = split_pairs(reply_logps(model, batch), batch)
        c_len, r_len = split_pairs(reply_lengths(batch), batch)
        logps.append(torch.stack([chosen, rejected], 1).cpu().double().numpy())
        lengths.append(torch.stack([c_len, r_len], 1).cpu().double().numpy())
    model.train(was_training)
    if not logps:
        return np.zeros((0, 2)), np.ones((0, 2))
    return np.concatenate(logps), np.concatenate(lengths)


def summarise(
    policy: np.ndarray,
    reference: np.ndarray,
    lengths: np.ndarray,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> dict[str, float]:
    """Held-out metrics from (pairs, 2) arrays of chosen/rejected log-probs (policy, reference) and reply
    lengths: mean DPO loss; reward accuracy and margin (implicit rewards vs the reference); preference
    accuracy: the share of pairs whose chosen reply the policy itself finds more probable, by summed
    log-prob (which favours the shorter reply) and per token (mean log-prob of the reply's tokens);
    the mean log-probs of the chosen and rejected replies."""
    if len(policy) == 0:
        return {}
    pol, ref, n = torch.from_numpy(policy), torch.from_numpy(reference), torch.from_numpy(lengths)
    mean, m = pair_loss(
        pol[:, 0], pol[:, 1], n[:, 0], n[:, 1], ref, beta, loss_type, label_smoothing, simpo_gamma
    )
    per_token = policy / lengths
    return {
        "val_loss": float(mean),
        "val_reward_accuracy": m["rewards/accuracy"],
        "val_reward_margin": m["rewards/margin"],
        "val_preference_accuracy": float(np.mean(policy[:, 0] > policy[:, 1])),
        "val_preference_accuracy_per_token": float(np.mean(per_token[:, 0] > per_token[:, 1])),
        "val_logps_chosen": float(policy[:, 0].mean()),
        "val_logps_rejected": float(policy[:, 1].mean()),
    }


def evaluate(
    model: torch.nn.Module,
    batches,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> dict[str, float]:
    """`summarise` of the policy on `batches`, which carry the reference log-probs (but for simpo)."""
    policy, lengths = pair_logps(model, batches)
    if batches and all("reference" in b for b in batches):
        reference = np.concatenate([b["reference"].cpu().double().numpy() for b in batches])
    else:  # simpo trains without one, and its metrics do not read it
        reference = policy
    return summarise(policy, reference, lengths, beta, loss_type, label_smoothing, simpo_gamma)

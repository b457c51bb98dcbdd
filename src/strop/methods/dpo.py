"""Pairwise preference objectives: `PairObjective` scores the chosen and the rejected reply of each pair
with the policy in one forward pass and hands the summed log-probs and reply lengths to its subclass's
`pair_loss`. DPO (sigmoid, with cDPO label smoothing) and IPO live here, against the reference's
log-probs (computed once before training and carried in the batch; Rafailov et al. 2023,
https://arxiv.org/abs/2305.18290); reference-free variants have their own files (simpo.py, orpo.py),
and config picks one by name (pair_losses.py).

Batches hold the chosen rows then the rejected rows (data/batches.py), so one forward pass scores both.
Log-probs come from the label positions only (methods/logprobs.py: the LM head in chunks recomputed in
backward, so (tokens x vocabulary) logits are never held for the whole batch).
"""

from __future__ import annotations

import numpy as np
import torch

from strop.data.batches import IGNORE, collate_pairs
from strop.data.packing import MODEL_KEYS, collate_packed_pairs, pair_lengths
from strop.methods.logprobs import label_logps
from strop.methods.objective import Loss
from strop.methods.preference import dpo_loss


def reply_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of log-probs of each sequence's label tokens, float32: (B,) for padded rows, (2 x pairs,)
    for packed pairs, whose `sequence_ids` say which sequence each token belongs to."""
    keep = batch["labels"][:, 1:] != IGNORE  # (B, T-1)
    owner, inputs, n = _sequences(batch, keep)
    token, _ = label_logps(model, inputs, batch["labels"])  # (N,)
    return torch.zeros(n, device=token.device).index_add(0, owner, token)


def _sequences(batch: dict, keep: torch.Tensor) -> tuple[torch.Tensor, dict, int]:
    """(the sequence of each label position (N,), the model's inputs, how many sequences)."""
    if "sequence_ids" in batch:  # packed pairs (data/packing.collate_packed_pairs)
        inputs = {k: batch[k] for k in MODEL_KEYS}
        return batch["sequence_ids"][:, 1:][keep], inputs, 2 * int(batch["pairs"])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    return keep.nonzero()[:, 0], inputs, keep.size(0)


def reply_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Label tokens per sequence, float, at least 1: the denominators of per-token log-probs."""
    keep = batch["labels"][:, 1:] != IGNORE
    owner, _, n = _sequences(batch, keep)
    return (
        torch.zeros(n, device=keep.device)
        .index_add(0, owner, torch.ones(len(owner), device=keep.device))
        .clamp(min=1)
    )


def split_pairs(values: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    n = int(batch["pairs"])
    return values[:n], values[n:]


STEP_METRICS = {  # logged name -> pair_loss metric (a mean over the pairs), where the loss gives it
    "reward_accuracy": "rewards/accuracy",
    "reward_margin": "rewards/margin",
    "reward_chosen": "rewards/chosen",
    "reward_rejected": "rewards/rejected",
    "logps_chosen": "logps/chosen",
    "logps_rejected": "logps/rejected",
    "nll_loss": "nll_loss",
    "log_odds_ratio": "log_odds_ratio",
}


class PairObjective:
    """A loss on preference pairs. Subclasses set `name`, `needs` ({"reference"} when they compare with
    the starting model) and `pair_loss`; the count is the pairs, and the step metrics are those of
    STEP_METRICS that the loss reports. Batches: chosen rows then rejected rows (collate_pairs)."""

    name = ""
    needs: frozenset[str] = frozenset({"reference"})
    packs = True  # both sides of a pair are segments of one packed row (train.batch_tokens)

    def pair_loss(
        self,
        chosen: torch.Tensor,
        rejected: torch.Tensor,
        chosen_len: torch.Tensor,
        rejected_len: torch.Tensor,
        reference: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(mean loss over the B pairs, metrics) from summed reply log-probs (B,), reply lengths (B,) and
        the reference's (B, 2) log-probs (None for reference-free losses)."""
        raise NotImplementedError

    def collate(self, ts, index, pad_id: int) -> dict:
        return collate_pairs(ts, index, pad_id)

    def lengths(self, ts) -> list[int]:
        return pair_lengths(ts)

    def collate_packed(self, ts, rows: list[list[int]], pad_id: int) -> dict:
        return collate_packed_pairs(ts, rows, pad_id)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Loss:
        """(sum over pairs of the loss, pairs, sums over pairs of the step metrics): the implicit reward
        accuracy and margin, the rewards and the policy's log-probs of chosen and rejected replies (both
        falling together is DPO's known failure mode)."""
        chosen, rejected = split_pairs(reply_logps(model, batch), batch)
        c_len, r_len = split_pairs(reply_lengths(batch), batch)
        mean, m = self.pair_loss(chosen, rejected, c_len, r_len, batch.get("reference"))
        k = len(chosen)
        return Loss(mean * k, k, {name: m[key] * k for name, key in STEP_METRICS.items() if key in m})

    def summarise(self, policy: np.ndarray, reference: np.ndarray, lengths: np.ndarray) -> dict[str, float]:
        """Held-out metrics from (pairs, 2) arrays of chosen/rejected log-probs (policy, reference) and
        reply lengths: mean loss; reward accuracy and margin; preference accuracy: the share of pairs
        whose chosen reply the policy itself finds more probable, by summed log-prob (which favours the
        shorter reply) and per token (mean log-prob of the reply's tokens); the mean log-probs."""
        if len(policy) == 0:
            return {}
        pol, ref, n = torch.from_numpy(policy), torch.from_numpy(reference), torch.from_numpy(lengths)
        mean, m = self.pair_loss(pol[:, 0], pol[:, 1], n[:, 0], n[:, 1], ref)
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

    def evaluate(self, model: torch.nn.Module, batches) -> dict[str, float]:
        """`summarise` of the policy on `batches`, which carry the reference log-probs (reference-free
        losses do not read them)."""
        policy, lengths = pair_logps(model, batches)
        if batches and all("reference" in b for b in batches):
            reference = np.concatenate([b["reference"].cpu().double().numpy() for b in batches])
        else:
            reference = policy
        return self.summarise(policy, reference, lengths)


class DPO(PairObjective):
    """Sigmoid DPO; `label_smoothing` > 0 is cDPO (`preference.dpo_loss`)."""

    name = "sigmoid"

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0):
        self.beta, self.label_smoothing = beta, label_smoothing

    def pair_loss(self, chosen, rejected, chosen_len, rejected_len, reference):
        ref = reference.to(chosen.device)
        return dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], self.beta, self.name, self.label_smoothing)


class IPO(DPO):
    """IPO (Azar et al. 2023) on summed log-probs; beta is the paper's tau."""

    name = "ipo"

    def __init__(self, beta: float = 0.1):
        super().__init__(beta, 0.0)


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

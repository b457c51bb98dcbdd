"""KTO: Kahneman-Tversky optimisation from unpaired feedback (Ethayarajh et al. 2024,
https://arxiv.org/abs/2402.01306, Eq. 7; TRL's KTOTrainer, loss_type="kto").

With r = log pi(y|x) - log pi_ref(y|x) (summed over the completion) and z the reference point, the
batch's estimate of KL(pi || pi_ref) from mismatched rows (row i's prompt with another row's
completion), clamped at 0 and not back-propagated:

    good completion: w_good * (1 - sigmoid(beta * (r - z)))
    bad completion:  w_bad  * (1 - sigmoid(beta * (z - r)))

The count is the rows. z is estimated per micro-batch, as TRL estimates it per device batch, so unlike
the other objectives KTO's step depends a little on how it is split into micro-batches.
Batches: the rows, then their KL rows (data/feedback.py), with `reference` (rows, 2) log-probs and
`desirable` (rows,).
"""

from __future__ import annotations

import numpy as np
import torch

from strop.data.batches import collate_pairs
from strop.methods.dpo import pair_logps, reply_logps
from strop.methods.objective import Loss, RowObjective


def kto_loss(
    policy: torch.Tensor,
    policy_kl: torch.Tensor,
    reference: torch.Tensor,
    reference_kl: torch.Tensor,
    desirable: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(per-row losses (B,), metrics) from summed completion log-probs of the rows and of their KL rows
    under the policy and the reference, each (B,), and `desirable` (B,) bool.
    Metrics: kl (the reference point z), rewards/{chosen,rejected} (mean beta * r over good and bad
    rows), rewards/accuracy (share of rows whose reward has the label's sign)."""
    z = (policy_kl - reference_kl).mean().detach().clamp(min=0)
    r = policy.float() - reference.float()  # (B,)
    good = torch.as_tensor(desirable, dtype=torch.bool, device=r.device)
    losses = torch.where(
        good,
        desirable_weight * (1 - torch.sigmoid(beta * (r - z))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z - r))),
    )
    rewards = beta * r.detach()
    metrics = {
        "kl": float(z),
        "rewards/chosen": float(rewards[good].mean()) if good.any() else float("nan"),
        "rewards/rejected": float(rewards[~good].mean()) if (~good).any() else float("nan"),
        "rewards/accuracy": float(((rewards > 0) == good).float().mean()),
    }
    return losses, metrics


class KTO(RowObjective):
    name = "kto"
    needs = frozenset({"reference"})
    packs = False

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
        self.beta, self.weights = beta, (desirable_weight, undesirable_weight)

    def collate(self, ts, index, pad_id: int) -> dict:
        out = collate_pairs(ts, index, pad_id)  # the rows, then their KL rows
        out["desirable"] = torch.tensor([bool(ts.targets[i]) for i in index])
        return out

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Loss:
        n = int(batch["pairs"])
        rows = {k: batch[k][:n] for k in ("input_ids", "attention_mask", "labels")}
        kl_rows = {k: batch[k][n:] for k in ("input_ids", "attention_mask", "labels")}
        policy = reply_logps(model, rows)
        with torch.no_grad():
            policy_kl = reply_logps(model, kl_rows)
        ref = batch["reference"].to(policy.device)
        losses, m = kto_loss(
            policy, policy_kl, ref[:, 0], ref[:, 1], batch["desirable"], self.beta, *self.weights
        )
        good = batch["desirable"].to(policy.device)
        stats = {
            "kl": m["kl"] * n,
            "reward_accuracy": m["rewards/accuracy"] * n,
            "reward_signed": float(
                torch.where(good, 1.0, -1.0).mul(self.beta * (policy - ref[:, 0]).detach()).sum()
            ),
        }
        return Loss(losses.sum(), n, stats)

    def summarise(self, policy: np.ndarray, reference: np.ndarray, desirable: np.ndarray) -> dict[str, float]:
        """Held-out metrics from (rows, 2) log-probs of the rows and their KL rows (policy, reference)
        and the labels: the loss with z from the whole set, reward accuracy, the mean log-ratio of good
        and of bad completions, and AUC: the chance that a random good completion's log-ratio beats a
        random bad one's (ties count half; 0.5 at the start, where every log-ratio is 0)."""
        if len(policy) == 0:
            return {}
        pol, ref = torch.from_numpy(policy), torch.from_numpy(reference)
        good = torch.from_numpy(desirable.astype(bool))
        losses, m = kto_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], good, self.beta, *self.weights)
        r = policy[:, 0] - reference[:, 0]
        return {
            "val_loss": float(losses.mean()),
            "val_reward_accuracy": m["rewards/accuracy"],
            "val_kl": m["kl"],
            "val_logratio_good": float(r[desirable].mean()) if desirable.any() else float("nan"),
            "val_logratio_bad": float(r[~desirable].mean()) if (~desirable).any() else float("nan"),
            "val_auc": auc(r[desirable], r[~desirable]),
        }

    def evaluate(self, model: torch.nn.Module, batches) -> dict[str, float]:
        policy, _ = pair_logps(model, batches)
        reference = np.concatenate([b["reference"].cpu().double().numpy() for b in batches])
        desirable = np.concatenate([b["desirable"].cpu().numpy() for b in batches]).astype(bool)
        return self.summarise(policy, reference, desirable)


def auc(good: np.ndarray, bad: np.ndarray) -> float:
    """P(a good score > a bad score) + P(tie) / 2 (the Mann-Whitney U statistic over all pairs)."""
    if len(good) == 0 or len(bad) == 0:
        return float("nan")
    diff = good[:, None] - bad[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())

"""Reward model as an objective: a scalar head scores the chosen and the rejected conversation, and the
Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) teaches it to rank them (Ouyang et al. 2022,
https://arxiv.org/abs/2203.02155; `preference.bradley_terry_loss`). The model is a SequenceClassifier
with one output; batches hold the chosen rows then the rejected rows.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from strop.data.batches import collate_pairs
from strop.data.pairs import fit_conversation
from strop.data.template import ChatTemplate
from strop.methods.objective import Loss, RowObjective
from strop.methods.preference import bradley_terry_loss
from strop.models.classifier import load_classifier
from strop.models.load import load_tokenizer, read_run_model

log = logging.getLogger("strop")


def rewards(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    r = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[:, 0].float()  # (2n,)
    n = int(batch["pairs"])
    return r[:n], r[n:]


def loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, int, dict[str, float]]:
    """(sum over pairs of the Bradley-Terry loss, pairs, sums over pairs of accuracy and margin); pairs
    with a `margin` field must be scored apart by at least about that much (Llama 2's margin loss)."""
    chosen, rejected = rewards(model, batch)
    mean, _ = bradley_terry_loss(chosen, rejected, _margins(batch, chosen))
    diff = (chosen - rejected).detach()
    stats = {"accuracy": float((diff > 0).sum()), "margin": float(diff.sum())}
    return mean * len(chosen), len(chosen), stats


class PairwiseReward(RowObjective):
    """Bradley-Terry on (chosen, rejected) pairs, with their margins when given; the count is the pairs.
    Batches are the chosen rows then the rejected rows (data/batches.collate_pairs)."""

    def loss(self, model, batch) -> Loss:
        return Loss(*loss(model, batch))

    def evaluate(self, model, batches) -> dict[str, float]:
        return evaluate(model, batches)

    def collate(self, ts, index, pad_id: int) -> dict:
        return collate_pairs(ts, index, pad_id)


class RatingReward(RowObjective):
    """Regression of the scalar head on each reply's rating; the count is the rated replies."""

    def loss(self, model, batch) -> Loss:
        return Loss(*rating_loss(model, batch))

    def evaluate(self, model, batches) -> dict[str, float]:
        return evaluate_ratings(model, batches)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches) -> dict[str, float]:
    """Mean loss, accuracy (chosen scored higher) and mean margin r_chosen - r_rejected."""
    was_training = model.training
    model.eval()
    total = correct = margin = 0.0
    n = 0
    for batch in batches:
        chosen, rejected = rewards(model, batch)
        mean, _ = bradley_terry_loss(chosen, rejected, _margins(batch, chosen))
        total += float(mean) * len(chosen)
        correct += float((chosen > rejected).sum())
        margin += float((chosen - rejected).sum())
        n += len(chosen)
    model.train(was_training)
    return {
        "val_loss": total / max(n, 1),
        "val_accuracy": correct / max(n, 1),
        "val_margin": margin / max(n, 1),
    }


def _margins(batch: dict, like: torch.Tensor) -> torch.Tensor | None:
    m = batch.get("margins")
    return None if m is None else m.to(like.device, like.dtype)


class RewardScorer:
    """A finished strop reward run as a scorer of whole conversations (the reply as the last turn).

    It renders them with the reward run's own template and tokenizer, so the policy being scored may
    use another tokenizer; conversations are batched by length. A conversation longer than the reward
    model was trained on (its data.max_length, else the backbone's position limit) is cut as training
    cut its pairs (`fit_reply`): the prompt's oldest tokens go first, so the reply being scored stays.
    `truncated` counts those.
    """

    def __init__(self, run_dir: Path, device: torch.device, dtype: torch.dtype = torch.float32):
        from strop.core.errors import StropError

        run = read_run_model(Path(run_dir))
        if run is None or run.get("task") != "reward":
            raise StropError(
                f"{run_dir}: not a finished strop reward run (task reward in model/strop_model.json)"
            )
        self.model = load_classifier(Path(run["dir"]), run["base_model"], device, dtype).eval()
        self.template = ChatTemplate(
            load_tokenizer(run["dir"]), run["template"], run.get("system_prompt"), generates=False
        )
        self.device = device
        self.max_length = run.get("max_length") or getattr(self.model.config, "max_position_embeddings", None)
        self.truncated = 0

    @torch.no_grad()
    def __call__(self, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
        encoded = [self.template.encode(c, last_turn_only=True) for c in conversations]
        ids = [e.ids for e in encoded]
        if self.max_length:
            cut = [i for i, x in enumerate(ids) if len(x) > self.max_length]
            if cut and not self.truncated:
                log.warning(
                    "reward model: conversations longer than its %d tokens lose their prompt's oldest tokens",
                    self.max_length,
                )
            self.truncated += len(cut)
            for i in cut:
                ids[i] = fit_conversation(encoded[i], self.max_length)[0]
        pad = self.template.tokenizer.pad_token_id
        out = [0.0] * len(ids)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(ids[i]) for i in chunk)
            x = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(x)
            for b, i in enumerate(chunk):
                x[b, : len(ids[i])], mask[b, : len(ids[i])] = torch.tensor(ids[i]), 1
            scores = self.model(input_ids=x.to(self.device), attention_mask=mask.to(self.device))[:, 0]
            for i, s in zip(chunk, scores.float().tolist(), strict=True):
                out[i] = s
        return out


def rating_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Squared error of the scalar head against each reply's rating, summed (the loop averages)."""
    pred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[:, 0].float()
    return ((pred - batch["ratings"]) ** 2).sum(), len(pred)


@torch.no_grad()
def evaluate_ratings(model: torch.nn.Module, batches) -> dict[str, float]:
    """Mean squared error, Pearson and Spearman correlation with the ratings, and pairwise accuracy: of
    the pairs of replies rated differently, the share the model orders the same way."""
    was_training = model.training
    model.eval()
    preds, ratings = [], []
    for batch in batches:
        preds.append(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[:, 0].float()
        )
        ratings.append(batch["ratings"].float())
    model.train(was_training)
    p, r = torch.cat(preds).cpu(), torch.cat(ratings).cpu()
    out = {"val_loss": float(((p - r) ** 2).mean())}
    if len(p) >= 2:
        out["val_pearson"] = _pearson(p, r)
        out["val_spearman"] = _pearson(_ranks(p), _ranks(r))
        out["val_pair_accuracy"] = _pair_accuracy(p, r)
    return out


def _pair_accuracy(pred: torch.Tensor, rating: torch.Tensor, chunk: int = 1024) -> float:
    """Of the pairs of replies rated differently, the share `pred` orders the same way; (chunk, n)
    differences at a time, so memory stays O(chunk x n) for any number of replies."""
    agree = differ = 0
    for i in range(0, len(pred), chunk):
        dr = rating[i : i + chunk, None] - rating[None, :]  # (chunk, n)
        dp = pred[i : i + chunk, None] - pred[None, :]
        agree += int(((dr * dp) > 0).sum())
        differ += int((dr != 0).sum())
    return agree / differ if differ else float("nan")


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks with ties averaged (as Spearman's rho needs)."""
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    for v in x.unique():
        tied = x == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else float("nan")

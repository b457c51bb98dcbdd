"""Knowledge distillation: learn the teacher's temperature-softened distribution as well as the labels.

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * cross-entropy,
summed over label tokens (causal LMs, response tokens only) or over examples (classifiers), so the loop
averages it like the ordinary loss. T^2 keeps the soft term's gradients on the scale of the hard term's
as T changes. Hinton, Vinyals & Dean 2015, https://arxiv.org/abs/1503.02531; for sequence models the
word-level variant of Kim & Rush 2016, https://arxiv.org/abs/1606.07947.
The teacher runs on the fly, under no_grad, on the same batch; teacher and student share the tokenizer
and the output vocabulary (the recipe checks).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from strop.methods import sft
from strop.methods.lm_loss import hidden_and_head, linear_cross_entropy
from strop.methods.logprobs import head_chunks
from strop.methods.objective import Loss, RowObjective

CHUNK = 256  # label positions whose (chunk, V) logits exist at once, for student and teacher alike


def kd_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Sum over rows of T^2 * KL(p_teacher || p_student) at temperature T; logits (n, V) each."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (n, V)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (n, V)
    return temperature**2 * (t.exp() * (t - s)).sum()


def lm_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    teacher: torch.nn.Module | None,
    temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, int]:
    """(alpha * soft + (1 - alpha) * hard, label tokens) for a causal LM student and teacher; the
    teacher may be None when the batch carries its cached top-k logits."""
    inputs = {k: batch[k] for k in sft.MODEL_INPUTS if k in batch}
    targets = batch["labels"][:, 1:]  # (B, T-1)
    keep = targets != sft.IGNORE
    if "teacher_logits" in batch:
        return _cached_loss(model, inputs, targets, keep, batch, temperature, alpha)
    assert teacher is not None, "no cached teacher logits in the batch and no teacher to run"
    student, teacher_parts = hidden_and_head(model), hidden_and_head(teacher)
    with torch.no_grad():
        if teacher_parts is None:
            t_logits = teacher(**inputs).logits[:, :-1][keep]  # (N, V)
        else:
            t_hidden = teacher_parts[0](**inputs, use_cache=False).last_hidden_state[:, :-1][keep]  # (N, d)
    if student is None:
        s_logits = model(**inputs).logits[:, :-1][keep].float()  # (N, V)
        hard = F.cross_entropy(s_logits, targets[keep], reduction="sum")
        if teacher_parts is not None:
            t_logits = t_hidden @ teacher_parts[1].weight.T
        soft = kd_divergence(s_logits, t_logits, temperature)
        return alpha * soft + (1 - alpha) * hard, int(keep.sum())

    backbone, head = student
    hidden = backbone(**inputs, use_cache=False).last_hidden_state[:, :-1][keep]  # (N, d)
    hard = linear_cross_entropy(hidden, head.weight, targets[keep])
    if teacher_parts is None:
        teacher_rows: torch.Tensor | Callable = t_logits  # (N, V)
    else:
        t_head = teacher_parts[1].weight

        def teacher_rows(s: slice) -> torch.Tensor:  # one chunk's teacher logits, (chunk, V)
            return t_hidden[s] @ t_head.T

    # only one chunk's (chunk, V) student logits are ever held; they are recomputed in backward
    pieces = head_chunks(_soft_chunk, hidden, head.weight, teacher_rows, args=(temperature,), chunk=CHUNK)
    soft = sum(pieces, hidden.new_zeros((), dtype=torch.float32))
    return alpha * soft + (1 - alpha) * hard, int(keep.sum())


def _cached_loss(model, inputs, targets, keep, batch, temperature: float, alpha: float):
    """The soft term against the teacher's cached top-k logits: the teacher's tempered distribution
    renormalized over its k tokens, the student's full tempered log-softmax read at those tokens. With
    k = vocabulary size this is exactly the on-the-fly loss."""
    parts = hidden_and_head(model)
    if parts is None:
        raise ValueError("distill.cache_top_k needs a model whose LM head strop can run itself")
    backbone, head = parts
    hidden = backbone(**inputs, use_cache=False).last_hidden_state[:, :-1][keep]  # (N, d)
    hard = linear_cross_entropy(hidden, head.weight, targets[keep])
    t_logits, t_ids = batch["teacher_logits"], batch["teacher_ids"]  # (N, k) each
    pieces = head_chunks(
        _cached_chunk, hidden, head.weight, t_logits, t_ids, args=(temperature,), chunk=CHUNK
    )
    soft = sum(pieces, hidden.new_zeros((), dtype=torch.float32))
    return alpha * soft + (1 - alpha) * hard, int(keep.sum())


def _cached_chunk(hidden, weight, t_logits, t_ids, temperature: float) -> torch.Tensor:
    s = F.log_softmax((hidden @ weight.T).float() / temperature, dim=-1).gather(-1, t_ids)  # (chunk, k)
    t = F.log_softmax(t_logits.float() / temperature, dim=-1)  # (chunk, k)
    return temperature**2 * (t.exp() * (t - s)).sum()


@torch.no_grad()
def teacher_top_k(
    teacher: torch.nn.Module, ts, pad_id: int, k: int, batch_size: int, device, progress=None
) -> list:
    """Per example: the teacher's top-k logits and token ids at each label position, (labels, k) each."""
    from strop.data.batches import collate

    out = []
    teacher.eval()
    for start in range(0, len(ts), batch_size):
        index = list(range(start, min(start + batch_size, len(ts))))
        batch = {key: v.to(device) for key, v in collate(ts, index, pad_id).items()}
        inputs = {key: batch[key] for key in sft.MODEL_INPUTS if key in batch}
        keep = batch["labels"][:, 1:] != sft.IGNORE  # (b, T-1)
        parts = hidden_and_head(teacher)
        if parts is None:
            logits = teacher(**inputs).logits[:, :-1]  # (b, T-1, V)
        else:
            hidden = parts[0](**inputs, use_cache=False).last_hidden_state[:, :-1]  # (b, T-1, d)
        for row in range(len(index)):
            h = logits[row][keep[row]] if parts is None else hidden[row][keep[row]] @ parts[1].weight.T
            values, ids = h.float().topk(min(k, h.size(-1)), dim=-1)  # (labels, k)
            out.append((values.cpu().numpy().astype(np.float32), ids.cpu().numpy().astype(np.int32)))
        if progress is not None:
            progress.update(len(index))
    return out


def _soft_chunk(hidden: torch.Tensor, weight: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    return kd_divergence(hidden @ weight.T, teacher_logits, temperature)


def classifier_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    teacher: torch.nn.Module,
    temperature: float,
    alpha: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """The same mix for classifiers: the teacher's label distribution and the true labels."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # (b, labels)
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    w = None if weights is None else weights.to(logits.device)
    hard = F.cross_entropy(logits.float(), batch["class_labels"], weight=w, reduction="sum")
    soft = kd_divergence(logits, t_logits, temperature)
    return alpha * soft + (1 - alpha) * hard, len(logits)


class LMDistill(sft.SFT):
    """`lm_loss` against a teacher model run on the fly (which packs), or against its top-k logits cached
    in the training set (`teacher=None`; padded rows only); validation is the student's SFT loss."""

    needs = frozenset({"teacher"})

    def __init__(self, teacher: torch.nn.Module | None, temperature: float, alpha: float):
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha
        self.packs = teacher is not None

    def loss(self, model, batch) -> Loss:
        return Loss(*lm_loss(model, batch, self.teacher, self.temperature, self.alpha))


class ClassifierDistill(RowObjective):
    """`classifier_loss` against a teacher classifier; otherwise as `classify.Classify`."""

    needs = frozenset({"teacher"})
    packs = False

    def __init__(self, base, teacher: torch.nn.Module, temperature: float, alpha: float):
        self.base, self.teacher, self.temperature, self.alpha = base, teacher, temperature, alpha

    def evaluate(self, model, batches) -> dict[str, float]:
        return self.base.evaluate(model, batches)

    def loss(self, model, batch) -> Loss:
        return Loss(
            *classifier_loss(model, batch, self.teacher, self.temperature, self.alpha, self.base.weights)
        )

"""Preference tuning recipes: a reward model (`task: reward`) and DPO (`task: dpo`), both on preference
pairs (data/pairs.py) and the same loop, checkpoints and report as SFT.

Run directory (as recipes/sft.py), plus eval/summary.json:
    reward: pairwise accuracy and mean margin on the test (else validation) pairs
    dpo:    preference accuracy (the chosen reply more probable) of the starting model and the tuned
            one with the pairs that flipped and a McNemar p-value, reward accuracy and margin, on the
            test (else validation) pairs; eval/pairs.jsonl: each pair's chosen/rejected log-probs
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from strop.core import distributed
from strop.core.config import RunConfig
from strop.core.device import autocast
from strop.core.io import atomic_write_json, atomic_write_text
from strop.core.progress import tqdm
from strop.data.batches import collate
from strop.data.pairs import PairData, build_pairs, encode_pairs
from strop.data.ratings import RatingData, build_ratings
from strop.data.template import run_templates
from strop.data.tokenized import TokenizedSet
from strop.eval.significance import mcnemar
from strop.export.save import export_classifier, export_model
from strop.methods import dpo, reward
from strop.methods.dpo import PairObjective
from strop.methods.pair_losses import pair_objective
from strop.models.attention import enable_segment_attention
from strop.models.build import build_classifier
from strop.recipes.skeleton import Run, Task

log = logging.getLogger("strop")
PREFERENCE = ("preference_accuracy", "preference_accuracy_per_token")  # start vs tuned, in eval summaries


class RewardTask(Task):
    """A scalar-head reward model on preference pairs (Bradley-Terry) or on rated replies (regression),
    on a causal LM (last token) or an encoder (mean)."""

    causal_lm = False

    def data(self, run: Run) -> dict:
        cfg = run.cfg
        self.template_name, self.template, _ = run_templates(cfg, run.tokenizer)
        self.ratings = cfg.reward_model.target == "ratings"
        data: RatingData | PairData
        if self.ratings:
            data = build_ratings(cfg.data, self.template, cfg.train.seed, cfg.reward_model.rating_field)
            self.test_set = data.test if cfg.eval.enabled else None
            if self.test_set is not None and cfg.eval.max_examples:
                keep = list(range(min(len(self.test_set), cfg.eval.max_examples)))
                self.test_set = self.test_set.subset(keep)
        else:
            data = build_pairs(cfg.data, self.template, cfg.train.seed)
            self.test_set = _test_pairs(cfg, data, self.template)
        data.summary["template"] = self.template_name
        self.train_set, self.validation = data.train, data.validation
        return data.summary

    def build(self, run: Run):
        model, run.amp = build_classifier(run.cfg, ["reward"], run.device, run.dtype)
        return model

    def objective(self, run: Run, model):
        if run.cfg.method.name == "head":  # feature-based: the backbone runs once per reply, not every epoch
            sets = [s for s in (self.train_set, self.validation, self.test_set) if s is not None]
            rows = [r for s in sets for r in (*s.ids, *(s.rejected.ids if s.rejected is not None else []))]
            with tqdm(total=len(rows), desc="features", unit="ex", disable=not run.show_progress) as bar:
                model.cache_features(rows, run.pad_id, run.cfg.eval.batch_size * 4, bar)
        return reward.RatingReward() if self.ratings else reward.PairwiseReward()

    def export(self, run: Run, model) -> Path:
        extra = {
            "template": self.template.source,
            "max_length": run.cfg.data.max_length,
            "system_prompt": self.template.system_prompt,  # scored as trained
        }
        return export_classifier(run.run_dir / "model", model, run.tokenizer, run.cfg, extra)

    def evaluate(self, run: Run, model) -> dict | None:
        with autocast(run.device, run.amp):  # scored as the loop's validation scored
            objective = reward.RatingReward() if self.ratings else reward.PairwiseReward()
            return _evaluate(run, model, self.test_set, self.validation, objective)


class PairTask(Task):
    """Preference tuning of the policy on pairs: DPO, IPO, SimPO or ORPO (`dpo.loss`)."""

    def data(self, run: Run) -> dict:
        cfg = run.cfg
        self.template_name, self.template, _ = run_templates(cfg, run.tokenizer)
        data = build_pairs(cfg.data, self.template, cfg.train.seed)
        self.test_set = _test_pairs(cfg, data, self.template)
        data.summary["template"] = self.template_name
        if data.summary["train_pairs_with_margin"]:
            log.warning("data: %s ignores the pairs' 'margin' field (reward models use it)", cfg.dpo.loss)
        self.train_set, self.validation = data.train, data.validation
        return data.summary

    def objective(self, run: Run, model):
        """The reference is the starting model: its log-probs, computed once, ride along in the batches
        (with LoRA the starting model is the policy itself, since a fresh adapter adds nothing). A
        reference-free loss trains without them, so only the held-out pairs get them, for the
        start-vs-tuned figures."""
        self.loss = pair_objective(run.cfg.dpo)
        if run.cfg.train.batch_tokens:
            attention = enable_segment_attention(model)
            log.info(
                "packing: pairs in rows of up to %d tokens, attention %s",
                run.cfg.train.batch_tokens,
                attention,
            )
        sets = [("train", self.train_set)] if "reference" in self.loss.needs else []
        for name, ts in (*sets, ("validation", self.validation), ("test", self.test_set)):
            if ts is not None and len(ts):
                with autocast(run.device, run.amp):  # the reference as the loop's forward computes it
                    ts.reference = cached_reference(model, ts, run.pad_id, run.cfg, run.show_progress, name)
        return self.loss

    def export(self, run: Run, model) -> Path:
        return export_model(
            run.run_dir / "model", model, run.tokenizer, self.template, run.cfg, self.template_name
        )

    def evaluate(self, run: Run, model) -> dict | None:
        with autocast(run.device, run.amp):  # scored as the loop's validation scored
            return _evaluate(run, model, self.test_set, self.validation, self.loss)


def _test_pairs(cfg: RunConfig, data, template) -> TokenizedSet | None:
    test = data.records["test"][: cfg.eval.max_examples]
    return encode_pairs(test, template, cfg.data.max_length) if test and cfg.eval.enabled else None


def cached_reference(
    model, ts: TokenizedSet, pad_id: int, cfg: RunConfig, progress: bool, name: str
) -> np.ndarray:
    """`reference_logps`, kept in RUN/reference_logps.safetensors so that a resumed run, or one trained
    further, does not recompute them. They are reused only for the same pairs' tokens and the same
    starting model (a fingerprint per set in the file's metadata)."""
    path = cfg.run_dir / "reference_logps.safetensors"
    key = _fingerprint(ts, cfg)
    arrays, meta = {}, {}
    if path.is_file():
        try:
            with safe_open(str(path), "numpy") as f:
                meta = dict(f.metadata() or {})
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # a damaged cache is recomputed, never trusted
            log.warning("%s: unreadable (%s); computing the reference log-probs again", path, e)
            arrays, meta = {}, {}
    if meta.get(name) == key and name in arrays and arrays[name].shape == (len(ts), 2):
        log.info("reference log-probs (%s): %d pairs reused from %s", name, len(ts), path.name)
        return arrays[name]
    out = reference_logps(model, ts, pad_id, cfg.train.batch_size, progress, name)
    arrays[name], meta[name] = out, key
    if distributed.WORLD.main:  # every process computed the same; one writes
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(arrays, str(tmp), metadata=meta)
        os.replace(tmp, path)
    return out


def _fingerprint(ts: TokenizedSet, cfg: RunConfig) -> str:
    """What the reference log-probs depend on: every pair's tokens and loss mask, and the start model."""
    h = hashlib.sha256(json.dumps([cfg.model.name, cfg.model.keep_layers, cfg.model.dtype]).encode())
    assert ts.rejected is not None  # a set of pairs
    for side in (ts, ts.rejected):
        for ids, trained in zip(side.ids, side.trained, strict=True):
            h.update(np.asarray(ids, np.int32).tobytes())
            h.update(np.packbits(trained).tobytes())
            h.update(b"|")
    return h.hexdigest()


@torch.no_grad()
def reference_logps(
    model, ts: TokenizedSet, pad_id: int, batch_size: int, progress: bool, name: str
) -> np.ndarray:
    """(pairs, 2) log-probs of the chosen and rejected replies under `model`, in eval mode."""
    device = next(model.parameters()).device
    out = np.zeros((len(ts), 2), dtype=np.float32)
    with tqdm(total=len(ts), desc=f"reference log-probs ({name})", disable=not progress) as bar:
        for i in range(0, len(ts), batch_size):
            idx = list(range(i, min(i + batch_size, len(ts))))
            b = {k: v.to(device) for k, v in collate(ts, idx, pad_id).items()}
            out[idx] = dpo.pair_logps(model, [b])[0]
            bar.update(len(idx))
    return out


def _evaluate(run: Run, model, test_set, validation, objective) -> dict | None:
    """On the test pairs, else the validation pairs (never trained on either way)."""
    cfg, run_dir = run.cfg, run.run_dir
    set_name, ts = ("test", test_set) if test_set is not None else ("validation", validation)
    if ts is None or len(ts) == 0:
        return None
    if set_name == "validation" and cfg.eval.max_examples:
        ts = ts.subset(list(range(min(len(ts), cfg.eval.max_examples))))
    device = next(model.parameters()).device
    batches = [
        {
            k: v.to(device)
            for k, v in objective.collate(
                ts, range(i, min(i + cfg.eval.batch_size, len(ts))), run.pad_id
            ).items()
        }
        for i in range(0, len(ts), cfg.eval.batch_size)
    ]
    summary: dict = {
        "task": cfg.task,
        "set": set_name,
        "pairs" if ts.rejected is not None else "examples": len(ts),
    }
    (run_dir / "eval").mkdir(exist_ok=True)
    if cfg.task == "reward":
        summary["metrics"] = {
            k.removeprefix("val_"): v for k, v in objective.evaluate(model, batches).items()
        }
    else:
        summary.update(_pair_summary(objective, model, ts, batches, run_dir))
    atomic_write_json(run_dir / "eval" / "summary.json", summary)
    log.info(
        "eval (%s pairs): %s",
        set_name,
        json.dumps(summary["metrics"] if cfg.task == "reward" else {k: summary[k] for k in PREFERENCE}),
    )
    return summary


def _pair_summary(
    objective: PairObjective, model, ts: TokenizedSet, batches: list[dict], run_dir: Path
) -> dict:
    """Metrics of the tuned policy and of the starting one (the reference: DPO loss log 2 for sigmoid,
    1/(4 beta^2) for IPO); for each preference accuracy the starting and tuned values and the pairs that
    flipped either way, with an exact McNemar p-value; every pair's log-probs in eval/pairs.jsonl."""
    policy, lengths = dpo.pair_logps(model, batches)
    assert ts.reference is not None  # objective() computed it for the held-out sets
    ref = ts.reference.astype(np.float64)
    m = objective.summarise(policy, ref, lengths)
    start = objective.summarise(ref, ref, lengths)  # the starting model's
    out: dict = {
        "objective": objective.name,
        "reference_free": "reference" not in objective.needs,
        "metrics": {k.removeprefix("val_"): v for k, v in m.items()},
        "start_metrics": {k.removeprefix("val_"): v for k, v in start.items()},
    }
    for key, ref_score, policy_score in (
        ("preference_accuracy", ref, policy),
        ("preference_accuracy_per_token", ref / lengths, policy / lengths),
    ):
        before, after = ref_score[:, 0] > ref_score[:, 1], policy_score[:, 0] > policy_score[:, 1]
        out[key] = {"start": float(before.mean()), "tuned": float(after.mean()), **mcnemar(before, after)}
    rows = [
        {
            "id": pid,
            "start": [round(float(x), 4) for x in r],
            "tuned": [round(float(x), 4) for x in p],
            "reply_tokens": [int(n) for n in n_],
        }
        for pid, r, p, n_ in zip(ts.example_ids, ref, policy, lengths, strict=True)
    ]
    atomic_write_text(run_dir / "eval" / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return out

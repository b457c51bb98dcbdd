"""Preference tuning recipes: a reward model (`task: reward`) and DPO (`task: dpo`), both on preference
pairs (data/pairs.py) and the same loop, checkpoints and report as SFT.

Run directory (as recipes/sft.py), plus eval/summary.json:
    reward: pairwise accuracy and mean margin on the test (else validation) pairs
    dpo:    preference accuracy (the chosen reply more probable) of the starting model and the tuned
            one with the pairs that flipped and a McNemar p-value, reward accuracy and margin, on the
            test (else validation) pairs; eval/pairs.jsonl: each pair's chosen/rejected log-probs
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from strop.core.config import RunConfig
from strop.core.device import autocast
from strop.core.io import atomic_write_json, atomic_write_text
from strop.data.batches import collate
from strop.data.pairs import build_pairs, encode_pairs
from strop.data.ratings import build_ratings
from strop.data.template import run_templates
from strop.data.tokenized import TokenizedSet
from strop.eval.significance import mcnemar
from strop.export.save import export_classifier, export_model
from strop.methods import dpo, reward
from strop.models.build import build_causal_lm, build_classifier
from strop.models.load import load_tokenizer, tokenizer_source
from strop.recipes.lifecycle import TrainResult, log_parameters, save_result, start_run, write_run_report
from strop.recipes.run_folder import open_run_folder
from strop.training.loop import fit

log = logging.getLogger("strop")
PREFERENCE = ("preference_accuracy", "preference_accuracy_per_token")  # start vs tuned, in eval summaries


def train_preference(
    config: RunConfig | dict | str | Path, overrides: list[str] | None = None, show_progress: bool = True
) -> TrainResult:
    t0 = time.time()
    cfg, threads, device, dtype = start_run(config, overrides)
    run_dir = cfg.run_dir
    is_reward = cfg.task == "reward"
    tokenizer = load_tokenizer(
        tokenizer_source(cfg.model.name, causal_lm=not is_reward), cfg.model.trust_remote_code
    )
    template_name, template, _ = run_templates(cfg, tokenizer)
    ratings = is_reward and cfg.reward_model.target == "ratings"
    if ratings:
        data = build_ratings(cfg.data, template, cfg.train.seed, cfg.reward_model.rating_field)
        test_set = data.test if cfg.eval.enabled else None
        if test_set is not None and cfg.eval.max_examples:
            test_set = test_set.subset(list(range(min(len(test_set), cfg.eval.max_examples))))
    else:
        data = build_pairs(cfg.data, template, cfg.train.seed)
        test = data.records["test"][: cfg.eval.max_examples]
        test_set = encode_pairs(test, template, cfg.data.max_length) if test and cfg.eval.enabled else None
    data.summary["template"] = template_name
    pad_id = tokenizer.pad_token_id

    torch.manual_seed(cfg.train.seed)
    if is_reward:
        model, amp = build_classifier(cfg, ["reward"], device, dtype)
        open_run_folder(cfg, data.summary, model)
        if cfg.method.name == "head":  # feature-based: the backbone runs once per reply, not every epoch
            sets = [s for s in (data.train, data.validation, test_set) if s is not None]
            rows = [r for s in sets for r in (*s.ids, *(s.rejected.ids if s.rejected is not None else []))]
            with tqdm(total=len(rows), desc="features", unit="ex", disable=not show_progress) as bar:
                model.cache_features(rows, pad_id, cfg.eval.batch_size * 4, bar)
        if ratings:
            loss_fn, eval_fn = reward.rating_loss, reward.evaluate_ratings
        else:
            loss_fn, eval_fn = reward.loss, reward.evaluate
    else:
        model, amp = build_causal_lm(cfg, device, dtype)
        open_run_folder(cfg, data.summary, model)
        if data.summary["train_pairs_with_margin"]:
            log.warning("data: DPO ignores the pairs' 'margin' field (reward models use it)")
        # the reference is the starting model: its log-probs, computed once, ride along in the batches
        # (with LoRA the starting model is the policy itself, since a fresh adapter adds nothing);
        # simpo trains without it, so only the held-out pairs get it, for the start-vs-tuned figures
        d = cfg.dpo
        sets = [("train", data.train)] if d.loss != "simpo" else []
        for name, ts in (*sets, ("validation", data.validation), ("test", test_set)):
            if ts is not None and len(ts):
                with autocast(device, amp):  # the reference's log-probs as the loop's forward computes them
                    ts.reference = cached_reference(model, ts, pad_id, cfg, show_progress, name)
        options = {
            "beta": d.beta,
            "loss_type": d.loss,
            "label_smoothing": d.label_smoothing,
            "simpo_gamma": d.simpo_gamma,
        }
        loss_fn = functools.partial(dpo.loss, **options)
        eval_fn = functools.partial(dpo.evaluate, **options)
    trainable, total = log_parameters(model, cfg, device, dtype, threads)
    result = fit(
        model,
        loss_fn,
        eval_fn,
        data.train,
        data.validation,
        cfg.train,
        cfg.optim,
        run_dir,
        pad_id,
        device,
        show_progress,
        autocast_dtype=amp,
    )
    if is_reward:
        extra = {
            "template": template.source,
            "max_length": cfg.data.max_length,
            "system_prompt": template.system_prompt,  # scored as trained
        }
        model_dir = export_classifier(run_dir / "model", model, tokenizer, cfg, extra)
    else:
        model_dir = export_model(run_dir / "model", model, tokenizer, template, cfg, template_name)
    metrics, seconds = save_result(run_dir, result, trainable, total, model_dir, t0, data.summary)
    summary = None
    if cfg.eval.enabled:
        with autocast(device, amp):  # scored as the loop's validation scored
            summary = _evaluate(cfg, model, test_set, data.validation, eval_fn, pad_id, run_dir)
    report = write_run_report(run_dir)
    return TrainResult(run_dir, model_dir, metrics, data.summary, seconds, summary, report)


def score_rows(run_dir: Path, path: Path, batch_size: int = 8) -> list[dict]:
    """Rewards of a reward run for rows `{prompt, response}` or `{messages}` (ending in the reply)."""
    from strop.core.errors import StropError
    from strop.data.read import read_rows

    scorer = reward.RewardScorer(Path(run_dir), torch.device("cpu"))
    rows, conversations = read_rows(str(path)), []
    for row in rows:
        d = row.data
        if isinstance(d.get("messages"), list):
            conversations.append(d["messages"])
        elif isinstance(d.get("prompt"), str) and isinstance(d.get("response"), str):
            conversations.append(
                [{"role": "user", "content": d["prompt"]}, {"role": "assistant", "content": d["response"]}]
            )
        else:
            raise StropError(f"{row.where}: expected 'messages' or 'prompt' and 'response'")
    out = scorer(conversations, batch_size)
    return [{**row.data, "reward": round(r, 6)} for row, r in zip(rows, out, strict=True)]


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
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(arrays, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return out


def _fingerprint(ts: TokenizedSet, cfg: RunConfig) -> str:
    """What the reference log-probs depend on: every pair's tokens and loss mask, and the start model."""
    h = hashlib.sha256(json.dumps([cfg.model.name, cfg.model.keep_layers, cfg.model.dtype]).encode())
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


def _evaluate(
    cfg: RunConfig, model, test_set, validation, eval_fn, pad_id: int, run_dir: Path
) -> dict | None:
    """On the test pairs, else the validation pairs (never trained on either way)."""
    set_name, ts = ("test", test_set) if test_set is not None else ("validation", validation)
    if ts is None or len(ts) == 0:
        return None
    if set_name == "validation" and cfg.eval.max_examples:
        ts = ts.subset(list(range(min(len(ts), cfg.eval.max_examples))))
    device = next(model.parameters()).device
    batches = [
        {
            k: v.to(device)
            for k, v in collate(ts, list(range(i, min(i + cfg.eval.batch_size, len(ts)))), pad_id).items()
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
        summary["metrics"] = {k.removeprefix("val_"): v for k, v in eval_fn(model, batches).items()}
    else:
        summary.update(_dpo_summary(cfg, model, ts, batches, run_dir))
    atomic_write_json(run_dir / "eval" / "summary.json", summary)
    log.info(
        "eval (%s pairs): %s",
        set_name,
        json.dumps(summary["metrics"] if cfg.task == "reward" else {k: summary[k] for k in PREFERENCE}),
    )
    return summary


def _dpo_summary(cfg: RunConfig, model, ts: TokenizedSet, batches: list[dict], run_dir: Path) -> dict:
    """Metrics of the tuned policy and of the starting one (the reference: DPO loss log 2 for sigmoid,
    1/(4 beta^2) for IPO); for each preference accuracy the starting and tuned values and the pairs that
    flipped either way, with an exact McNemar p-value; every pair's log-probs in eval/pairs.jsonl."""
    d = cfg.dpo
    policy, lengths = dpo.pair_logps(model, batches)
    ref = ts.reference.astype(np.float64)
    m = dpo.summarise(policy, ref, lengths, d.beta, d.loss, d.label_smoothing, d.simpo_gamma)
    start = dpo.summarise(ref, ref, lengths, d.beta, d.loss, d.label_smoothing, d.simpo_gamma)  # the start
    out: dict = {
        "objective": d.loss,
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

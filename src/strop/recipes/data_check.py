"""`strop data check`: the data checks (strop.data.check) under the run's tokenizer and template, plus an
estimate of the run's time and memory on this machine.

The estimate counts the training FLOPs (4N per token for LoRA and frozen layers, 6N for full fine-
tuning: forward 2N, backward through activations 2N, weight gradients 2 x trainable; Kaplan et al. 2020)
on the tokens the batches really hold (padding included), at the fraction of this machine's measured
matmul peak that strop reaches (bench/sft.py: 56% packed, 38% padded on a 2-core CPU with SmolLM2-135M).
Memory: fp32 weights, 16 bytes per trainable parameter (weight, gradient, two AdamW moments), and
activations of (34 hidden + 5 intermediate) floats per token and layer (Korthikanti et al. 2022,
counted for fp32 and no attention scores), which matched bench/sft.py's peak RSS within 20%.
Both are estimates: say so, and trust the first steps' tokens/s over them.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch

from strop.core.config import RunConfig
from strop.core.device import resolve_device
from strop.core.errors import DataError
from strop.data.check import CheckResult, check_data
from strop.data.packing import pack
from strop.data.pairs import build_pairs
from strop.data.prompts import prompt_splits
from strop.data.ratings import build_ratings
from strop.data.read import check_sources
from strop.data.template import ChatTemplate, resolve_template
from strop.data.tokenized import TokenizedSet
from strop.models.load import architecture_source, from_pretrained, load_tokenizer, tokenizer_source
from strop.models.trainable import apply_method, count_parameters
from strop.training.loop import total_steps

log = logging.getLogger("strop.data")

EFFICIENCY = 0.55  # of the matmul peak, on the tokens computed (padding included), packed or padded
RUNTIME_BYTES = 0.6e9  # Python, torch, transformers, tokenizer: measured before the first batch
GENERATION_S_PER_STEP_135M = 0.1  # one decode step at batch 8, SmolLM2-135M, 2-core CPU (issue 4)


def run_check(cfg: RunConfig, estimate: bool = True) -> CheckResult:
    check_sources([*cfg.data.train, *cfg.data.validation, *cfg.data.test])
    tokenizer = load_tokenizer(tokenizer_source(cfg.model.name), cfg.model.trust_remote_code)
    template_name, template_src = resolve_template(cfg.data.template, tokenizer)
    template = ChatTemplate(tokenizer, template_src, cfg.data.system_prompt, generates=cfg.task != "reward")
    if cfg.task in ("ppo", "grpo"):
        return _check_prompts(cfg, template, template_name)
    if cfg.task == "reward" and cfg.reward_model.target == "ratings":
        return _check_ratings(cfg, template, template_name)
    pairs = cfg.task in ("reward", "dpo")  # _check_pairs reports their truncation, as training cuts them
    result = check_data(cfg.data, template, cfg.train.seed, length_findings=not pairs)
    result.report["model"] = cfg.model.name
    result.report["template"] = template_name
    if pairs and not result.errors:
        result.train = _check_pairs(cfg, template, result.report)  # the estimate reads pairs as cut
    if estimate and result.train is not None and len(result.train):
        result.report["estimate"] = estimate_run(
            cfg, architecture_source(cfg.model.name), result.train, result.report
        )
    return result


def _check_pairs(cfg: RunConfig, template: ChatTemplate, report: dict) -> TokenizedSet:
    """Preference pairs as training reads them: a pair longer than max_length is truncated (its prompt's
    oldest tokens first, then the replies' ends), and dropped when nothing is left to compare."""
    lenient = cfg.data.model_copy(update={"skip_bad_rows": True, "allow_leakage": True})
    data = build_pairs(lenient, template, cfg.train.seed)
    summary = data.summary
    report["pairs"] = {
        k: summary[k]
        for k in ("train_pairs", "validation_pairs", "truncated_pairs", "replies_cut_pairs", "dropped_pairs")
    }
    if summary["dropped_pairs"]:
        report["errors"].append(
            f"{summary['dropped_pairs']} pair(s) have nothing left to compare at max_length "
            f"{cfg.data.max_length} (a reply cut away, or both replies identical after the cut) and would be dropped"
        )
    if summary["replies_cut_pairs"]:
        report["warnings"].append(
            f"{summary['replies_cut_pairs']} pair(s) have a reply cut at its end at max_length "
            f"{cfg.data.max_length} (after their prompt was trimmed to half of it); raise data.max_length"
        )
    elif summary["truncated_pairs"]:
        report["notes"].append(
            f"{summary['truncated_pairs']} pair(s) are longer than max_length {cfg.data.max_length}: their "
            "prompt's oldest tokens are dropped, the replies are kept whole"
        )
    return data.train


def _blank_report(cfg: RunConfig, template_name: str) -> dict:
    """The report skeleton of the checks that do not read rows as SFT records (ratings, RL prompts)."""
    return {
        "model": cfg.model.name,
        "template": template_name,
        "sources": [],
        "errors": [],
        "warnings": [],
        "notes": [],
    }


def _check_ratings(cfg: RunConfig, template: ChatTemplate, template_name: str) -> CheckResult:
    """Rated replies: every row needs a conversation and a numeric rating (each bad row is listed: an
    error, or a warning under data.skip_bad_rows); truncation is counted."""
    report = _blank_report(cfg, template_name)
    lenient = cfg.data.model_copy(update={"skip_bad_rows": True})
    try:
        data = build_ratings(lenient, template, cfg.train.seed, cfg.reward_model.rating_field)
    except DataError as e:
        report["errors"].append(str(e))
        return CheckResult(report)
    summary = data.summary
    report["ratings"] = summary
    report["warnings" if cfg.data.skip_bad_rows else "errors"] += [str(r) for r in data.rejected]
    if summary["truncated"]:
        report["warnings"].append(
            f"{summary['truncated']} rated conversation(s) are longer than max_length {cfg.data.max_length} "
            "and would be truncated"
        )
    return CheckResult(report)


def _check_prompts(cfg: RunConfig, template: ChatTemplate, template_name: str) -> CheckResult:
    """PPO and GRPO read prompts only: each row must yield a prompt that leaves room for the reply."""
    report = _blank_report(cfg, template_name)
    assert cfg.rl is not None  # RunConfig requires an rl section for ppo and grpo
    try:
        _, summary = prompt_splits(cfg.data, template, cfg.rl.max_new_tokens, cfg.train.seed)
    except DataError as e:
        report["errors"].append(str(e))
        return CheckResult(report)
    report["prompts"] = summary
    if summary["prompts_too_long"]:
        report["warnings"].append(
            f"{summary['prompts_too_long']} prompt(s) are longer than {summary['max_prompt_tokens']} tokens "
            "(data.max_length minus rl.max_new_tokens) and would be left out"
        )
    for split, n in summary["held_out_prompts_also_in_train"].items():
        if n:
            report["warnings"].append(f"{split}: {n} prompt(s) also appear in the training prompts")
    return CheckResult(report)


def estimate_run(cfg: RunConfig, source: str, train: TokenizedSet, report: dict) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    mcfg = from_pretrained(AutoConfig, source, cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mcfg, trust_remote_code=cfg.model.trust_remote_code)
        model = apply_method(model, cfg.method)
    trainable, total = count_parameters(model)
    n = total - (trainable if cfg.method.name == "lora" else 0)  # the base model's own parameters

    t = cfg.train
    lengths = [len(x) for x in train.ids]
    if t.batch_tokens:
        rows = pack(lengths, t.batch_tokens)
        per_epoch, computed = len(rows), sum(max(1, sum(lengths[i] for i in r)) for r in rows)
        widest = t.batch_tokens
    else:
        order = np.random.default_rng([t.seed, 0]).permutation(len(lengths))
        batches = [order[i : i + t.batch_size] for i in range(0, len(order), t.batch_size)]
        per_epoch = len(batches)
        computed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        widest = t.batch_size * max(lengths)
    steps = total_steps(per_epoch, t)
    epochs = steps * t.grad_accum / per_epoch
    flops = computed * epochs * (4 * n + 2 * trainable)
    device = resolve_device(cfg.model.device)
    peak = matmul_peak(device)
    train_s = flops / (peak * EFFICIENCY)

    layers = getattr(mcfg, "num_hidden_layers", 12)
    hidden = getattr(mcfg, "hidden_size", 768)
    inter = getattr(mcfg, "intermediate_size", 4 * hidden)
    per_token_layer = (hidden if t.gradient_checkpointing else 34 * hidden + 5 * inter) * 4
    activations = widest * layers * per_token_layer
    memory = RUNTIME_BYTES + 4 * n + 16 * trainable + activations

    ev = cfg.eval
    held_out = report["splits"].get("test") or report["splits"].get("validation") or 0
    eval_examples = held_out if ev.max_examples is None else min(ev.max_examples, held_out)  # None: all
    eval_s = 0.0
    if ev.enabled and eval_examples:
        passes = 2 + (1 if ev.kshot else 0)  # base, tuned (and k-shot base)
        decode_steps = -(-eval_examples // ev.batch_size) * ev.max_new_tokens
        eval_s = passes * decode_steps * GENERATION_S_PER_STEP_135M * max(1.0, n / 1.35e8)
    return {
        "parameters": total,
        "trainable": trainable,
        "steps": steps,
        "epochs": round(epochs, 3),
        "tokens_computed_per_epoch": int(computed),
        "padding_fraction": round(1 - sum(lengths) / computed, 3),
        "train_flops": flops,
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "device": str(device),
        "train_s": round(train_s),
        "eval_s": round(eval_s),
        "peak_memory_gb": round(memory / 1e9, 2),
        "machine_memory_gb": round(_machine_memory(device) / 1e9, 1),
        "memory_limit_gb": round(t.memory_limit_bytes / 1e9, 2) if t.memory_limit_bytes else None,
    }


def matmul_peak(device: torch.device, n: int = 2048, seconds: float = 0.5) -> float:
    """FLOP/s of a square matmul on `device` (fp32 on CPU, bf16 on CUDA), timed for about `seconds`."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _machine_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def render(report: dict) -> str:
    """The check as text for a terminal."""
    lines = [f"strop data check  (model {report.get('model')}, template {report.get('template')})", ""]
    lines += _source_lines(report["sources"])
    lines += _split_lines(report)
    lines += _set_lines(report)
    lines += _token_lines(report)
    if "duplicates" in report:
        lines += _duplicate_lines(report["duplicates"], report.get("leakage", {}))
    if e := report.get("estimate"):
        lines += _estimate_lines(e)
    lines.append("")
    for kind in ("errors", "warnings", "notes"):
        for msg in report[kind]:
            lines.append(f"{kind[:-1]}: {msg}")
    verdict = f"{len(report['errors'])} error(s), {len(report['warnings'])} warning(s)"
    lines.append(("FAIL: " if report["errors"] else "OK: ") + verdict)
    return "\n".join(lines)


def _source_lines(sources: list[dict]) -> list[str]:
    """Each source's rows, format and (the first ten) rejected rows."""
    lines = ["sources:"]
    for s in sources:
        fmt = f"format {s.get('format', '?')}{' (detected)' if s.get('format_detected') else ''}"
        lines.append(f"  {s['split']:<10} {s['path']}: {s['rows']} rows, {s['valid']} usable, {fmt}")
        for r in s["rejected_rows"][:10]:
            field = f"field {r['field']!r}: " if r["field"] else ""
            lines.append(f"      rejected {r['where']}: {field}{r['reason']}")
        if len(s["rejected_rows"]) > 10:
            lines.append(f"      ... and {len(s['rejected_rows']) - 10} more (--json lists them all)")
    return lines


def _split_lines(report: dict) -> list[str]:
    """The split sizes and a mixture's shares."""
    lines = []
    if "splits" in report:
        lines.append("")
        lines.append(
            "splits: "
            + ", ".join(f"{k} {v}" for k, v in report["splits"].items())
            + f"  (validation from {report['validation_from']})"
        )
    for name, m in report.get("mixture", {}).items():
        lines.append(
            f"  mixture {name}: {m['used']} of {m['available']} ({m['share']:.1%}, target {m['target_share']:.1%})"
        )
    return lines


def _set_lines(report: dict) -> list[str]:
    """What the tasks that do not train on SFT records read: preference pairs, rated replies, prompts."""
    lines = []
    if report.get("pairs"):
        lines += [
            "",
            "preference pairs: "
            + ", ".join(f"{k.removesuffix('_pairs')} {v}" for k, v in report["pairs"].items()),
        ]
    if report.get("ratings"):
        r = report["ratings"]
        lines += [
            "",
            f"rated replies: train {r['train_examples']}, validation {r['validation_examples']}, test "
            f"{r['test_examples']}; ratings {r['ratings']}; truncated {r['truncated']}",
        ]
    if report.get("prompts"):
        pr = report["prompts"]
        lines += [
            "",
            f"prompts: train {pr['train_prompts']}, validation {pr['validation_prompts']}, test {pr['test_prompts']}; "
            f"{pr['prompts_too_long']} longer than {pr['max_prompt_tokens']} tokens",
        ]
    return lines


def _token_lines(report: dict) -> list[str]:
    """Token lengths per split, and the label counts of labelled data."""
    lines = []
    if report.get("tokens"):
        lines += ["", "tokens (per example):"]
        for split, t in report["tokens"].items():
            lines.append(
                f"  {split:<10} {t['examples']} examples, median {t['p50']:.0f}, p90 {t['p90']:.0f}, p99 "
                f"{t['p99']:.0f}, max {t['max']} (max_length {t['max_length']}); truncated {t['truncated']}, "
                f"response cut away {t['response_cut_away']}; {t['label_tokens']:,} of {t['tokens']:,} tokens carry loss"
            )
    for split, labels in report.get("labels", {}).items():
        lines.append(f"  labels {split}: " + ", ".join(f"{k} {v}" for k, v in labels.items()))
    return lines


def _duplicate_lines(duplicates: dict, leakage: dict) -> list[str]:
    """Repeats within each split (a few examples of each), then copies of training rows in the others."""
    lines = ["", "duplicates:"]
    for split, d in duplicates.items():
        examples = [" = ".join(g[:3]) for g in d["exact_groups"][:3]] + [
            f"{a} ~ {b} ({j})" for a, b, j in d["near_pairs"][:3]
        ]
        lines.append(
            f"  within {split}: {d['repeats']} repeat(s)" + (f": {'; '.join(examples)}" if examples else "")
        )
    for pair, found in leakage.items():
        a, b = pair.split("_")
        shown = "; ".join(f"{x} ~ {y} ({k})" for x, y, k in found[:5])
        lines.append(f"  {b} vs {a}: {len(found)} pair(s)" + (f": {shown}" if shown else ""))
    return lines


def _estimate_lines(e: dict) -> list[str]:
    """The run's estimated size, time and memory on this machine."""
    lines = [
        "",
        f"estimate on this machine ({e['device']}, matmul peak {e['matmul_peak_gflops']} GFLOP/s):",
        f"  {e['parameters']:,} parameters, {e['trainable']:,} trainable; {e['steps']} steps "
        f"({e['epochs']} epochs), {e['padding_fraction']:.0%} of computed tokens are padding",
        f"  training ~{_duration(e['train_s'])}, evaluation ~{_duration(e['eval_s'])}, peak memory "
        f"~{e['peak_memory_gb']} GB of {e['machine_memory_gb']} GB (estimates: +-30%)",
    ]
    limited = e.get("memory_limit_gb") is not None
    limit = e["memory_limit_gb"] if limited else e["machine_memory_gb"]
    what = "train.memory_limit" if limited else "this machine's memory"
    margin = limit - 1.3 * e["peak_memory_gb"]  # against the top of the estimate's range
    lines.append(f"  memory margin: {margin:+.1f} GB to {what} ({limit} GB) at the estimate's upper end")
    if margin < 0 and limited:
        lines.append(
            "  note: at this batch_size the estimate passes train.memory_limit; the run measures and lowers "
            "its micro-batch at the same global batch (or stops before training if one example does not fit)"
        )
    elif margin < 0:
        lines.append(
            f"  warning: the run may not fit in {what}: set train.memory_limit (the micro-batch is then "
            "measured and lowered at the same global batch), train.gradient_checkpointing: true, or "
            "lower data.max_length"
        )
    return lines


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

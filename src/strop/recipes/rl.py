"""Reinforcement learning from a reward (`task: ppo | grpo`): the policy (LoRA or any trainable set)
samples replies to the training prompts, a reward scores them (a strop reward run, a built-in, or a
Python function), and `training/rl_loop.fit_rl` moves the policy toward higher reward with a KL penalty
to the starting model. With LoRA the reference is the same model with its adapter disabled (no second
copy in memory); other methods keep a frozen copy.

Run directory (as recipes/sft.py), plus eval/summary.json: mean reward of greedy replies to the test
(else validation) prompts for the starting and the tuned model, and eval/samples.jsonl with both replies.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import torch

from strop.core.config import RunConfig
from strop.core.device import autocast
from strop.core.io import atomic_write_json, atomic_write_text
from strop.data.prompts import Prompt, prompt_splits
from strop.data.template import run_templates
from strop.eval.rewards import call_reward, reward_function
from strop.export.save import export_model
from strop.methods.reward import RewardScorer
from strop.methods.rl import ValueHead, response_logps
from strop.models.build import build_causal_lm
from strop.models.load import load_tokenizer, strop_run, tokenizer_source
from strop.recipes.lifecycle import TrainResult, log_parameters, save_result, start_run, write_run_report
from strop.recipes.run_folder import open_run_folder
from strop.training.rl_loop import fit_rl
from strop.training.rollout import Reward, evaluate_reward

log = logging.getLogger("strop")


def train_rl(
    config: RunConfig | dict | str | Path, overrides: list[str] | None = None, show_progress: bool = True
) -> TrainResult:
    t0 = time.time()
    cfg, threads, device, dtype = start_run(config, overrides)
    rl, run_dir = cfg.rl, cfg.run_dir
    tokenizer = load_tokenizer(tokenizer_source(cfg.model.name), cfg.model.trust_remote_code)
    template_name, template, _ = run_templates(cfg, tokenizer)
    splits, summary = prompt_splits(cfg.data, template, rl.max_new_tokens, cfg.train.seed)
    summary["template"] = template_name
    reward = build_reward(rl.reward, rl.reward_args, device)
    log.info(
        "%s: %d train / %d validation / %d test prompts (%d too long); reward %s",
        cfg.task,
        summary["train_prompts"],
        summary["validation_prompts"],
        summary["test_prompts"],
        summary["prompts_too_long"],
        rl.reward,
    )

    torch.manual_seed(cfg.train.seed)
    model, amp = build_causal_lm(cfg, device, dtype)
    value_head = ValueHead(model.config.hidden_size).to(device) if cfg.task == "ppo" else None
    open_run_folder(cfg, summary, torch.nn.ModuleList([model, *([value_head] if value_head else [])]))
    # the reference is the starting policy: a fresh LoRA adapter switched off, else a frozen copy (also
    # for a continued adapter, whose start is the earlier run's adapter, not the bare base)
    fresh_lora = cfg.method.name == "lora" and cfg.model.adapter != "continue"
    frozen = None if fresh_lora else copy.deepcopy(model).eval().requires_grad_(False)
    reference = _reference(model, frozen, rl.temperature)
    trainable, total = log_parameters(model, cfg, device, dtype, threads)
    test = splits["test"][: cfg.eval.max_examples]
    with autocast(device, amp):  # the precision policy: rollouts, scoring and updates alike
        result, evals = fit_rl(
            model,
            value_head,
            reference,
            reward,
            splits["train"],
            splits["validation"],
            template,
            rl,
            cfg.train,
            cfg.optim,
            run_dir,
            device,
            show_progress,
        )
    model_dir = export_model(run_dir / "model", model, tokenizer, template, cfg, template_name)
    metrics, seconds = save_result(run_dir, result, trainable, total, model_dir, t0, summary)
    ev = None
    if cfg.eval.enabled and (test or evals.get("start")):
        ev = _evaluate(cfg, model, frozen, template, reward, test, evals, run_dir)
    report = write_run_report(run_dir)
    return TrainResult(run_dir, model_dir, metrics, summary, seconds, ev, report)


def build_reward(spec: str, args: dict, device: torch.device) -> Reward:
    """(prompts, replies) -> scores, from a strop reward run's folder or a reward function spec."""
    if strop_run(spec) is not None or Path(spec).is_dir():
        scorer = RewardScorer(Path(spec), device)
        return lambda prompts, replies: scorer(
            [
                [*p.messages, {"role": "assistant", "content": r}]
                for p, r in zip(prompts, replies, strict=True)
            ]
        )
    fn = reward_function(spec, args)
    return lambda prompts, replies: call_reward(
        fn, [p.messages[-1]["content"] for p in prompts], replies, [p.columns for p in prompts]
    )


def _reference(model, frozen, temperature: float):
    """The starting model's reply log-probs: a frozen copy's, else the model's with its adapter disabled."""
    if frozen is not None:
        return lambda batch: response_logps(frozen, batch, temperature)[0]

    def logps(batch):
        with model.disable_adapter():
            return response_logps(model, batch, temperature)[0]

    return logps


def _evaluate(
    cfg: RunConfig, model, frozen, template, reward: Reward, test: list[Prompt], evals: dict, run_dir: Path
):
    """Greedy replies of the starting and the tuned model to the test prompts (else the validation
    prompts fit_rl scored at its start and end), their mean rewards and paired samples."""
    if test:
        batch, n = cfg.train.batch_size * 4, cfg.rl.max_new_tokens
        if frozen is not None:
            start = evaluate_reward(frozen, template, test, reward, n, batch)
        else:
            with model.disable_adapter():
                start = evaluate_reward(model, template, test, reward, n, batch)
        end, split = evaluate_reward(model, template, test, reward, n, batch), "test"
    else:
        start, end, split = evals["start"], evals.get("end") or evals["latest"], "validation"
    summary = {
        "task": cfg.task,
        "set": split,
        "prompts": len(end["samples"]),
        "reward": {"start": start["reward"], "tuned": end["reward"]},
        "reply_tokens": {"start": start["reply_tokens"], "tuned": end["reply_tokens"]},
    }
    (run_dir / "eval").mkdir(exist_ok=True)
    atomic_write_json(run_dir / "eval" / "summary.json", summary)
    rows = [
        {**e, "start_reply": s["reply"], "start_reward": s["reward"]} if s else e
        for e, s in zip(
            end["samples"], start["samples"] if start else [None] * len(end["samples"]), strict=True
        )
    ]
    atomic_write_text(run_dir / "eval" / "rl_samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    log.info("eval (%d %s prompts): reward %s", summary["prompts"], split, summary["reward"])
    return summary

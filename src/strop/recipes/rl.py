"""Reinforcement learning from a reward (`task: ppo | grpo`): the policy (LoRA or any trainable set)
samples replies to the training prompts, a reward scores them (a strop reward run, a built-in, or a
Python function), and the rollout loop (`training/rl_loop.fit_rl`, which the run skeleton chooses for an
objective that needs rollouts) moves the policy toward higher reward with a KL penalty to the starting
model. task ppo trains methods/rl.PPO with a value head; task grpo the group-relative loss `rl.loss`
names (methods/rl_losses.py). With LoRA the reference is the same model with its adapter disabled (no second
copy in memory); other methods keep a frozen copy.

Run directory (as recipes/sft.py), plus eval/summary.json: mean reward of greedy replies to the test
(else validation) prompts for the starting and the tuned model, and eval/samples.jsonl with both replies.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch

from strop.core.config import RunConfig
from strop.core.io import atomic_write_json, atomic_write_text
from strop.core.rl_config import RLConfig
from strop.data.prompts import Prompt, prompt_splits
from strop.data.template import run_templates
from strop.eval.bootstrap import paired_mean_difference
from strop.eval.rewards import call_reward, reward_function
from strop.export.save import export_model
from strop.methods.reward import RewardScorer
from strop.methods.rl import RolloutObjective, ValueHead, response_logps
from strop.methods.rl_losses import objective_class, rl_objective
from strop.models.load import strop_run
from strop.recipes.skeleton import Run, Task
from strop.training.rollout import Reward, evaluate_reward

log = logging.getLogger("strop")


def _rl(cfg: RunConfig) -> RLConfig:
    assert cfg.rl is not None  # the config's validator requires the rl section for ppo and grpo
    return cfg.rl


class RLTask(Task):
    """PPO or a group-relative loss over rollouts: training and validation sets are prompts; the
    objective declares the rollouts, the reference and the value head it needs."""

    value_head: ValueHead | None = None  # PPO's critic, made with the model (the run folder's room check)
    frozen: torch.nn.Module | None = None  # the starting model, when not the model with its adapter off
    evals: dict  # the held-out reward evaluations the rollout loop writes: {"start", "end" | "latest"}

    def data(self, run: Run) -> dict:
        cfg, rl = run.cfg, _rl(run.cfg)
        self.template_name, self.template, _ = run_templates(cfg, run.tokenizer)
        self.splits, summary = prompt_splits(cfg.data, self.template, rl.max_new_tokens, cfg.train.seed)
        self.train_set, self.validation = self.splits["train"], self.splits["validation"]
        self.evals = {}
        summary["template"] = self.template_name
        self.reward = run_reward(rl, run.device)
        log.info(
            "%s: %d train / %d validation / %d test prompts (%d too long); reward %s",
            cfg.task,
            summary["train_prompts"],
            summary["validation_prompts"],
            summary["test_prompts"],
            summary["prompts_too_long"],
            rl.reward,
        )
        return summary

    def build(self, run: Run):
        model = super().build(run)
        if "value_head" in objective_class(run.cfg.task, _rl(run.cfg)).needs:
            # torch's stubs type an nn.Module's attributes Tensor | Module; this is transformers' config
            self.value_head = ValueHead(model.config.hidden_size).to(run.device)  # type: ignore[union-attr, arg-type]
        return model

    def saved(self, model):
        return torch.nn.ModuleList([model, *([self.value_head] if self.value_head else [])])

    def objective(self, run: Run, model) -> RolloutObjective:
        """The objective `task` and `rl.loss` name. Its reference is the starting policy: a fresh LoRA
        adapter switched off, else a frozen copy (also for a continued adapter, whose start is the
        earlier run's adapter, not the bare base)."""
        fresh_lora = run.cfg.method.name == "lora" and run.cfg.model.adapter != "continue"
        if not fresh_lora:  # also the starting model the evaluation compares with
            self.frozen = copy.deepcopy(model).eval().requires_grad_(False)
        return rl_objective(run.cfg.task, _rl(run.cfg), self.value_head)

    def fit_options(self, run: Run, model) -> dict:
        return {
            "reference": _reference(model, self.frozen, _rl(run.cfg).temperature),
            "reward": self.reward,
            "template": self.template,
            "rl": _rl(run.cfg),
            "evaluations": self.evals,
        }

    def export(self, run: Run, model) -> Path:
        return export_model(
            run.run_dir / "model", model, run.tokenizer, self.template, run.cfg, self.template_name
        )

    def evaluate(self, run: Run, model) -> dict | None:
        test = self.splits["test"][: run.cfg.eval.max_examples]
        if not (test or self.evals.get("start")):
            return None
        return _evaluate(
            run.cfg, model, self.frozen, self.template, self.reward, test, self.evals, run.run_dir
        )


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


def run_reward(rl: RLConfig, device: torch.device) -> Reward:
    """The run's reward: rl.reward, plus weight x each of rl.add_rewards."""
    return weighted_sum(
        [(1.0, build_reward(rl.reward, rl.reward_args, device))]
        + [(t.weight, build_reward(t.reward, t.args, device)) for t in rl.add_rewards]
    )


def weighted_sum(terms: list[tuple[float, Reward]]) -> Reward:
    """(prompts, replies) -> the sum over `terms` of weight x that reward's scores; the one reward when
    there is one term of weight 1."""
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1]

    def reward(prompts, replies):
        parts = [(w, fn(prompts, replies)) for w, fn in terms]
        return [sum(w * scores[i] for w, scores in parts) for i in range(len(replies))]

    return reward


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
        batch, n = cfg.train.batch_size * 4, _rl(cfg).max_new_tokens
        if frozen is not None:
            start = evaluate_reward(frozen, template, test, reward, n, batch)
        else:
            with model.disable_adapter():
                start = evaluate_reward(model, template, test, reward, n, batch)
        end, split = evaluate_reward(model, template, test, reward, n, batch), "test"
    else:
        start, end, split = evals["start"], evals.get("end") or evals["latest"], "validation"
    mean_reward: dict[str, Any] = {"start": start["reward"], "tuned": end["reward"]}
    same = [s["id"] for s in start["samples"]] == [e["id"] for e in end["samples"]]
    if same and end["samples"]:  # the same prompts, scored before and after
        mean_reward["gain"] = paired_mean_difference(
            [s["reward"] for s in start["samples"]], [e["reward"] for e in end["samples"]]
        )
    summary = {
        "task": cfg.task,
        "set": split,
        "prompts": len(end["samples"]),
        "reward": mean_reward,
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
    gain = mean_reward.get("gain")
    log.info(
        "eval (%d %s prompts): reward start %.4f -> tuned %.4f%s",
        summary["prompts"],
        split,
        start["reward"],
        end["reward"],
        f" (95% CI of the gain {gain['ci'][0]:+.4f} to {gain['ci'][1]:+.4f})" if gain else "",
    )
    return summary

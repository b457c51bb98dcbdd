"""`fit_rl`: the rollout loop beside `fit`, for PPO and GRPO. Per step:
sample replies -> score them -> old, reference (and value) estimates -> advantages -> `update_epochs`
passes of clipped updates in mini-batches -> adaptive KL -> log -> evaluate -> checkpoint.
As `fit` keeps the weights of the best validation loss, this keeps those of the best held-out greedy
reward (`val_reward`, every `train.eval_every` steps and at the end).

It shares the optimizer, schedule, checkpoints (resume included) and metrics sink with `fit`; the
objectives are methods/rl.py's. One step is one rollout of `prompts_per_step x group_size` replies.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from strop.core import signals
from strop.core.config import OptimConfig, TrainConfig
from strop.core.errors import TrainingStopped
from strop.core.metrics import MetricsSink
from strop.core.rl_config import RLConfig
from strop.data.prompts import Prompt, prompt_order
from strop.data.template import ChatTemplate
from strop.methods.ppo_losses import AdaptiveKLController, gae, grpo_advantages, kl_penalty_rewards, whiten
from strop.methods.rl import ValueHead, grpo_loss, ppo_loss, response_logps
from strop.training.checkpoint import (
    checkpoint_dir,
    load_weights,
    remove_partial_checkpoints,
    restore_rng,
    resume_latest,
    rng_snapshot,
    save_checkpoint,
)
from strop.training.loop import FitResult, stop_on_signal
from strop.training.optim import build_optimizer, lr_factor, set_lr
from strop.training.rollout import Reward, evaluate_reward, sample

log = logging.getLogger("strop.train")

Reference = Callable[[dict], torch.Tensor]  # batch -> the reference's reply log-probs (B, T_reply)


@signals.deferring
def fit_rl(
    policy: nn.Module,
    value_head: ValueHead | None,
    reference: Reference,
    reward: Reward,
    prompts: list[Prompt],
    val_prompts: list[Prompt],
    template: ChatTemplate,
    rl: RLConfig,
    train: TrainConfig,
    optim: OptimConfig,
    run_dir: Path,
    device: torch.device,
    show_progress: bool = True,
) -> tuple[FitResult, dict]:
    """PPO when a value head is given, else GRPO. Returns the loop's result and the held-out reward
    evaluations {"start", "end"} (greedy replies to `val_prompts[:rl.eval_prompts]`)."""
    group = rl.group_size
    policy.eval()  # no dropout in any pass: rollout, old and reference log-probs and updates agree
    n_steps = train.max_steps or max(1, math.ceil(train.epochs * len(prompts) / rl.prompts_per_step))
    modules = nn.ModuleDict({"policy": policy, **({"value_head": value_head} if value_head else {})})
    optimizer = build_optimizer(
        modules, optim.name, optim.lr, optim.weight_decay, optim.betas, optim.momentum
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_partial_checkpoints(run_dir)
    state = {
        "step": 0,
        "total_steps": n_steps,
        "finished": False,
        "kl_coef": rl.kl_coef,
        "best_step": None,
        "best_val_reward": None,
        "skipped_steps": 0,
        "bad_streak": 0,
    }
    resumed = resume_latest(run_dir, modules, optimizer)
    if resumed:
        state.update(resumed[0])
        log.info("resumed from %s (step %d of %d)", resumed[1], state["step"], n_steps)
    else:
        torch.manual_seed(train.seed)
        random.seed(train.seed)
    kl_ctl = AdaptiveKLController(state["kl_coef"], rl.target_kl, rl.kl_horizon) if rl.target_kl else None
    # with no KL penalty (and none to adapt) the reference pass is skipped and no KL is logged, as TRL
    # does for beta 0: the reference log-probs then stand in as the old ones, and every KL term is 0
    use_reference = state["kl_coef"] > 0 or kl_ctl is not None
    sink = MetricsSink(run_dir, resume_step=state["step"])
    final: dict = {}
    for record in sink.kept:  # a resumed run reports its metrics so far, even with no step left to train
        final.update(record)
    held = val_prompts[: rl.eval_prompts]
    evals: dict = {}

    def evaluate(step: int, key: str) -> bool:
        """Score the held-out prompts; True when this is the best reward of the steps trained so far
        (the start, step 0, is scored but never kept: a run that never beats it says so in its report)."""
        ev = evaluate_reward(policy, template, held, reward, rl.max_new_tokens, train.batch_size * 4)
        evals[key] = ev
        sink.log({"step": step, "val_reward": ev["reward"], "val_reply_tokens": ev["reply_tokens"]})
        best = state["best_val_reward"]
        if step == 0 or not math.isfinite(ev["reward"]) or (best is not None and ev["reward"] <= best):
            return False
        state.update(best_val_reward=ev["reward"], best_step=step)
        return True

    if held and state["step"] == 0:
        evaluate(0, "start")
    bar = tqdm(
        total=n_steps,
        initial=state["step"],
        desc=f"{'ppo' if value_head else 'grpo'}",
        unit="step",
        disable=not show_progress,
        dynamic_ncols=True,
    )
    t_start = time.perf_counter()
    while state["step"] < n_steps:
        step = state["step"]
        if signals.requested():
            stop_on_signal(run_dir, modules, optimizer, state, train.keep_last, closing=(bar, sink))
        lr = optim.lr * lr_factor(step, n_steps, optim.schedule, optim.warmup_steps)
        set_lr(optimizer, lr)
        t0, at_start = time.perf_counter(), rng_snapshot()
        picked = [
            _prompt_at(prompts, step * rl.prompts_per_step + j, train.seed)
            for j in range(rl.prompts_per_step)
        ]
        s = sample(
            policy,
            template,
            [p for p in picked for _ in range(group)],
            rl.max_new_tokens,
            rl.temperature,
            rl.top_p,
            batch_size=train.batch_size * 4,
        )
        scores = torch.tensor(reward(s.prompts, s.replies), dtype=torch.float32, device=device)  # (B,)
        unfinished = torch.tensor([not e for e in s.ended], device=device)  # (B,) cut off at max_new_tokens
        scores = scores - rl.missing_eos_penalty * unfinished.float()
        if signals.requested():  # abandon the step before any update: its rollout is drawn again
            restore_rng(at_start)
            stop_on_signal(run_dir, modules, optimizer, state, train.keep_last, closing=(bar, sink))
        batch = {k: v.to(device) for k, v in s.batch.items()}
        mask = batch["response_mask"]
        with torch.no_grad():
            old_logps, old_values = _in_chunks(
                lambda b: response_logps(policy, b, rl.temperature, value_head), batch, train.batch_size
            )
            ref_logps = (
                _in_chunks(lambda b: (reference(b), None), batch, train.batch_size)[0]
                if use_reference
                else old_logps
            )
        kl_seq = (old_logps - ref_logps).masked_fill(~mask, 0.0).sum(1)  # (B,) sampled KL per reply
        batch |= {"old_logps": old_logps, "ref_logps": ref_logps}
        if value_head is not None:
            rewards = kl_penalty_rewards(scores, old_logps, ref_logps, mask, state["kl_coef"])
            advantages, returns = gae(rewards, old_values, mask, rl.gamma, rl.lam)
            if mask.sum() > 1:
                advantages = whiten(advantages, mask)
            batch |= {"advantages": advantages, "returns": returns, "old_values": old_values}

            def objective(b):
                return ppo_loss(policy, value_head, b, rl.temperature, rl.clip, rl.value_clip, rl.vf_coef)
        else:
            batch["advantages"] = grpo_advantages(scores, group)

            def objective(b):
                return grpo_loss(policy, b, rl.temperature, rl.clip, state["kl_coef"])

        sums: dict[str, float] = {}
        updates, skipped, grad_norm = 0, 0, 0.0
        size, mini = len(s.replies), rl.mini_batch or len(s.replies)
        for _ in range(rl.update_epochs):
            order = torch.randperm(size)
            for start in range(0, size, mini):
                rows = order[start : start + mini]
                n_tokens = mask[rows].sum()
                finite = True
                for m in range(0, len(rows), train.batch_size):
                    sub = rows[m : m + train.batch_size]
                    weight = mask[sub].sum() / n_tokens  # the masked mean over the whole mini-batch
                    loss, metrics = objective(_rows(batch, sub))
                    (loss * weight).backward()
                    finite = finite and math.isfinite(loss.item())
                    for k, v in {"loss": loss.item(), **metrics}.items():
                        sums[k] = sums.get(k, 0.0) + v * float(weight)
                params = [p for p in modules.parameters() if p.grad is not None]
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, optim.grad_clip or float("inf")))
                if finite and math.isfinite(grad_norm):
                    optimizer.step()
                else:  # the same policy as fit: skip, count, warn, stop after max_bad_steps
                    skipped += 1
                optimizer.zero_grad(set_to_none=True)
                updates += 1
        _count_skipped(state, step + 1, skipped, updates, int((~torch.isfinite(scores)).sum()), train)
        if state["bad_streak"] >= train.max_bad_steps:
            bar.close()
            sink.close()
            path = save_checkpoint(run_dir, modules, optimizer, state, train.keep_last)
            raise TrainingStopped(
                f"{state['bad_streak']} consecutive steps had only non-finite updates; stopped at step "
                f"{step + 1}. Checkpoint: {path}. Lower optim.lr, check the reward for NaN, or use float32."
            )
        if kl_ctl is not None:
            state["kl_coef"] = kl_ctl.update(float(kl_seq.mean()), len(s.replies))
        state["step"] = step + 1
        record = {
            "step": step + 1,
            "reward": float(scores.mean()),
            "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
            **({"kl": float(kl_seq.mean()), "kl_coef": state["kl_coef"]} if use_reference else {}),
            "reply_tokens": sum(s.lengths) / len(s.lengths),
            "cut_off": float(unfinished.float().mean()),
            **({"skipped_updates": skipped} if skipped else {}),
            **{k: v / updates for k, v in sums.items() if use_reference or k != "kl_loss"},
            "lr": lr,
            "grad_norm": grad_norm,
            "replies_per_s": len(s.replies) / max(time.perf_counter() - t0, 1e-9),
            "elapsed_s": time.perf_counter() - t_start,
        }
        sink.log(record)
        final.update(record)
        bar.set_postfix(
            reward=f"{record['reward']:.3f}",
            kl=f"{record.get('kl', 0.0):.3f}",
            len=f"{record['reply_tokens']:.0f}",
        )
        bar.update(1)
        last = step + 1 == n_steps
        improved = False
        if held and (last or (train.eval_every and (step + 1) % train.eval_every == 0)):
            improved = evaluate(step + 1, "end" if last else "latest")
            final["val_reward"] = evals["end" if last else "latest"]["reward"]
            bar.write(f"step {step + 1}: val_reward {final['val_reward']:.4f}")
        state["finished"] = last
        if improved or last or (train.save_every and (step + 1) % train.save_every == 0):
            save_checkpoint(run_dir, modules, optimizer, state, train.keep_last)
    bar.close()
    sink.close()
    if signals.requested():  # the signal came during the last step's evaluation or save: all is saved
        stop_on_signal(run_dir, modules, optimizer, state, train.keep_last, saved=True)

    best = state["best_step"]
    if (
        best is not None
        and best != state["step"]
        and (checkpoint_dir(run_dir, best) / "state.json").is_file()
    ):
        load_weights(checkpoint_dir(run_dir, best), modules)
        final["kept_step"] = best
        log.info("kept the best weights: step %d (val_reward %.4f)", best, state["best_val_reward"])
        evals["end"] = evaluate_reward(
            policy, template, held, reward, rl.max_new_tokens, train.batch_size * 4
        )
        final["val_reward"] = evals["end"]["reward"]
    if best is not None:
        final["best_val_reward"] = state["best_val_reward"]
    return FitResult(state["step"], final, best, None, state["skipped_steps"], False), evals


def _count_skipped(state: dict, step: int, skipped: int, updates: int, bad_rewards: int, train: TrainConfig):
    """Book a step's skipped updates: a step with any counts as skipped, and one whose every update was
    skipped extends the streak that stops the run at `train.max_bad_steps`."""
    if bad_rewards:
        log.warning("step %d: the reward was NaN or infinite for %d replies", step, bad_rewards)
    if skipped:
        state["skipped_steps"] += 1
        log.warning(
            "step %d: %d of %d updates had a non-finite loss or gradient; skipped", step, skipped, updates
        )
    state["bad_streak"] = state["bad_streak"] + 1 if skipped == updates else 0


def _prompt_at(prompts: list[Prompt], k: int, seed: int) -> Prompt:
    """The k-th prompt the run draws: epochs of seeded shuffles, so resuming draws the same ones."""
    epoch, at = divmod(k, len(prompts))
    return prompts[prompt_order(len(prompts), seed, epoch)[at]]


def _rows(batch: dict, rows: torch.Tensor) -> dict:
    """The batch's rows `rows`, with the padding columns none of them uses trimmed away."""
    width = int(batch["attention_mask"][rows].sum(1).max())
    reply = int(batch["response_mask"][rows].sum(1).max())
    out = {}
    for k, v in batch.items():
        v = v[rows]
        if k in ("input_ids", "attention_mask", "labels"):
            v = v[:, :width]
        elif v.dim() == 2:
            v = v[:, :reply]
        out[k] = v
    return out


def _in_chunks(fn, batch: dict, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fn over the batch in row chunks of `size`, results re-padded to the batch's reply width."""
    n, reply = batch["input_ids"].size(0), batch["response_mask"].size(1)
    firsts, seconds = [], []
    for start in range(0, n, size):
        rows = torch.arange(start, min(start + size, n))
        a, b = fn(_rows(batch, rows))
        firsts.append(torch.nn.functional.pad(a, (0, reply - a.size(1))))
        if b is not None:
            seconds.append(torch.nn.functional.pad(b, (0, reply - b.size(1))))
    return torch.cat(firsts), (torch.cat(seconds) if seconds else None)

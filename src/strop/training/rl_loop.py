"""`fit_rl`: the rollout loop beside `fit`, for objectives that need rollouts (methods/rl.py PPO,
methods/rl_losses.py GRPO and its variants); the run skeleton chooses it from the objective's `needs`.
Per step: sample replies -> score them -> old, reference (and value) estimates -> the objective's
`prepare` (advantages) -> `update_epochs` passes of optimizer steps (training/step.py) over
mini-batches -> adaptive KL -> log -> evaluate -> checkpoint.
As `fit` keeps the weights of the best validation loss, this keeps those of the best held-out greedy
reward (`val_reward`, every `train.eval_every` steps and at the end).

It shares the optimizer step, optimizer, schedule, checkpoints (resume included) and metrics sink with
`fit`. One step is one rollout of `prompts_per_step x group_size` replies.

Reply i of step t is drawn from its own generator, seeded by (seed, t, i), so a rollout does not depend
on how its replies are batched or spread. Under N processes (core/distributed.py) each samples and
scores its contiguous 1/N of the step's prompts (whole groups, so GRPO's group baselines stay local);
the update passes walk the one permutation of the whole rollout every process draws alike, each
process back-propagating its own rows of each mini-batch, divided by the objective's count (reply
tokens or replies) of the mini-batch over all of them; gradients are summed before the step, and PPO's whitening, the KL controller and the logged
metrics see the whole rollout. So N processes give the run one process gives (up to float rounding).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from strop.core import distributed, signals
from strop.core.config import OptimConfig, TrainConfig
from strop.core.device import autocast
from strop.core.errors import ConfigError
from strop.core.rl_config import RLConfig
from strop.data.prompts import Prompt, prompt_order
from strop.data.template import ChatTemplate
from strop.methods.ppo_losses import AdaptiveKLController
from strop.methods.rl import RolloutObjective, response_logps
from strop.training.checkpoint import restore_rng, rng_snapshot
from strop.training.loop import FitResult
from strop.training.loop_state import LoopState
from strop.training.optim import build_optimizer, lr_factor, set_lr
from strop.training.rollout import Reward, evaluate_reward, sample
from strop.training.step import optimizer_step

log = logging.getLogger("strop.train")

Reference = Callable[[dict], torch.Tensor]  # batch -> the reference's reply log-probs (B, T_reply)


@signals.deferring
def fit_rl(
    policy: nn.Module,
    objective: RolloutObjective,
    prompts: list[Prompt],
    val_prompts: list[Prompt],
    train: TrainConfig,
    optim: OptimConfig,
    run_dir: Path,
    device: torch.device,
    show_progress: bool = True,
    autocast_dtype: torch.dtype | None = None,
    *,
    reference: Reference,
    reward: Reward,
    template: ChatTemplate,
    rl: RLConfig,
    evaluations: dict,
    lr_ratios: dict[str, float] | None = None,
) -> FitResult:
    """Train `policy` (and the objective's value head, when it has one) on rollouts to `prompts`; the
    precision policy's autocast covers sampling, scoring and updates alike. `reference`: the starting
    model's reply log-probs, read when the objective needs them. `evaluations` receives the held-out
    reward evaluations {"start", "end"} (greedy replies to `val_prompts[:rl.eval_prompts]`)."""
    policy.eval()  # no dropout in any pass: rollout, old and reference log-probs and updates agree
    _check_split(rl, train)
    n_steps = train.max_steps or max(1, math.ceil(train.epochs * len(prompts) / rl.prompts_per_step))
    value_head = objective.value_head  # PPO's critic, trained beside the policy
    modules = nn.ModuleDict({"policy": policy, **({"value_head": value_head} if value_head else {})})
    optimizer = build_optimizer(
        modules, optim.name, optim.lr, optim.weight_decay, optim.betas, optim.momentum, lr_ratios
    )
    counters = {"total_steps": n_steps, "kl_coef": rl.kl_coef, "best_val_reward": None, "bad_streak": 0}
    run = LoopState(
        run_dir, modules, optimizer, counters, train.seed, train.keep_last, objective.name, show_progress
    )
    state = run.state
    kl_ctl = AdaptiveKLController(state["kl_coef"], rl.target_kl, rl.kl_horizon) if rl.target_kl else None
    # with no KL penalty (and none to adapt) the objective does not need the reference: its pass is
    # skipped and no KL is logged, as TRL does for beta 0; the old log-probs stand in for it
    use_reference = "reference" in objective.needs
    held = RewardEvaluation(
        policy, template, val_prompts[: rl.eval_prompts], reward, rl, train, evaluations, autocast_dtype
    )
    if held.prompts and run.step == 0:
        held.score(run, 0, "start")

    t_start = time.perf_counter()
    while run.step < n_steps:
        step = run.step
        if signals.requested():
            run.stop_on_signal()
        lr = optim.lr * lr_factor(step, n_steps, optim.schedule, optim.warmup_steps)
        set_lr(optimizer, lr)
        t0, at_start = time.perf_counter(), rng_snapshot()
        with autocast(device, autocast_dtype):
            s, scores, unfinished = _rollout(policy, template, prompts, reward, step, rl, train, device)
        if signals.requested():  # abandon the step before any update: its rollout is drawn again
            restore_rng(at_start)
            run.stop_on_signal()
        objective.kl_coef = state["kl_coef"]
        with autocast(device, autocast_dtype):
            batch, kl_seq = _prepare(
                policy, objective, reference if use_reference else None, s, scores, train, device
            )
        sums, updates, skipped, grad_norm = _update(
            run, policy, objective, batch, rl, train, optim, autocast_dtype
        )
        scores, unfinished, kl_seq, lengths = (
            _whole(t, device) for t in (scores, unfinished.float(), kl_seq, torch.tensor(s.lengths))
        )
        if bad := int((~torch.isfinite(scores)).sum()):
            log.warning("step %d: the reward was NaN or infinite for %d replies", step + 1, bad)
        if kl_ctl is not None:
            state["kl_coef"] = kl_ctl.update(float(kl_seq.mean()), len(scores))
        state["step"] = step + 1
        run.count_skipped(skipped, updates, train.max_bad_steps)
        record = _record(
            step + 1,
            scores,
            unfinished,
            kl_seq if use_reference else None,
            lengths,
            state,
            sums,
            updates,
            skipped,
        )
        record |= {
            "lr": lr,
            "grad_norm": grad_norm,
            "replies_per_s": len(scores) / max(time.perf_counter() - t0, 1e-9),
            "elapsed_s": time.perf_counter() - t_start,
        }
        if "keep" in batch:  # dynamic sampling: the share of replies whose group was not left out
            record["kept"] = float(_whole(batch["keep"].float(), device).mean())
        run.log(record)
        kl = record.get("kl", 0.0)
        run.bar.set_postfix(
            reward=f"{record['reward']:.3f}", kl=f"{kl:.3f}", len=f"{record['reply_tokens']:.0f}"
        )
        run.bar.update(1)
        last = step + 1 == n_steps
        improved = False
        if held.prompts and (last or (train.eval_every and (step + 1) % train.eval_every == 0)):
            improved = held.score(run, step + 1, "end" if last else "latest")
        state["finished"] = last
        if improved or last or (train.save_every and (step + 1) % train.save_every == 0):
            run.save()
    run.close()
    held.keep_best(run)
    return FitResult(state["step"], run.final, state["best_step"], None, state["skipped_steps"], False)


def _record(
    step: int, scores, unfinished, kl_seq, lengths, state: dict, sums: dict, updates: int, skipped: int
) -> dict:
    """A step's metrics: rewards, KL (when there is a reference), reply lengths, the share cut off,
    skipped updates and the means of the update metrics."""
    return {
        "step": step,
        "reward": float(scores.mean()),
        "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
        **({"kl": float(kl_seq.mean()), "kl_coef": state["kl_coef"]} if kl_seq is not None else {}),
        "reply_tokens": float(lengths.float().mean()),
        "cut_off": float(unfinished.float().mean()),
        **({"skipped_updates": skipped} if skipped else {}),
        **{k: v / max(updates, 1) for k, v in sums.items() if kl_seq is not None or k != "kl_loss"},
    }


class RewardEvaluation:
    """Greedy replies to the held-out prompts, scored by the reward; keep-best on `val_reward`."""

    def __init__(
        self,
        policy,
        template,
        prompts: list[Prompt],
        reward: Reward,
        rl: RLConfig,
        train: TrainConfig,
        evals: dict,
        autocast_dtype: torch.dtype | None,
    ):
        self.policy, self.template, self.prompts, self.reward = policy, template, prompts, reward
        self.autocast_dtype = autocast_dtype
        self.max_new_tokens, self.batch_size = rl.max_new_tokens, train.batch_size * 4
        self.evals = evals  # {"start", "end" | "latest"}: filled here, read by the task's evaluation

    def evaluate(self) -> dict:
        with autocast(next(self.policy.parameters()).device, self.autocast_dtype):
            return evaluate_reward(
                self.policy, self.template, self.prompts, self.reward, self.max_new_tokens, self.batch_size
            )

    def keep_best(self, run: LoopState) -> None:
        """The best step's weights when it was not the last, scored again as the end."""
        if run.keep_best("val_reward"):
            run.final["kept_step"] = run.state["best_step"]
            self.evals["end"] = self.evaluate()
            run.final["val_reward"] = self.evals["end"]["reward"]
        if run.state["best_step"] is not None:
            run.final["best_val_reward"] = run.state["best_val_reward"]

    def score(self, run: LoopState, step: int, key: str) -> bool:
        """Score and log; True when this is the best reward of the steps trained so far (the start, step
        0, is scored but never kept: a run that never beats it says so in its report)."""
        ev = self.evals[key] = self.evaluate()
        run.sink.log({"step": step, "val_reward": ev["reward"], "val_reply_tokens": ev["reply_tokens"]})
        if step:
            run.final["val_reward"] = ev["reward"]
            run.bar.write(f"step {step}: val_reward {ev['reward']:.4f}")
        best = run.state["best_val_reward"]
        if step == 0 or not math.isfinite(ev["reward"]) or (best is not None and ev["reward"] <= best):
            return False
        run.state.update(best_val_reward=ev["reward"], best_step=step)
        return True


def _rollout(policy, template, prompts, reward: Reward, step: int, rl: RLConfig, train: TrainConfig, device):
    """Step `step`'s prompts (this process's share), `group_size` sampled replies each, and their
    rewards (B,), with `missing_eos_penalty` off those cut at `max_new_tokens` (B,) bool."""
    world = distributed.WORLD
    share = rl.prompts_per_step // world.size
    first = world.rank * share
    picked = [
        _prompt_at(prompts, step * rl.prompts_per_step + j, train.seed) for j in range(first, first + share)
    ]
    s = sample(
        policy,
        template,
        [p for p in picked for _ in range(rl.group_size)],
        rl.max_new_tokens,
        rl.temperature,
        rl.top_p,
        batch_size=train.batch_size * 4,
        seeds=[
            _reply_seed(train.seed, step, first * rl.group_size + i) for i in range(share * rl.group_size)
        ],
    )
    scores = torch.tensor(reward(s.prompts, s.replies), dtype=torch.float32, device=device)  # (B,)
    unfinished = torch.tensor([not e for e in s.ended], device=device)  # (B,)
    return s, scores - rl.missing_eos_penalty * unfinished.float(), unfinished


def _prepare(policy, objective: RolloutObjective, reference, s, scores, train: TrainConfig, device):
    """The rollout as an update batch: old (and reference) log-probs, the value estimates of a value
    head, and what the objective prepares from the rewards (advantages, ...); and the sampled KL per
    reply (B,) to the reference (0 without one)."""
    batch = {k: v.to(device) for k, v in s.batch.items()}
    mask = batch["response_mask"]
    with torch.no_grad():
        old_logps, old_values = _in_chunks(
            lambda b: response_logps(policy, b, objective.temperature, objective.value_head),
            batch,
            train.batch_size,
        )
        ref_logps = old_logps
        if reference is not None:
            ref_logps = _in_chunks(lambda b: (reference(b), None), batch, train.batch_size)[0]
    kl_seq = (old_logps - ref_logps).masked_fill(~mask, 0.0).sum(1)  # (B,) sampled KL per reply
    batch |= {"old_logps": old_logps, "ref_logps": ref_logps}
    if old_values is not None:
        batch["old_values"] = old_values
    lengths = torch.tensor(s.lengths, device=device)
    return batch | objective.prepare(batch, scores, kl_seq, lengths), kl_seq


def _update(
    run: LoopState,
    policy: nn.Module,
    objective: RolloutObjective,
    batch: dict,
    rl: RLConfig,
    train: TrainConfig,
    optim: OptimConfig,
    autocast_dtype: torch.dtype | None,
):
    """`update_epochs` passes over shuffled mini-batches of the rollout, each one optimizer step
    (training/step.py) over micro-batches of `train.batch_size` rows: the mean over the mini-batch's
    units of every process. Returns (sums over updates of their mean loss and statistics, updates,
    skipped updates, last grad norm)."""
    mask = batch["response_mask"]
    device = mask.device
    world = distributed.WORLD
    sums: dict[str, float] = {}
    updates, skipped, grad_norm = 0, 0, 0.0
    local = mask.size(0)
    size = local * world.size  # the whole rollout; this process holds rows [offset, offset + local)
    offset = world.rank * local
    mini = rl.mini_batch or size
    for _ in range(rl.update_epochs):
        order = torch.randperm(size)  # the same on every process: their generators are in step
        for start in range(0, size, mini):
            rows = order[start : start + mini]
            rows = rows[(rows >= offset) & (rows < offset + local)] - offset  # this process's rows of it
            micro: list[tuple[dict, int] | None] = [
                (_rows(batch, sub), int(mask[sub].sum()))
                for sub in (rows[m : m + train.batch_size] for m in range(0, len(rows), train.batch_size))
            ]
            done = optimizer_step(
                run,
                policy,
                objective,
                micro or [None],  # an empty share still joins the sums over processes
                device,
                optim.grad_clip,
                autocast_dtype,
                train.release_memory,
                filler=lambda: _rows(batch, torch.arange(1)),
                interruptible=False,  # a stop signal waits for the step's end: a rollout is not split
            )
            if done.count == 0:  # every reply of the mini-batch was left out (dynamic sampling)
                continue
            for k, v in {"loss": done.loss * done.count, **done.stats}.items():
                sums[k] = sums.get(k, 0.0) + v / max(done.count, 1)
            skipped += not done.taken
            grad_norm = done.grad_norm
            updates += 1
    return sums, updates, skipped, grad_norm


def _check_split(rl: RLConfig, train: TrainConfig) -> None:
    world = distributed.WORLD
    if not world.active:
        return
    if train.parallel == "fsdp":
        raise ConfigError(
            "train.parallel: fsdp is not built for ppo/grpo (every sampled token would gather the "
            "weights); use train.parallel: ddp"
        )
    if rl.prompts_per_step % world.size:
        raise ConfigError(
            f"rl.prompts_per_step: {rl.prompts_per_step} prompts per step cannot be shared by {world.size} "
            f"processes; make it a multiple of {world.size}"
        )


def _reply_seed(seed: int, step: int, i: int) -> int:
    """The seed of reply i of step `step`'s rollout: its draws depend on nothing else."""
    return (seed * 1_000_003 + step) * 100_003 + i


def _whole(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A per-reply tensor of this process's replies (B_local,) as that of the whole rollout (B,), on
    every process (each places its rows, the rest zeros, and the sum is the whole)."""
    world = distributed.WORLD
    if not world.active:
        return t
    n = t.numel()
    full = [0.0] * (n * world.size)
    full[world.rank * n : (world.rank + 1) * n] = t.double().tolist()
    return torch.tensor(distributed.sum_floats(full, device), dtype=t.dtype, device=t.device)


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

"""The one run skeleton every task trains through (`run_task`):

    start (config, rerun refusal, threads, device, dtype) -> tokenizer -> task.data -> seed ->
    task.build (load -> keep_layers -> method -> gradient checkpointing -> precision, models/build.py)
    -> open the run folder (config.yaml, data_summary.json) -> parameter log -> task.objective ->
    task.fit (the loop the objective needs: `fit`, or the rollout loop for one that declares rollouts;
    accumulation, clipping, keep-best, checkpoints, signals) -> task.export ->
    result.json -> task.evaluate -> report

A task (recipes/sft.py, classify.py, preference.py, feedback.py, rl.py) supplies only its data, its
objective (methods/objective.py) and its export and evaluation specifics, as a `Task` subclass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from strop.core import distributed, tracking
from strop.core.config import RunConfig
from strop.core.errors import Interrupted
from strop.data.read import check_sources
from strop.methods.objective import Objective
from strop.methods.rl import RolloutObjective
from strop.models.build import build_causal_lm
from strop.models.load import load_tokenizer, tokenizer_source
from strop.recipes.lifecycle import TrainResult, log_parameters, save_result, start_run, write_run_report
from strop.recipes.run_folder import open_run_folder
from strop.training.loop import FitResult, fit
from strop.training.rl_loop import fit_rl
from strop.training.sharding import gather_into, model_is_sharded


@dataclass
class Run:
    """What the skeleton has resolved, handed to every hook."""

    cfg: RunConfig
    device: torch.device
    dtype: torch.dtype
    threads: int
    show_progress: bool
    tokenizer: Any = None
    amp: torch.dtype | None = None  # the autocast dtype of the precision policy (models/build.py)

    @property
    def run_dir(self):
        return self.cfg.run_dir

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


class Task:
    """A task's part of a run. `data` builds and keeps the task's data (train/validation sets and
    whatever its evaluation needs) and returns the data summary; the other hooks have defaults for a
    causal LM trained by the loop on `self.train_set` / `self.validation`."""

    causal_lm = True  # which tokenizer (and default model) the task loads
    train_set: Any = None
    validation: Any = None

    def data(self, run: Run) -> dict:
        raise NotImplementedError

    def build(self, run: Run) -> torch.nn.Module:
        model, run.amp = build_causal_lm(run.cfg, run.device, run.dtype)
        return model

    def saved(self, model: torch.nn.Module) -> torch.nn.Module:
        """What a checkpoint holds, for the run folder's room check (RL adds its value head)."""
        return model

    def objective(self, run: Run, model: torch.nn.Module) -> Objective | RolloutObjective:
        """Called once the run folder exists: the place for work kept in it (reference log-probs)."""
        raise NotImplementedError

    def fit(self, run: Run, model: torch.nn.Module, objective: Objective | RolloutObjective) -> FitResult:
        """The loop the objective's `needs` call for: the rollout loop for one that learns from replies
        sampled as it trains (`self.train_set`, `self.validation`: prompts), else `fit`."""
        cfg = run.cfg
        if "rollouts" in objective.needs:
            assert isinstance(objective, RolloutObjective)  # what declares rollouts (methods/rl.py)
            return fit_rl(
                model,
                objective,
                self.train_set,
                self.validation,
                cfg.train,
                cfg.optim,
                run.run_dir,
                run.device,
                run.show_progress,
                autocast_dtype=run.amp,
                lr_ratios=lr_ratios(cfg),
                **self.fit_options(run, model),
            )
        assert not isinstance(objective, RolloutObjective)
        return fit(
            model,
            objective,
            self.train_set,
            self.validation,
            cfg.train,
            cfg.optim,
            run.run_dir,
            run.pad_id,
            run.device,
            run.show_progress,
            autocast_dtype=run.amp,
            lr_ratios=lr_ratios(cfg),
            **self.fit_options(run, model),
        )

    def fit_options(self, run: Run, model: torch.nn.Module) -> dict:
        """Further arguments of the loop: `training.loop.fit` (SFT: curriculum, validation groups,
        monitors), or `training.rl_loop.fit_rl` (RL: the reward, the reference, the template)."""
        return {}

    def export(self, run: Run, model: torch.nn.Module):
        raise NotImplementedError

    def evaluate(self, run: Run, model: torch.nn.Module) -> dict | None:
        """After export and result.json, when eval.enabled: the held-out evaluation (eval/summary.json).
        Scoring passes run under `autocast(run.device, run.amp)`, as the loop's validation did."""
        return None


def run_task(task: Task, config: RunConfig, show_progress: bool = True) -> TrainResult:
    t0 = time.time()
    cfg, threads, device, dtype = start_run(config)
    world = distributed.WORLD
    run = Run(cfg, device, dtype, threads, show_progress)
    check_sources([*cfg.data.train, *cfg.data.validation, *cfg.data.test])
    tracking.check(cfg.train.report_to)
    source = tokenizer_source(cfg.model.name, causal_lm=task.causal_lm)
    run.tokenizer = load_tokenizer(source, cfg.model.trust_remote_code)
    summary = task.data(run)

    torch.manual_seed(cfg.train.seed)  # newly initialised weights (LoRA, heads) depend on the seed only
    model = task.build(run)
    if world.main:  # only once the model and data are known to be good
        open_run_folder(cfg, summary, task.saved(model))
        tracking.start(cfg.train.report_to, cfg.run_dir, cfg.name, cfg.model_dump(mode="json"))
    distributed.barrier()
    try:
        return _train_and_finish(task, run, model, summary, t0)
    except BaseException as e:
        tracking.finish(None, "KILLED" if isinstance(e, KeyboardInterrupt | Interrupted) else "FAILED")
        raise


def _train_and_finish(task: Task, run: Run, model, summary: dict, t0: float) -> TrainResult:
    cfg, world = run.cfg, distributed.WORLD
    device, dtype, threads = run.device, run.dtype, run.threads
    trainable, total = log_parameters(model, cfg, device, dtype, threads)
    objective = task.objective(run, model)
    result = task.fit(run, model, objective)
    if model_is_sharded(model):  # rank 0 exports and evaluates a whole model of the gathered weights
        whole = task.build(run) if world.main else None
        gather_into(model, whole)
        model = whole  # None on the other processes, which return below
    if not world.main:  # rank 0 exports, evaluates and reports; the weights are the same everywhere
        return TrainResult(cfg.run_dir, cfg.run_dir / "model", result.final, summary, time.time() - t0)

    model_dir = task.export(run, model)
    metrics, seconds = save_result(cfg.run_dir, result, trainable, total, model_dir, t0, summary)
    evaluation = task.evaluate(run, model) if cfg.eval.enabled else None
    report = write_run_report(cfg.run_dir)
    tracking.finish(evaluation)
    return TrainResult(cfg.run_dir, model_dir, metrics, summary, seconds, evaluation, report)


def lr_ratios(cfg: RunConfig) -> dict[str, float] | None:
    """LoRA+ (method.lora.lr_ratio): the B matrices learn faster than the rest."""
    ratio = cfg.method.lora.lr_ratio if cfg.method.name == "lora" else None
    return {"lora_B": ratio} if ratio else None

"""`strop quickstart | train | tune`: the commands that run fine-tuning jobs."""

from __future__ import annotations

import shlex
import sys

from strop.cli.configs import config_path
from strop.cli.options import overrides_arg, positive_int
from strop.core.errors import StropError


def register(sub) -> None:
    q = sub.add_parser(
        "quickstart",
        help="the default job: LoRA-tune the default model on shipped data, then show base vs tuned answers",
        description=(
            "LoRA-tunes smollm2-135m-instruct on 240 shipped examples written in a pirate "
            "voice, then prints the base and tuned models' answers to held-out prompts."
        ),
    )
    overrides_arg(q)
    q.set_defaults(handler=_quickstart)

    t = sub.add_parser(
        "train",
        help="run a fine-tuning job from a YAML config",
        description="Run the job a YAML config describes, whatever its task (sft, classification, "
        "reward, dpo, ppo, grpo; see `strop configs`). "
        "A run directory that already holds a checkpoint is resumed automatically.",
    )
    t.add_argument("config", nargs="?", help="YAML config file or the name of a shipped config")
    overrides_arg(t)
    t.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint (uses RUN_DIR/config.yaml)",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    dist = t.add_argument_group(
        "several processes (torch.distributed; the same run as one process at the same global batch)"
    )
    dist.add_argument(
        "--nproc",
        type=positive_int,
        help="processes on this machine (one per GPU; on CPU they share the cores)",
    )
    dist.add_argument("--nnodes", type=positive_int, default=1, help="machines taking part (default 1)")
    dist.add_argument(
        "--node-rank", type=int, help="this machine's number, 0..nnodes-1 (0 hosts --rdzv-endpoint)"
    )
    dist.add_argument(
        "--rdzv-endpoint", metavar="HOST:PORT", help="where the machines meet (the same on every one)"
    )
    t.set_defaults(handler=_train)

    tu = sub.add_parser(
        "tune",
        help="search hyperparameters (Optuna): trials as ordinary runs, poor ones pruned early",
        description="Search the config's `search:` section (or --space): each trial is a strop run in "
        "RUN_DIR/trials/NNN, in its own process, scored on the validation set; trials whose validation "
        "loss lags are pruned. Writes RUN_DIR/best.yaml and a study report. Running the same command "
        "again resumes the study (finished trials are kept).",
    )
    tu.add_argument("config", help="YAML config file or the name of a shipped config")
    overrides_arg(tu)
    tu.add_argument(
        "--trials", type=positive_int, help="finished trials the study should hold (search.trials)"
    )
    tu.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="KEY=SPEC",
        help="a dimension, as YAML: 'optim.lr={low: 1e-5, high: 1e-3, log: true}' or "
        "'method.lora.r=[4, 8, 16]' (repeatable; adds to or replaces search.space keys)",
    )
    tu.add_argument("--objective", help="val_loss (default), a val_* metric or an evaluation metric")
    tu.add_argument("--direction", choices=["minimize", "maximize"], help="default: from the objective")
    tu.add_argument("--sampler", choices=["tpe", "random", "grid"], help="default: tpe")
    tu.add_argument("--pruner", choices=["median", "hyperband", "none"], help="default: median")
    tu.add_argument("--workers", type=positive_int, help="trials run in parallel by this process")
    tu.add_argument(
        "--storage",
        help="the study's storage: sqlite:///PATH, postgresql://..., or journal:PATH to share a study "
        "between processes or machines (default: RUN_DIR/study.db)",
    )
    tu.add_argument(
        "--refit",
        action="store_true",
        help="then retrain the best and the default config, compared on data.test",
    )
    tu.add_argument("--no-progress", action="store_true", help="no progress bar")
    tu.set_defaults(handler=_tune)


def _quickstart(args) -> int:
    from strop.recipes.quickstart import run_quickstart

    run_quickstart(args.overrides)
    return 0


def _train(args) -> int:
    from pathlib import Path

    from strop.core.config import load_config

    overrides = list(args.overrides)
    if args.resume and args.config:
        raise StropError(
            f"strop train: give a CONFIG or --resume RUN_DIR, not both (--resume uses {args.resume}/config.yaml)"
        )
    config: str | Path
    if args.resume:
        config = Path(args.resume) / "config.yaml"
        if not config.is_file():
            raise StropError(f"--resume {args.resume}: no config.yaml there (not a strop run directory)")
        # continue in RUN_DIR itself, also when the run was moved or copied after it started
        import json

        run = Path(args.resume).expanduser().resolve()
        from strop.core.config import FOLDER_NAME

        if not FOLDER_NAME.fullmatch(run.name) or ".." in run.name:
            raise StropError(
                f"--resume {args.resume}: the folder's name {run.name!r} is not a run name (letters, digits, "
                "'.', '_' and '-', starting with a letter or digit); rename the folder, then resume it"
            )
        _require_checkpoint(run)
        overrides += [f"output_dir={json.dumps(str(run.parent))}", f"name={json.dumps(run.name)}"]
    elif args.config:
        config = config_path(args.config)
    else:
        raise StropError("strop train: give a CONFIG file or --resume RUN_DIR")
    from strop.core import distributed
    from strop.recipes.run import train

    cfg = load_config(config, overrides)
    command = "strop " + shlex.join(args.argv)
    if (args.nproc or args.nnodes > 1) and not distributed.WORLD.active:
        from strop.cli.launch import launch

        return launch(args.nproc or 1, args.nnodes, args.node_rank, args.rdzv_endpoint, args.argv)
    result = train(cfg, show_progress=not args.no_progress, command=command)
    if not distributed.WORLD.main:
        return 0  # rank 0 prints the result
    if isinstance(result, list):
        for stage, r in zip(cfg.stages, result, strict=True):
            print(f"stage {stage.name}:")
            _print_result(r)
        print(f"stages summary: {result[-1].run_dir.parent / 'stages.json'}")
    else:
        _print_result(result)
    return 0


def _require_checkpoint(run) -> None:
    """--resume continues from a checkpoint; a run stopped before its first one has none to continue,
    unless it kept work a new start reuses (DPO's reference log-probs)."""
    from strop.recipes.run_folder import reusable_work
    from strop.training.checkpoint import list_checkpoints

    if any(list_checkpoints(d) for d in (run, *run.glob("*/"))):
        return
    kept = reusable_work(run)
    if kept:
        print(
            f"{run}: no checkpoint yet; training starts at step 0, reusing {', '.join(kept)}", file=sys.stderr
        )
        return
    raise StropError(
        f"--resume {run}: the run holds no checkpoint (it stopped before its first save), so there is "
        f"nothing to resume; start it again with `strop train {run / 'config.yaml'}`"
    )


def _print_result(result) -> None:
    m = result.metrics
    parts = [f"loss {m.get('loss', float('nan')):.4f}"]
    if m.get("val_loss") is not None:
        parts.append(f"val_loss {m['val_loss']:.4f} (best {m['best_val_loss']:.4f} at step {m['best_step']})")
    print(f"done in {result.seconds:.0f} s, {m['steps']} steps: {', '.join(parts)}")
    print(f"run directory: {result.run_dir}\nmodel: {result.model_dir}")


def _tune(args) -> int:
    from strop.core.config import load_config
    from strop.tune.search import tune
    from strop.tune.settings import search_settings

    cfg = load_config(config_path(args.config), list(args.overrides))
    result = tune(cfg, search_settings(cfg, args), refit=args.refit, show_progress=not args.no_progress)
    counts = result.counts
    print(
        f"trials: {counts.get('complete', 0)} complete, {counts.get('pruned', 0)} pruned, "
        f"{counts.get('fail', 0)} failed"
    )
    if result.best:
        b = result.best
        print(
            f"best: trial {b['number']:03d}, value {b['value']:.6g}: "
            + ", ".join(f"{k}={v}" for k, v in b["params"].items())
        )
        print(f"best config: {result.best_config}")
    if result.refit:
        for m in result.refit["metrics"]:
            gain = m.get("best_vs_default")
            ci = (
                f" (best - default {gain['diff']:+.4f}, 95% CI {gain['ci'][0]:+.4f} to {gain['ci'][1]:+.4f})"
                if gain
                else ""
            )
            print(f"test {m['name']}: default {m['default']:.4f}, best {m['best']:.4f}{ci}")
    if result.report:
        print(f"report: {result.report}")
    return 0

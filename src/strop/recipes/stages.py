"""Sequential fine-tuning: stages that each start from the previous stage's result (say general ->
medical -> a sub-specialty), each with its own data and hyperparameters, optionally replaying a share
of earlier stages' training data to limit forgetting (as in continual-learning "experience replay").

Run directory:
    config.yaml   the whole pipeline as given
    stages.json   per stage: its run folder, how it started, metrics, and the forgetting table
    <stage>/      an ordinary run directory per stage (recipes/sft.py); the last stage's model/ is the result

A stage with `start: merged` loads the previous stage's model with any LoRA adapter folded in and
applies its own method afresh; `start: adapter` trains the previous stage's LoRA adapter further.
Every earlier stage's validation set is scored during a stage as `val_loss/stage:NAME` (never used to
pick checkpoints), so the forgetting of each earlier task shows in metrics.jsonl and the report.
Running the same config again continues where it stopped: finished stages are skipped, an
interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from strop.core.config import RunConfig, load_config, stage_configs, to_yaml
from strop.core.io import atomic_write_json, atomic_write_text
from strop.recipes.lifecycle import TrainResult
from strop.recipes.run_folder import note_created
from strop.recipes.sft import train

log = logging.getLogger("strop")


def train_stages(
    config: RunConfig | dict | str | Path, overrides: list[str] | None = None, show_progress: bool = True
) -> list[TrainResult]:
    """Train every stage in order; returns one TrainResult per stage (the last holds the final model)."""
    if isinstance(config, RunConfig):
        config = config.model_dump(mode="json") if overrides else config
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    cfg = cfg.model_copy(update={"output_dir": str(Path(cfg.output_dir).expanduser().resolve())})
    stages = stage_configs(cfg)
    if not cfg.run_dir.exists():
        cfg.run_dir.mkdir(parents=True)
        note_created(cfg.run_dir)
    atomic_write_text(cfg.run_dir / "config.yaml", to_yaml(cfg))

    results: list[TrainResult] = []
    for i, (stage, scfg) in enumerate(zip(cfg.stages, stages, strict=True)):
        done = _finished(scfg.run_dir)
        if done is not None:
            log.info("stage %d/%d %s: already finished in %s", i + 1, len(stages), stage.name, scfg.run_dir)
            results.append(done)
        else:
            log.info(
                "stage %d/%d %s: from %s%s",
                i + 1,
                len(stages),
                stage.name,
                scfg.model.name if i else cfg.model.name,
                f" ({stage.start}), replaying {stage.replay:.0%} earlier data" if i else "",
            )
            results.append(train(scfg, show_progress=show_progress, earlier=stages[:i], replay=stage.replay))
        atomic_write_json(cfg.run_dir / "stages.json", summarize(cfg, results))
    return results


def summarize(cfg: RunConfig, results: list[TrainResult]) -> dict:
    """Each finished stage, and the forgetting table: at the end of each stage (rows), the validation
    loss on each stage's own validation set seen so far (columns)."""
    stages, table = [], {}
    for stage, r in zip(cfg.stages, results, strict=False):
        m = r.metrics
        stages.append(
            {
                "name": stage.name,
                "run_dir": str(r.run_dir),
                "model_dir": str(r.model_dir),
                "start": stage.start,
                "replay": r.data.get("replay"),
                "steps": m.get("steps"),
                "train_examples": r.data.get("train_examples"),
                "val_loss": m.get("val_loss"),
                "best_val_loss": m.get("best_val_loss"),
                "seconds": round(r.seconds, 1),
            }
        )
        table[stage.name] = {
            **{k.removeprefix("val_loss/stage:"): v for k, v in m.items() if k.startswith("val_loss/stage:")},
            stage.name: m.get("val_loss"),
        }
    return {"stages": stages, "validation_loss_after_each_stage": table, "model_dir": stages[-1]["model_dir"]}


def _finished(run_dir: Path) -> TrainResult | None:
    """The result of a stage that has trained and exported its model, else None."""
    result = run_dir / "result.json"
    if not (result.is_file() and (run_dir / "model" / "strop_model.json").is_file()):
        return None
    saved = json.loads(result.read_text())
    return TrainResult(run_dir, Path(saved["model_dir"]), saved["metrics"], saved["data"], saved["seconds"])

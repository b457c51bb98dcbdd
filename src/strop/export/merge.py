"""Fold a LoRA adapter into its base model and write a plain transformers model folder (atomically). A
folder that is not empty is replaced only with `force`, and never when it is the run itself or a strop
run's own model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from strop.core.errors import StropError
from strop.core.io import atomic_dir
from strop.models.load import load_model, load_tokenizer, read_run_model


def merge(
    run_or_model_dir: str | Path, out_dir: str | Path, force: bool = False, option: str = "--out"
) -> Path:
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise StropError(f"{option}: {out_dir} is a file; choose a new folder for the merged model")
    earlier = read_run_model(out) if out.is_dir() else None
    if earlier and not earlier.get("merged_from"):
        raise StropError(
            f"{option}: {out_dir}: folder exists and is the model of a strop run; choose a new folder for "
            "the merged model"
        )
    if out.is_dir() and any(out.iterdir()) and not force:
        raise StropError(f"{option}: {out_dir} exists and is not empty; pass --force to replace it")
    run = read_run_model(Path(run_or_model_dir))
    if run is None:
        raise StropError(f"{run_or_model_dir}: not a strop run or model folder (no model/strop_model.json)")
    if run["method"] != "lora":
        raise StropError(
            f"{run_or_model_dir}: method {run['method']!r} already saved a full model in "
            f"{run['dir']}; there is no adapter to merge"
        )
    if out == Path(run["dir"]).resolve() or out in Path(run["dir"]).resolve().parents:
        raise StropError(
            f"{option}: {out_dir}: the merged model must go to a new folder, not into the run itself"
        )
    merged = load_model(run["dir"], torch.device("cpu"), torch.float32, adapter="merge")
    tok = load_tokenizer(run["dir"])

    def fill(tmp: Path) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        # the run's folder name, not its path on this machine: the merged folder is made to be moved
        meta = {
            **{k: v for k, v in run.items() if k != "dir"},
            "method": "full",
            "merged_from": Path(run["dir"]).parent.name,
        }
        (tmp / "strop_model.json").write_text(json.dumps(meta, indent=2))

    return atomic_dir(Path(out_dir), fill)

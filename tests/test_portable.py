"""What leaves the machine names a catalogue model by its public hub id, not this machine's cache path,
and a run folder moved elsewhere still loads (offline)."""

from __future__ import annotations

import json
import shutil

import torch

from conftest import ALPACA_ROWS, tiny_config, write_jsonl
from strop.models.catalogue import CATALOGUE, Entry

HUB_ID = "example-org/Tiny-Llama-Instruct"


def catalogue_model(monkeypatch, folder) -> str:
    """A catalogue entry whose prepared folder is the tiny model (as the packaged SmolLM2's cache is)."""
    monkeypatch.setitem(
        CATALOGUE, "tiny-cat", Entry("tiny-cat", "x", "x", "x", "hf_dir", "tiny", hub_id=HUB_ID)
    )
    monkeypatch.setattr("strop.models.load.pull", lambda name: folder)
    return "tiny-cat"


def test_a_moved_lora_run_names_its_base_by_hub_id_and_still_loads(tiny_llama, tmp_path, monkeypatch, capsys):
    from strop.cli.main import main
    from strop.models.inference import load_for_inference
    from strop.recipes.run import train

    name = catalogue_model(monkeypatch, str(tiny_llama))
    cfg = tiny_config(tiny_llama, write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS), tmp_path / "runs")
    cfg["model"]["name"] = name
    run = train(cfg, show_progress=False)
    conversation = [{"role": "user", "content": "What is 3 times 4?"}]
    before = load_for_inference(str(run.run_dir), device="cpu")
    ids = torch.tensor([before.template.prompt_ids(conversation)])
    with torch.no_grad():
        want = before.model(ids).logits

    adapter = json.loads((run.model_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == HUB_ID
    strop_meta = json.loads((run.model_dir / "strop_model.json").read_text())
    assert strop_meta["base_model"] == name and strop_meta["base_model_hub_id"] == HUB_ID
    for file in run.model_dir.iterdir():  # nothing in the model folder points at this machine's folders
        if file.suffix in (".json", ".md"):
            assert str(tiny_llama) not in file.read_text(), file.name

    moved = tmp_path / "elsewhere" / "my-run"
    shutil.move(str(run.run_dir), moved)
    after = load_for_inference(str(moved), device="cpu")
    with torch.no_grad():
        assert torch.allclose(after.model(ids).logits, want, atol=1e-6)

    merged = tmp_path / "merged"
    assert main(["-q", "export", str(moved), "--format", "hf", "--out", str(merged)]) == 0
    meta = json.loads((merged / "strop_model.json").read_text())
    assert meta["merged_from"] == "my-run" and meta["base_model_hub_id"] == HUB_ID
    for file in merged.iterdir():
        if file.suffix in (".json", ".md"):
            assert str(tmp_path) not in file.read_text(), file.name

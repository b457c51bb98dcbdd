"""Knowledge distillation: the KD term equals a hand-computed KL, the chunked LM version equals the
plain full-logits computation (values and gradients), a student cut to fewer blocks trains from a
teacher and reloads, and a teacher with another tokenizer is refused."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_config
from strop.core.errors import ConfigError
from strop.methods import distill, sft
from strop.models.load import load_model
from strop.models.trainable import keep_blocks


def test_kd_divergence_is_t_squared_kl_by_hand():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[0.0, 3.0, 1.0]])
    T = 2.0
    ps = [math.exp(x / T) for x in (1.0, 2.0, 0.5)]
    pt = [math.exp(x / T) for x in (0.0, 3.0, 1.0)]
    ps = [x / sum(ps) for x in ps]
    pt = [x / sum(pt) for x in pt]
    kl = sum(p * math.log(p / q) for p, q in zip(pt, ps, strict=True))
    assert distill.kd_divergence(s, t, T).item() == pytest.approx(T * T * kl, rel=1e-6)
    assert distill.kd_divergence(t, t, T).item() == pytest.approx(0.0, abs=1e-7)


def batch(tokenizer):
    ids = torch.tensor([[3, 10, 11, 12, 13, 14, 15, 16], [3, 20, 21, 22, 23, 24, 0, 0]])
    labels = ids.clone()
    labels[:, :3] = -100  # prompt
    labels[1, 6:] = -100  # padding
    mask = (labels != -100) | (torch.arange(8) < 3)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask.long()}


def reference(student, teacher, b, T, alpha):
    """Full logits, no chunks: what the KD loss means."""
    keep = b["labels"][:, 1:] != -100
    s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1][keep]
    with torch.no_grad():
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1][keep]
    hard = torch.nn.functional.cross_entropy(s, b["labels"][:, 1:][keep], reduction="sum")
    soft = (
        T
        * T
        * torch.nn.functional.kl_div(
            torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1), log_target=True, reduction="sum"
        )
    )
    return alpha * soft + (1 - alpha) * hard


def student_and_teacher(model_dir):
    """The tiny model, and a frozen copy with slightly moved weights as its teacher."""
    student = load_model(str(model_dir), torch.device("cpu"), torch.float32)
    teacher = load_model(str(model_dir), torch.device("cpu"), torch.float32).requires_grad_(False)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student, teacher


def test_chunked_lm_kd_equals_full_logits_values_and_gradients(tiny_llama, tokenizer, monkeypatch):
    monkeypatch.setattr(distill, "CHUNK", 3)  # three chunks over 8 label tokens
    student, teacher = student_and_teacher(tiny_llama)
    b = batch(tokenizer)
    got, n = distill.lm_loss(student, b, teacher, temperature=2.0, alpha=0.7)
    got.backward()
    grads = {k: p.grad.clone() for k, p in student.named_parameters()}
    student.zero_grad()
    want = reference(student, teacher, b, 2.0, 0.7)
    want.backward()
    assert n == 8 and got.item() == pytest.approx(want.item(), rel=1e-5)
    for k, p in student.named_parameters():
        assert torch.allclose(grads[k], p.grad, atol=1e-5), k


def test_alpha_zero_is_the_ordinary_loss_and_a_self_teacher_adds_nothing(tiny_llama, tokenizer):
    model = load_model(str(tiny_llama), torch.device("cpu"), torch.float32)
    b = batch(tokenizer)
    plain, n = sft.loss(model, b)
    hard_only, _ = distill.lm_loss(model, b, model, temperature=2.0, alpha=0.0)
    soft_only, _ = distill.lm_loss(model, b, model, temperature=2.0, alpha=1.0)
    assert hard_only.item() == pytest.approx(plain.item(), rel=1e-6)
    assert soft_only.item() == pytest.approx(0.0, abs=1e-5)


def test_keep_blocks_keeps_first_and_last_and_renumbers(tiny_llama):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=5,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    originals = list(model.model.layers)
    keep_blocks(model, 3)
    assert [originals.index(b) for b in model.model.layers] == [0, 2, 4]
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2]
    assert model.config.num_hidden_layers == 3
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)  # the KV cache works
    assert out.shape == (1, 7)
    with pytest.raises(ConfigError, match="keep_layers"):
        keep_blocks(model, 3)


def test_a_cut_student_distils_from_a_teacher_run_and_reloads(tiny_llama, alpaca_file, tmp_path):
    from strop.recipes.run import train

    teacher = train(tiny_config(tiny_llama, alpaca_file, tmp_path / "t", name="teacher"), show_progress=False)
    cfg = tiny_config(
        tiny_llama,
        alpaca_file,
        tmp_path / "s",
        name="student",
        model={"name": str(tiny_llama), "keep_layers": 1},
        distill={"teacher": str(teacher.run_dir), "temperature": 2.0, "alpha": 0.5},
    )
    student = train(cfg, show_progress=False)
    assert student.metrics["steps"] == 4 and math.isfinite(student.metrics["val_loss"])
    meta = json.loads((student.model_dir / "strop_model.json").read_text())
    assert meta["keep_layers"] == 1
    reloaded = load_model(str(student.model_dir), torch.device("cpu"), torch.float32)
    assert len(reloaded.model.layers) == 1  # the adapter sits on the cut model, cut again on load


def test_a_teacher_with_another_tokenizer_is_refused(tiny_llama, alpaca_file, tmp_path):
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.add_tokens(["<extra_token>"])
    load_model(str(tiny_llama), torch.device("cpu"), torch.float32).save_pretrained(other)
    tok.save_pretrained(other)
    cfg = tiny_config(tiny_llama, alpaca_file, tmp_path / "s", distill={"teacher": str(other)})
    from strop.recipes.run import train

    with pytest.raises(ConfigError, match="tokenizers differ"):
        train(cfg, show_progress=False)


def test_cached_top_k_with_the_whole_vocabulary_equals_the_teacher_on_the_fly(tiny_llama, tokenizer):
    from strop.data.batches import collate
    from strop.data.tokenized import TokenizedSet

    student, teacher = student_and_teacher(tiny_llama)
    b = batch(tokenizer)
    ids = [row[m.bool()].numpy() for row, m in zip(b["input_ids"], b["attention_mask"], strict=True)]
    trained = [(lab[: len(i)] != -100).numpy() for lab, i in zip(b["labels"], ids, strict=True)]
    ts = TokenizedSet(ids, trained, ["a", "b"])
    vocab = teacher.get_output_embeddings().weight.shape[0]
    ts.teacher = distill.teacher_top_k(teacher, ts, 0, vocab, 2, torch.device("cpu"))
    cached = collate(ts, [0, 1], 0)
    assert cached["teacher_logits"].shape == (8, vocab)
    live, _ = distill.lm_loss(
        student, collate(TokenizedSet(ids, trained, ["a", "b"]), [0, 1], 0), teacher, 2.0, 0.6
    )
    from_cache, n = distill.lm_loss(student, cached, None, 2.0, 0.6)
    assert n == 8 and from_cache.item() == pytest.approx(live.item(), rel=1e-5)
    ts.teacher = distill.teacher_top_k(teacher, ts, 0, 4, 2, torch.device("cpu"))
    top4, _ = distill.lm_loss(student, collate(ts, [0, 1], 0), None, 2.0, 0.6)
    assert math.isfinite(top4.item()) and top4.item() != pytest.approx(live.item(), rel=1e-3)


def test_a_cached_teacher_run_never_calls_the_teacher_while_training(
    tiny_llama, alpaca_file, tmp_path, monkeypatch
):
    from strop.recipes import sft as recipe
    from strop.recipes.run import train

    teacher_calls = []
    real = distill.lm_loss

    def spy(model, batch, teacher, temperature, alpha):
        teacher_calls.append(teacher)
        assert "teacher_logits" in batch and batch["teacher_logits"].shape[1] == 8
        return real(model, batch, teacher, temperature, alpha)

    monkeypatch.setattr(recipe.distill, "lm_loss", spy)
    cfg = tiny_config(
        tiny_llama, alpaca_file, tmp_path, distill={"teacher": str(tiny_llama), "cache_top_k": 8}
    )
    result = train(cfg, show_progress=False)
    assert result.metrics["steps"] == 4 and teacher_calls and all(t is None for t in teacher_calls)

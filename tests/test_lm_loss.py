"""The fused, chunked LM head + cross-entropy against the plain full-logits computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import build_model
from strop.data.batches import IGNORE
from strop.methods import lm_loss, sft

TOL = {"rtol": 1e-5, "atol": 1e-5}


def reference_loss(model, batch):
    """The standard path: full (B, T, V) logits, then cross-entropy over label tokens."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    targets = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return total, int((targets != IGNORE).sum())


def make_batch(vocab: int, b: int = 3, t: int = 20) -> dict[str, torch.Tensor]:
    """Right-padded rows of different lengths; labels on the second half of each row (a 'response')."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.zeros(b, t, dtype=torch.long)
    labels = torch.full((b, t), IGNORE)
    for i, n in enumerate([t, t - 5, t - 9][:b]):
        mask[i, :n] = 1
        labels[i, n // 2 : n] = ids[i, n // 2 : n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lora(model, target_modules="all-linear"):
    from peft import LoraConfig, get_peft_model

    # random B (not zeros) so the A matrices get non-zero gradients too
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False)
    return get_peft_model(model, cfg)


def loss_and_grads(fn, model, batch):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # GPT-2 has dropout: both paths must draw the same masks
    total, n = fn(model, batch)
    total.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return total.detach(), n, grads


@pytest.mark.parametrize("chunk", [1, 4, 7, 16, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_cross_entropy_matches_reference(chunk, dtype):
    torch.manual_seed(0)
    h = torch.randn(13, 8, dtype=dtype, requires_grad=True)  # 13 rows: not divisible by 4, 7 or 16
    w = torch.randn(50, 8, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 50, (13,))
    got = lm_loss.linear_cross_entropy(h, w, t, chunk_size=chunk)
    (got * 0.5).backward()  # a non-unit grad_output
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    want = F.cross_entropy(h.float() @ w.float().T, t, reduction="sum")
    (want * 0.5).backward()
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(gh, h.grad, **TOL)
    torch.testing.assert_close(gw, w.grad, **TOL)
    assert gh.dtype == dtype and gw.dtype == dtype


def test_linear_cross_entropy_bf16_and_frozen_weight():
    torch.manual_seed(0)
    h = torch.randn(9, 8, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(30, 8, dtype=torch.bfloat16)  # frozen head, as under LoRA
    t = torch.randint(0, 30, (9,))
    got = lm_loss.linear_cross_entropy(h, w, t, chunk_size=4)
    got.backward()
    h32 = h.detach().float().requires_grad_(True)
    want = F.cross_entropy(h32 @ w.float().T, t, reduction="sum")
    want.backward()
    assert got.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(h.grad, h32.grad.bfloat16())


def test_no_gradients_are_computed_without_grad_mode(monkeypatch):
    """Evaluation runs under no_grad: the chunks must not form softmax gradients."""
    h = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(11, 4, requires_grad=True)
    t = torch.randint(0, 11, (5,))
    real, calls = lm_loss._chunked, []

    def spy(hidden, weight, targets, chunk_size, need_h, need_w):
        calls.append((need_h, need_w))
        return real(hidden, weight, targets, chunk_size, need_h, need_w)

    monkeypatch.setattr(lm_loss, "_chunked", spy)
    with torch.no_grad():
        lm_loss.linear_cross_entropy(h, w, t)
    lm_loss.linear_cross_entropy(h.detach(), w.detach(), t)
    lm_loss.linear_cross_entropy(h, w.detach(), t)
    assert calls == [(False, False), (False, False), (True, False)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("wrap", ["full", "lora"])
def test_sft_loss_matches_full_logits(arch, wrap):
    model = build_model(arch, vocab_size=97)
    if wrap == "lora":
        model = lora(model)
    model.train()
    assert lm_loss.hidden_and_head(model) is not None
    batch = make_batch(97)
    got, n, got_grads = loss_and_grads(sft.loss, model, batch)
    want, m, want_grads = loss_and_grads(reference_loss, model, batch)
    assert n == m == int((batch["labels"][:, 1:] != IGNORE).sum())
    torch.testing.assert_close(got, want, **TOL)
    assert got_grads.keys() == want_grads.keys() and got_grads
    for k in want_grads:
        torch.testing.assert_close(got_grads[k], want_grads[k], **TOL, msg=k)
    if arch == "llama" and wrap == "full":
        # tied embeddings: the one weight gets gradient from both the head and the embedding lookup
        assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_head_forward_is_never_called(arch, monkeypatch):
    """No (B, T, V) logits: the head module's forward does not run, only its weight is read."""
    model = lora(build_model(arch, vocab_size=97))

    def refuse(*args, **kwargs):
        raise AssertionError("lm_head forward called: full logits materialized")

    monkeypatch.setattr(model.get_base_model().get_output_embeddings(), "forward", refuse)
    total, _ = sft.loss(model, make_batch(97))
    total.backward()
    assert sft.evaluate(model, [make_batch(97)])["val_loss"] > 0


def test_evaluate_matches_full_logits():
    model = build_model("gpt2", vocab_size=97)
    batches = [make_batch(97), make_batch(97, b=2, t=11)]
    with torch.no_grad():
        model.eval()
        sums = [reference_loss(model, b) for b in batches]
    want = sum(float(s) for s, _ in sums) / sum(n for _, n in sums)
    assert sft.evaluate(model, batches)["val_loss"] == pytest.approx(want, rel=1e-6)


def test_unreproducible_heads_fall_back():
    soft = build_model("llama", vocab_size=97)
    soft.config.final_logit_softcapping = 30.0
    assert lm_loss.hidden_and_head(soft) is None
    assert lm_loss.hidden_and_head(lora(build_model("llama", 97), ["q_proj", "lm_head"])) is None
    biased = build_model("gpt2", vocab_size=97)
    biased.lm_head.bias = torch.nn.Parameter(torch.zeros(97))
    assert lm_loss.hidden_and_head(biased) is None

    # the fallback is the standard path, so a LoRA-wrapped head still trains
    model = lora(build_model("llama", 97), ["q_proj", "lm_head"])
    batch = make_batch(97)
    got, _, got_grads = loss_and_grads(sft.loss, model, batch)
    want, _, want_grads = loss_and_grads(reference_loss, model, batch)
    torch.testing.assert_close(got, want, **TOL)
    assert any("lm_head" in k for k in got_grads)
    for k in want_grads:
        torch.testing.assert_close(got_grads[k], want_grads[k], **TOL, msg=k)


def test_position_ids_pass_through():
    """Packed rows restart positions; the backbone must see the batch's position_ids."""
    model = build_model("llama", vocab_size=97)
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]
    batch = {**make_batch(97, b=1, t=12), "position_ids": position_ids}
    seen = []
    model.model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("position_ids")), with_kwargs=True
    )
    got, _ = sft.loss(model, batch)
    want, _ = reference_loss(model, batch)
    assert len(seen) == 2 and all(torch.equal(p, position_ids) for p in seen)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cuda_matches_full_logits_in_a_fraction_of_the_memory(arch):
    dev = torch.device("cuda")
    vocab = 32000  # hidden size 32: the logits dominate memory
    model = lora(build_model(arch, vocab_size=vocab)).to(dev)
    batch = {k: v.to(dev) for k, v in make_batch(vocab, b=3, t=256).items()}
    peaks = {}
    for name, fn in (("new", sft.loss), ("old", reference_loss)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        total, _, _ = loss_and_grads(fn, model, batch)
        torch.cuda.synchronize()
        peaks[name] = (torch.cuda.max_memory_allocated() - start, total)
    torch.testing.assert_close(peaks["new"][1], peaks["old"][1], **TOL)
    assert peaks["new"][0] < peaks["old"][0] / 2, peaks

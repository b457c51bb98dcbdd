"""Packing: bin packing, the packed batch layout, and packed == unpacked for tiny Llama and GPT-2."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.masking_utils import create_causal_mask

from strop.data.batches import IGNORE, collate
from strop.data.packing import MODEL_KEYS, collate_packed, pack
from strop.data.tokenized import TokenizedSet
from strop.models.attention import NAME, enable_segment_attention

LENGTHS = [7, 12, 5, 20, 3, 9, 16, 2]
PAD = 0


def label_count(batch) -> int:
    """The tokens that carry loss (position 0 is never predicted), as SFT's objective counts them."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def synthetic_set(lengths: list[int], vocab: int, seed: int = 0) -> TokenizedSet:
    """Random tokens; the first third of each example is an untrained prompt."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, vocab, n).astype(np.int32) for n in lengths]
    trained = [np.arange(n) >= n // 3 for n in lengths]
    return TokenizedSet(ids, trained, [f"ex{i}" for i in range(len(lengths))])


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T-1) cross-entropy of position t predicting labels[t + 1]; 0 where IGNORE (as methods/sft)."""
    return F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE, reduction="none"
    )


def inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_KEYS}


def load(path, impl: str = "sdpa"):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl)
    return model.eval()  # GPT-2 has dropout; equivalence is checked without it


def packed_example_losses(model, ts, rows) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
    """Per-example summed losses (in row order) and the total the way a loss function sums it."""
    batch = collate_packed(ts, rows, PAD)
    ce = token_losses(model(**inputs(batch)).logits, batch["labels"])  # (R, L-1)
    per_example = {}
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(ts.ids[i])
            per_example[i] = ce[r, at : at + n - 1].sum()
            at += n
    return per_example, ce.sum(), batch


def unpacked_example_loss(model, ts, i) -> torch.Tensor:
    batch = collate(ts, [i], PAD)  # batch of one, no padding: the reference semantics
    return token_losses(model(input_ids=batch["input_ids"]).logits, batch["labels"]).sum()


# ---- pack ----------------------------------------------------------------------------------------


def test_pack_respects_budget_and_places_every_example_once():
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 64) for _ in range(rng.randint(1, 40))]
        budget = rng.randint(max(lengths), 200)
        rows = pack(lengths, budget)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= budget for row in rows)
        assert rows == pack(lengths, budget)  # deterministic
        # best fit never leaves two rows that could have been one
        loads = sorted(sum(lengths[i] for i in row) for row in rows)
        assert len(loads) < 2 or loads[0] + loads[1] > budget


def test_pack_is_best_fit_decreasing():
    # first fit in the given order would need 3 rows; best-fit-decreasing needs 2
    assert pack([5, 4, 3, 2, 2], 8) == [[0, 2], [1, 3, 4]]
    # the 3 goes to the row it fills most tightly (room 3), not the first row with room
    assert pack([6, 5, 3, 2], 9) == [[0, 2], [1, 3]]
    assert pack([], 8) == []
    assert pack([8, 8], 8) == [[0], [1]]


def test_pack_rejects_a_budget_shorter_than_an_example():
    with pytest.raises(ValueError, match="longest example"):
        pack([3, 9, 4], 8)


# ---- collate_packed ------------------------------------------------------------------------------


def test_collate_packed_layout():
    ts = synthetic_set([4, 3, 5], vocab=50)
    batch = collate_packed(ts, [[0, 1], [2]], PAD)
    assert batch["input_ids"].shape == (2, 7)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 0, 1]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 7, 12, 14]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 5
    assert batch["input_ids"][1, 5:].tolist() == [PAD, PAD]
    labels = batch["labels"]
    assert labels[0, 0] == labels[0, 4] == labels[1, 0] == IGNORE  # every example's first token
    assert (labels[1, 5:] == IGNORE).all()  # padding
    # the trained tokens are those of the examples unpacked, and nothing else
    unpacked = sum(label_count(collate(ts, [i], PAD)) for i in range(3))
    assert label_count(batch) == unpacked == ts.label_tokens()


def test_the_first_token_of_an_example_is_never_a_target():
    ts = synthetic_set([4, 3], vocab=50)
    ts.trained = [np.ones(4, bool), np.ones(3, bool)]  # train on everything, prompt included
    labels = collate_packed(ts, [[0, 1]], PAD)["labels"][0]
    assert labels[4] == IGNORE  # the last token of example 0 does not predict example 1
    assert labels.tolist()[5:] == ts.ids[1][1:].tolist()


# ---- packed == unpacked --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_losses_and_gradients_equal_unpacked(arch, request):
    path = request.getfixturevalue(f"tiny_{arch}")
    ref, packed = load(path), load(path)
    assert enable_segment_attention(packed) == NAME
    ts = synthetic_set(LENGTHS, packed.config.vocab_size)
    rows = pack([len(x) for x in ts.ids], 32)
    assert len(rows) < len(LENGTHS) and max(len(r) for r in rows) > 1  # rows really are shared

    per_example, total, _ = packed_example_losses(packed, ts, rows)
    total.backward()
    for i in range(len(ts)):
        unpacked_example_loss(ref, ts, i).backward()  # gradients accumulate over the examples
        torch.testing.assert_close(
            per_example[i], unpacked_example_loss(ref, ts, i).detach(), atol=1e-5, rtol=0
        )
    # no loss leaks across a boundary: the row total is exactly the examples' sum
    torch.testing.assert_close(total, sum(per_example.values()), atol=1e-5, rtol=1e-6)

    grads = dict(ref.named_parameters())
    for name, p in packed.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_without_segment_attention_examples_see_each_other(arch, request):
    """The same packed batch through plain SDPA with a full mask (causal over the whole row) gives other
    losses: the boundaries are kept by segment attention, not by the positions or labels."""
    path = request.getfixturevalue(f"tiny_{arch}")
    plain, packed = load(path), load(path)
    enable_segment_attention(packed)
    ts = synthetic_set(LENGTHS, packed.config.vocab_size)
    rows = pack([len(x) for x in ts.ids], 32)
    _, total, batch = packed_example_losses(packed, ts, rows)

    with torch.no_grad():
        leaky = plain(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=torch.ones_like(batch["input_ids"]),  # turns off transformers' packing detection
        ).logits
    assert abs(float(token_losses(leaky, batch["labels"]).sum()) - float(total.detach())) > 1e-2
    # transformers' own packed path (a dense block-diagonal mask built from position_ids) agrees with ours;
    # it only runs without a cache (the config default use_cache=True silently turns it off)
    with torch.no_grad():
        dense = plain(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
    torch.testing.assert_close(
        token_losses(dense, batch["labels"]).sum(), total.detach(), atol=1e-5, rtol=1e-6
    )


def test_no_dense_mask_is_built_for_a_packed_batch(tiny_llama):
    model = load(tiny_llama)
    enable_segment_attention(model)
    ts = synthetic_set(LENGTHS, model.config.vocab_size)
    batch = collate_packed(ts, pack([len(x) for x in ts.ids], 32), PAD)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    mask = create_causal_mask(model.config, embeds, None, None, position_ids=batch["position_ids"])
    assert mask is None


def test_position_ids_alone_mark_the_segments(tiny_gpt2):
    """transformers' convention (positions restarting at 0, no cu_seq_lens) gives the same result."""
    model = load(tiny_gpt2)
    enable_segment_attention(model)
    ts = synthetic_set(LENGTHS, model.config.vocab_size)
    batch = collate_packed(ts, pack([len(x) for x in ts.ids], 32), PAD)
    with torch.no_grad():
        full = model(**inputs(batch)).logits
        positions_only = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    torch.testing.assert_close(positions_only, full, atol=1e-6, rtol=0)


def test_a_padded_unpacked_batch_still_matches_sdpa(tiny_llama):
    """A model left on segment attention runs ordinary padded batches (validation, generation) as SDPA."""
    ref, model = load(tiny_llama), load(tiny_llama)
    enable_segment_attention(model)
    ts = synthetic_set(LENGTHS, model.config.vocab_size)
    batch = collate(ts, list(range(len(ts))), PAD)
    with torch.no_grad():
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-6, rtol=0)
    with torch.no_grad():
        out = model.generate(batch["input_ids"][:2, :4], max_new_tokens=3, do_sample=False, pad_token_id=PAD)
        ref_out = ref.generate(
            batch["input_ids"][:2, :4], max_new_tokens=3, do_sample=False, pad_token_id=PAD
        )
    assert torch.equal(out, ref_out)


def test_peft_wrapped_model(tiny_llama):
    from peft import LoraConfig, get_peft_model

    ref = load(tiny_llama)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(load(tiny_llama), cfg)
    assert enable_segment_attention(model) == NAME
    assert model.get_base_model().config._attn_implementation == NAME
    ts = synthetic_set(LENGTHS, ref.config.vocab_size)
    rows = pack([len(x) for x in ts.ids], 32)
    per_example, total, _ = packed_example_losses(model, ts, rows)
    total.backward()  # LoRA B starts at zero, so the adapted model equals the base model here
    for i in range(len(ts)):
        torch.testing.assert_close(
            per_example[i], unpacked_example_loss(ref, ts, i).detach(), atol=1e-5, rtol=0
        )
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_enable_segment_attention_rejects_a_plain_module():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        enable_segment_attention(torch.nn.Linear(2, 2))


def test_training_with_batch_tokens_matches_padded_batches(tiny_llama, tmp_path):
    """PackedPlan places every example once per epoch within the budget, and a packed run (one row of
    batch_tokens) and a padded run over the same examples give the same first-step loss."""
    import json

    from conftest import ALPACA_ROWS, tiny_config, write_jsonl
    from strop.data.packing import PackedPlan
    from strop.recipes.sft import train

    data = write_jsonl(tmp_path / "d.jsonl", ALPACA_ROWS)
    lengths = [30, 25, 20, 12, 9, 40]
    plan = PackedPlan(lengths, budget=64, seed=3)
    seen = sorted(i for m in range(plan.per_epoch) for row in plan.micro_batch(m) for i in row)
    assert seen == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in plan.micro_batch(m)[0]) <= 64 for m in range(plan.per_epoch))

    # all 16 training examples in one optimizer step both ways: the step's loss must agree
    padded = train(
        tiny_config(tiny_llama, data, tmp_path / "a", train={"batch_size": 16, "max_steps": 1}),
        show_progress=False,
    )
    packed = train(
        tiny_config(tiny_llama, data, tmp_path / "b", train={"batch_tokens": 2048, "max_steps": 1}),
        show_progress=False,
    )
    first = [json.loads((r.run_dir / "metrics.jsonl").read_text().splitlines()[0]) for r in (padded, packed)]
    assert first[0]["label_tokens"] == first[1]["label_tokens"]
    assert abs(first[0]["loss"] - first[1]["loss"]) < 1e-5

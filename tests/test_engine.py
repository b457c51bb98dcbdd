"""The decoding engine (models/engine.py) that generate, eval, chat, RL rollouts and serve share.

References: transformers' own `model.generate` for greedy decoding, each request decoded alone for
continuous batching, each adapter applied alone for a mixed batch.
"""

from __future__ import annotations

import threading

import pytest
import torch

from strop.models.engine import BASE, Engine, Request, _draw
from test_models import _convs, lively_model, loaded  # noqa: F401 - fixtures

PROMPTS = ["hello there", "write a long story about the sea and the ships", "a", "list three colours"]


def _ids(loaded, prompts=PROMPTS):  # noqa: F811
    return [loaded.template.prompt_ids(c) for c in _convs(prompts)]


def _engine(loaded, max_batch=8):  # noqa: F811
    return Engine(loaded.model, loaded.tokenizer, loaded.template.stop_ids, max_batch=max_batch)


def _decode(engine, requests):
    engine.run(requests)
    return [r.tokens for r in requests]


def test_greedy_tokens_equal_transformers_generate(loaded):  # noqa: F811
    stops = sorted(loaded.template.stop_ids)
    for ids in _ids(loaded):
        x = torch.tensor([ids])
        out = loaded.model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
        want = out[0, len(ids) :].tolist()
        req = Request(ids, max_new_tokens=16)
        _decode(_engine(loaded), [req])
        assert req.tokens == want[: len(req.tokens)] and len(req.tokens) in (len(want), 16)
        assert req.finish_reason == ("stop" if req.tokens[-1] in stops else "length")


def test_continuous_batching_gives_each_request_what_it_gets_alone(loaded):  # noqa: F811
    """Two slots, six requests of different lengths and budgets: rows join and leave mid-batch."""
    ids = _ids(loaded) + _ids(loaded, ["tell me more", "why"])
    budgets = [3, 20, 7, 12, 1, 15]
    alone = [
        _decode(_engine(loaded, 1), [Request(i, max_new_tokens=n)])[0]
        for i, n in zip(ids, budgets, strict=True)
    ]
    together = [Request(i, max_new_tokens=n) for i, n in zip(ids, budgets, strict=True)]
    engine = _engine(loaded, max_batch=2)
    widths = []
    original = engine._decode

    def watch():
        widths.append(len(engine.rows))
        original()

    engine._decode = watch
    _decode(engine, together)
    assert [r.tokens for r in together] == alone
    assert max(widths) == 2 and engine.rows == [] and engine.cache is None


def test_a_seeded_sample_does_not_depend_on_its_batch(loaded):  # noqa: F811
    ids = _ids(loaded)
    alone = _decode(_engine(loaded), [Request(ids[1], max_new_tokens=12, temperature=1.0, seed=7)])[0]
    batch = [
        Request(i, max_new_tokens=12, temperature=1.0, seed=7 if k == 1 else k) for k, i in enumerate(ids)
    ]
    assert _decode(_engine(loaded, 3), batch)[1] == alone
    other = _decode(_engine(loaded), [Request(ids[1], max_new_tokens=12, temperature=1.0, seed=8)])[0]
    greedy = _decode(_engine(loaded), [Request(ids[1], max_new_tokens=12)])[0]
    assert alone != other or alone != greedy, "a temperature-1 sample equals greedy for every seed"


def test_top_p_keeps_the_smallest_set_that_reaches_it():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    drawn = {int(_draw(logits, 1.0, 0.75, g)) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3
    assert {int(_draw(logits, 1.0, 1e-6, g)) for _ in range(50)} == {0}
    counts = torch.bincount(torch.stack([_draw(logits, 1.0, 1.0, g) for _ in range(4000)]), minlength=4)
    assert torch.allclose(counts / 4000, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)


def test_stop_strings_cut_the_text_and_streaming_never_shows_them(loaded):  # noqa: F811
    ids = _ids(loaded)[1]
    free = Request(ids, max_new_tokens=24)
    _decode(_engine(loaded), [free])
    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop.strip()) >= 2, f"need a reply with text in the middle: {text!r}"
    pieces: list[str] = []
    req = Request(ids, max_new_tokens=24, stop=[stop], on_text=pieces.append)
    _decode(_engine(loaded), [req])
    assert req.text == text[: text.find(stop)] and req.finish_reason == "stop"
    assert "".join(pieces) == req.text and len(req.tokens) < len(free.tokens)


def test_streamed_pieces_join_to_the_reply(loaded):  # noqa: F811
    ids = _ids(loaded)[1]
    whole = Request(ids, max_new_tokens=20)
    _decode(_engine(loaded), [whole])
    pieces = list(_engine(loaded).stream(Request(ids, max_new_tokens=20)))
    assert len(pieces) > 1 and "".join(pieces) == whole.text


def test_a_cancelled_request_leaves_and_the_others_go_on(loaded):  # noqa: F811
    ids = _ids(loaded)
    alone = [_decode(_engine(loaded), [Request(i, max_new_tokens=10)])[0] for i in ids]
    reqs = [Request(i, max_new_tokens=10) for i in ids]
    seen = []

    def cancel_after_two(piece, req=reqs[1]):
        seen.append(piece)
        if len(req.tokens) >= 2:
            req.cancelled = True

    reqs[1].on_text = cancel_after_two
    _decode(_engine(loaded), reqs)
    assert reqs[1].done.is_set() and len(reqs[1].tokens) <= 3
    assert [r.tokens for k, r in enumerate(reqs) if k != 1] == [a for k, a in enumerate(alone) if k != 1]


def test_a_failing_forward_fails_every_request_and_the_engine_recovers(loaded):  # noqa: F811
    engine = _engine(loaded)
    reqs = [Request(i, max_new_tokens=5) for i in _ids(loaded)]
    original = loaded.model.forward
    loaded.model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory"))
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            engine.run(reqs)
    finally:
        loaded.model.forward = original
    assert all(r.done.is_set() and r.finish_reason == "error" for r in reqs)
    again = Request(_ids(loaded)[0], max_new_tokens=5)
    engine.run([again])
    assert again.error is None and again.tokens


def test_background_engine_serves_requests_from_many_threads(loaded):  # noqa: F811
    ids = _ids(loaded)
    alone = [_decode(_engine(loaded), [Request(i, max_new_tokens=8)])[0] for i in ids]
    engine = _engine(loaded, max_batch=4)
    engine.start()
    reqs = [Request(i, max_new_tokens=8) for i in ids]
    threads = [threading.Thread(target=engine.submit, args=(r,)) for r in reqs]
    for t in threads:
        t.start()
    assert all(r.done.wait(60) for r in reqs)
    engine.stop()
    assert [r.tokens for r in reqs] == alone and engine.load == 0


def test_mixed_adapters_in_one_batch_equal_each_adapter_alone(lively_model):  # noqa: F811
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from strop.data.template import ChatTemplate, resolve_template

    tok = AutoTokenizer.from_pretrained(lively_model)
    template = ChatTemplate(tok, resolve_template("auto", tok)[1])
    base = AutoModelForCausalLM.from_pretrained(lively_model)
    targets = ["q_proj", "v_proj"] if base.config.model_type == "llama" else ["c_attn"]
    model = get_peft_model(base, LoraConfig(r=4, target_modules=targets, init_lora_weights=False), "a")
    model.add_adapter("b", LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    model.eval()
    ids = [template.prompt_ids(c) for c in _convs(PROMPTS)]
    names = ["a", "b", BASE, "a"]

    def alone(i, name):
        req = Request(i, max_new_tokens=10)
        if name == BASE:
            with model.disable_adapter():
                Engine(model, tok, template.stop_ids).run([req])
        else:
            model.set_adapter(name)
            Engine(model, tok, template.stop_ids).run([req])
        return req.tokens

    want = [alone(i, n) for i, n in zip(ids, names, strict=True)]
    assert len({tuple(w) for w in want[:3]}) == 3, "the adapters should change the replies"
    model.set_adapter("a")
    mixed = [Request(i, max_new_tokens=10, adapter=n) for i, n in zip(ids, names, strict=True)]
    Engine(model, tok, template.stop_ids, max_batch=4).run(mixed)
    assert [r.tokens for r in mixed] == want


@pytest.mark.parametrize("after", [1, 3])
def test_a_newcomer_longer_or_shorter_than_the_batch_joins_without_changing_it(loaded, after):  # noqa: F811
    """Joining left-pads whichever side is narrower: the running rows' cache or the newcomer's."""
    ids = _ids(loaded)
    for first, second in [(0, 1), (1, 2)]:  # the newcomer longer, then shorter, than the running row
        alone = [_decode(_engine(loaded), [Request(ids[k], max_new_tokens=8)])[0] for k in (first, second)]
        engine = _engine(loaded)
        a = engine.submit(Request(ids[first], max_new_tokens=8))
        for _ in range(after):
            engine.step()
        b = engine.submit(Request(ids[second], max_new_tokens=8))
        while engine.load:
            engine.step()
        assert [a.tokens, b.tokens] == alone


def test_run_decodes_in_eval_mode_and_gives_the_mode_back(loaded):  # noqa: F811
    seen = []
    handle = loaded.model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    loaded.model.train()
    try:
        _engine(loaded).run([Request(_ids(loaded)[0], max_new_tokens=3)])
    finally:
        handle.remove()
    assert seen and not any(seen) and loaded.model.training
    loaded.model.eval()


@pytest.mark.parametrize("fails_at", [0, 3])  # its first draw (at admission), or mid-decode
def test_a_request_failing_alone_leaves_the_others_their_own_output(loaded, fails_at):  # noqa: F811
    """Greedy and seeded rows decode; a poisoned one joins after two steps and its draw raises: it alone
    fails, and the others' tokens equal what each gets alone."""
    ids = _ids(loaded)

    def requests():
        return [
            Request(ids[0], max_new_tokens=12),
            Request(ids[1], max_new_tokens=12, temperature=1.0, seed=3),
            Request(ids[3], max_new_tokens=12, temperature=0.7, top_p=0.9, seed=-5),
        ]

    alone = [_decode(_engine(loaded), [r])[0] for r in requests()]
    engine = _engine(loaded)
    good = [engine.submit(r) for r in requests()]
    engine.step()
    engine.step()
    poison = Request(ids[2], max_new_tokens=12, temperature=1.0, seed=9)
    original = engine._draw

    def draw(logits, row):
        if row.req is poison and len(poison.tokens) >= fails_at:
            raise RuntimeError("probability tensor contains either inf, nan")
        return original(logits, row)

    engine._draw = draw
    engine.submit(poison)
    finished = []
    while engine.load:
        finished += engine.step()
    assert poison in finished and poison.finish_reason == "error" and len(poison.tokens) == fails_at
    assert "inf, nan" in str(poison.error)
    assert [r.tokens for r in good] == alone and all(r.error is None for r in good)
    assert engine.rows == [] and engine.cache is None


def test_a_failing_stream_callback_fails_only_its_request(loaded):  # noqa: F811
    ids = _ids(loaded)
    alone = _decode(_engine(loaded), [Request(ids[1], max_new_tokens=10)])[0]

    def broken(piece):
        raise OSError("client socket gone")

    reqs = [Request(ids[0], max_new_tokens=10, on_text=broken), Request(ids[1], max_new_tokens=10)]
    with pytest.raises(OSError, match="socket gone"):
        _engine(loaded).run(reqs)
    assert reqs[0].finish_reason == "error" and reqs[1].error is None and reqs[1].tokens == alone


def test_a_tiny_temperature_samples_the_argmax_instead_of_nan():
    logits = torch.tensor([1.0, 3.0, -2.0, float("-inf")])
    for t in (1e-300, 5e-324, 1e-8):
        g = torch.Generator().manual_seed(0)
        assert {int(_draw(logits, t, 1.0, g)) for _ in range(20)} == {1}
        assert int(_draw(logits, t, 0.5, g)) == 1
    with pytest.raises(ValueError, match="not finite"):
        _draw(torch.tensor([0.0, float("nan")]), 1.0, 1.0, None)


def test_any_integer_seed_makes_a_generator_torch_reads_the_same_way():
    from strop.models.engine import _generator

    for seed in (2**70, -(2**63), 2**64 + 5, -1):
        assert _generator(seed) is not None
    same = torch.Generator().manual_seed(-5)  # torch's own reading of a negative seed
    assert torch.equal(torch.rand(3, generator=_generator(-5)), torch.rand(3, generator=same))
    assert torch.equal(torch.rand(3, generator=_generator(2**64 + 5)), torch.rand(3, generator=_generator(5)))

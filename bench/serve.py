"""Loopback load test: `strop serve` vs llama.cpp's own server (llama-cpp-python) on the GGUF export of
the same model, the same GSM8K prompts, greedy, streamed, at concurrency 1, 4 and 16; one server at a
time, each on the same 2 cores.

    python bench/serve.py                       # 48 requests x 48 tokens per level (~15 min on 2 cores)
    python bench/serve.py --requests 200        # the issue's 200 per level (about an hour here)
    python bench/serve.py --only strop --quick

Reports per level: p50/p95 latency, p50/p95 time to first token, aggregate tokens/s (reply tokens,
counted by re-tokenizing each reply with the model's tokenizer, the same rule for both servers), 429s
and other errors. Needs llama-cpp-python with its server extras (sse-starlette, starlette-context,
pydantic-settings) for the llama.cpp side.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    import urllib.request

    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{url} did not come up in {seconds} s")


def one(client, model: str, prompt: str, max_tokens: int, tok) -> dict:
    import openai

    t0 = time.perf_counter()
    first, text, finish = None, "", None
    try:
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
        )
        for chunk in stream:
            piece = chunk.choices[0].delta.content if chunk.choices else None
            finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
            if piece:
                first = first or time.perf_counter()
                text += piece
    except openai.RateLimitError:
        return {"status": 429}
    except Exception as e:  # noqa: BLE001 - counted and reported, the load goes on
        return {"status": "error", "error": repr(e)[:200]}
    end = time.perf_counter()
    if finish is None:  # a stream cut short (e.g. interrupted by another request) is not an answer
        return {"status": "error", "error": f"the stream ended without a finish_reason after {text!r}"[:200]}
    return {
        "status": 200,
        "latency": end - t0,
        "ttft": (first or end) - t0,
        "tokens": len(tok(text, add_special_tokens=False)["input_ids"]),
        "text": text,
    }


def level(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int, tok) -> dict:
    import openai

    results: list[dict] = [{} for _ in prompts]
    todo = iter(range(len(prompts)))
    lock = threading.Lock()

    def worker():
        client = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            results[i] = one(client, model, prompts[i], max_tokens, tok)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r.get("status") == 200]

    def pct(key, q):
        values = sorted(r[key] for r in ok)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {
        "concurrency": concurrency,
        "requests": len(prompts),
        "ok": len(ok),
        "429": sum(r.get("status") == 429 for r in results),
        "errors": sum(r.get("status") == "error" for r in results),
        "first_error": next((r["error"] for r in results if r.get("status") == "error"), None),
        "p50_latency": statistics.median(r["latency"] for r in ok) if ok else float("nan"),
        "p95_latency": pct("latency", 0.95),
        "p50_ttft": statistics.median(r["ttft"] for r in ok) if ok else float("nan"),
        "p95_ttft": pct("ttft", 0.95),
        "tokens": sum(r["tokens"] for r in ok),
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "wall_s": wall,
        "texts": [r.get("text") for r in results],
    }


def start(name: str, args, gguf: Path, port: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if name == "strop":
        cmd = [
            sys.executable,
            "-m",
            "strop",
            "-q",
            "serve",
            args.model,
            "--port",
            str(port),
            "--device",
            "cpu",
            "--max-batch",
            str(args.max_batch),
            "--queue",
            str(args.queue),
        ]
        if args.quantize:
            cmd += ["--quantize", args.quantize]
        model = args.model
    else:
        cmd = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--port",
            str(port),
            "--n_threads",
            str(args.threads),
            "--n_threads_batch",
            str(args.threads),
            "--n_ctx",
            "2048",
            "--model_alias",
            "gguf",
            "--interrupt_requests",
            "False",  # its default lets each new request cut off the one streaming; queue them instead
        ]  # no --chat_format: llama-cpp-python renders with the template inside the GGUF (the run's)
        model = "gguf"
    log = open(Path(tempfile.gettempdir()) / f"bench-serve-{name}.log", "w")  # noqa: SIM115 - the server's life
    # a file, not a pipe: llama.cpp logs every request, and an unread pipe would fill and stall it
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    return proc, model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--quant", default="f16", help="GGUF type for llama.cpp (f16: the fp32 weights, halved)")
    p.add_argument("--quantize", choices=["int8"], help="strop serve --quantize")
    p.add_argument("--requests", type=int, default=48, help="per concurrency level")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--levels", default="1,4,16")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--queue", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--only", default="strop,llama.cpp")
    p.add_argument("--quick", action="store_true", help="12 requests x 24 tokens")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.quick:
        args.requests, args.max_tokens = 12, 24
    from strop.export.ship import export
    from strop.models.load import load_tokenizer, resolve_source

    tok = load_tokenizer(resolve_source(args.model))
    rows = [json.loads(x) for x in DATA.read_text().splitlines()[: args.requests]]
    prompts = [r["question"] for r in rows]
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / f"model-{args.quant}.gguf"
        if "llama.cpp" in args.only:
            export(args.model, "gguf", args.quant, str(gguf))
        for name in args.only.split(","):
            port = free_port()
            proc, model = start(name, args, gguf, port)
            url = f"http://127.0.0.1:{port}"
            try:
                wait_ready(url, proc)
                one_warm = level(url, model, prompts[:2], 1, 8, tok)  # first-call costs off the clock
                assert one_warm["ok"] == 2, one_warm
                results[name] = []
                for c in map(int, args.levels.split(",")):
                    r = level(url, model, prompts, c, args.max_tokens, tok)
                    results[name].append(r)
                    print(
                        f"{name:9s} c={c:<3d} p50 {r['p50_latency']:6.2f} s  p95 {r['p95_latency']:6.2f} s  "
                        f"TTFT p50 {r['p50_ttft']:5.2f} s p95 {r['p95_ttft']:5.2f} s  "
                        f"{r['tokens_per_s']:6.1f} tok/s  429s {r['429']}  errors {r['errors']}"
                        + (f" ({r['first_error']})" if r["first_error"] else ""),
                        flush=True,
                    )
            finally:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print(
        "\n| concurrency | server | p50 latency s | p95 latency s | p50 TTFT s | p95 TTFT s | tok/s | 429 | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for c_index, c in enumerate(map(int, args.levels.split(","))):
        for name, rs in results.items():
            r = rs[c_index]
            print(
                f"| {c} | {name} | {r['p50_latency']:.2f} | {r['p95_latency']:.2f} | {r['p50_ttft']:.2f} | "
                f"{r['p95_ttft']:.2f} | {r['tokens_per_s']:.1f} | {r['429']} | {r['errors']} |"
            )
    if set(results) == {"strop", "llama.cpp"}:
        for c_index, c in enumerate(map(int, args.levels.split(","))):
            s, ll = results["strop"][c_index], results["llama.cpp"][c_index]
            same = sum(a == b for a, b in zip(s["texts"], ll["texts"], strict=True))
            print(
                f"concurrency {c}: strop / llama.cpp aggregate tokens/s = "
                f"{s['tokens_per_s'] / ll['tokens_per_s']:.2f}; identical replies {same}/{len(prompts)}"
            )
    if args.json:
        for rs in results.values():
            for r in rs:
                r.pop("texts", None)
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""`strop chat | generate | eval`: a language model (a run, a model folder, a catalogue name, a GGUF
file or a hub id) answering prompts, optionally from a retrieval index (--rag). Each is a thin layer
over `strop.api.LanguageModel` (eval: `strop.api.evaluate`, the one evaluation path)."""

from __future__ import annotations

from strop.cli.options import (
    check_out,
    data_format_arg,
    emit_jsonl,
    force_arg,
    judge_config,
    judge_options,
    positive_int,
    quantize_arg,
    retrieval_args,
    retriever_for,
    sampling_args,
)


def register(sub) -> None:
    c = sub.add_parser(
        "chat",
        help="chat with a model or a trained run (streaming)",
        description="Interactive chat using the run's own chat template. "
        "Commands: /reset clears the conversation, /exit quits.",
    )
    c.add_argument(
        "target",
        metavar="RUN_DIR|MODEL",
        help="a run directory, a model folder, a catalogue name, a .gguf file or a hub id",
    )
    c.add_argument("--system", help="system prompt")
    sampling_args(c, temperature_default=0.7, max_new_tokens=256)
    quantize_arg(c)
    retrieval_args(c)
    c.set_defaults(handler=_chat)

    g = sub.add_parser(
        "generate",
        help="batched generation to JSONL",
        description="Generate replies for one prompt or a file of prompts. A .jsonl file "
        "holds rows with 'prompt', 'messages' or 'instruction' (+ 'input'); a .txt file "
        "holds one prompt per line.",
    )
    g.add_argument("target", metavar="RUN_DIR|MODEL")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="a single prompt")
    src.add_argument("--file", help="prompts file (.jsonl or .txt)")
    g.add_argument("--out", help="output JSONL (default: print to stdout)")
    force_arg(g)
    g.add_argument("--batch-size", type=positive_int, default=8)
    sampling_args(g, temperature_default=0.0, max_new_tokens=128)
    quantize_arg(g)
    retrieval_args(g)
    g.set_defaults(handler=_generate)

    e = sub.add_parser(
        "eval",
        help="evaluate a model or a run on a dataset: loss, perplexity and task metrics",
        description="Generate for every example of --data (greedy by default, batched) and score the "
        "replies against the references; writes summary.json and predictions.jsonl to --out. "
        "Metrics: exact_match, contains, rouge_l, bleu, accuracy, macro_f1, tool_call (calls and arguments as the reference), tool_function, or module:function "
        "(called as function(prediction, reference) -> float).",
    )
    e.add_argument("target", metavar="RUN_DIR|MODEL")
    e.add_argument("--data", required=True, help="JSONL/CSV/Parquet file in any chat or instruction format")
    data_format_arg(e)
    e.add_argument("--metric", action="append", default=[], help="a metric (repeatable)")
    e.add_argument("--extract", help="answer extractor for exact match: gsm8k, last_number or regex:PATTERN")
    e.add_argument("--stop", action="append", default=[], help="a string that ends generation (repeatable)")
    e.add_argument("--limit", type=positive_int, help="only the first N examples")
    e.add_argument("--batch-size", type=positive_int, default=8)
    e.add_argument("--max-length", type=positive_int, default=1024, help="tokens per example for the loss")
    e.add_argument("--out", help="output folder (default: RUN_DIR/eval-DATA or ./eval-DATA)")
    force_arg(e, "write into --out even when it is not empty (its files of the same names are replaced)")
    sampling_args(e, temperature_default=0.0, max_new_tokens=256)
    quantize_arg(e)
    retrieval_args(e)
    judge_options(e)
    e.set_defaults(handler=_eval, judge_rubric_template=True)


def _chat(args) -> int:
    from strop.api import LanguageModel
    from strop.rag.prompt import augment

    retriever = retriever_for(args)
    lm = LanguageModel(args.target, device=args.device, quantize=args.quantize)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    with_index = f", answering from {args.rag}" if retriever else ""
    print(f"chatting with {lm.description}{with_index}. /reset clears, /exit quits.")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history.clear()
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        hits = retriever.search(text, args.top_k, args.rag_mode) if retriever else []
        print("bot> ", end="", flush=True)
        reply = ""
        for piece in lm.stream(
            augment(system + history, hits),  # the passages go into this turn only, not the history
            args.max_new_tokens,
            args.temperature,
            args.top_p,
        ):
            print(piece, end="", flush=True)
            reply += piece
        print()
        if hits:
            print("sources: " + "; ".join(f"[{h.rank}] {h.doc_id} #{h.chunk}" for h in hits))
        history.append({"role": "assistant", "content": reply.strip()})


def _generate(args) -> int:
    check_out(args.out, args.force, [args.file])
    import json

    from strop.api import LanguageModel
    from strop.models.prompts import read_prompts
    from strop.rag.prompt import augment, sources

    retriever = retriever_for(args)
    items: list[dict] = (
        [{"id": "0", "messages": [{"role": "user", "content": args.prompt}]}]
        if args.prompt
        else read_prompts(args.file)
    )
    found = [_retrieve(retriever, it["messages"], args) for it in items]
    replies = LanguageModel(args.target, device=args.device, quantize=args.quantize).generate(
        [augment(it["messages"], hits) for it, hits in zip(items, found, strict=True)],
        args.max_new_tokens,
        args.temperature,
        args.top_p,
        args.batch_size,
    )
    lines = [
        json.dumps(
            {"id": it["id"], "prompt": it["messages"][-1]["content"], "response": r}
            | ({"sources": sources(hits)} if retriever else {})
        )
        for it, r, hits in zip(items, replies, found, strict=True)
    ]
    emit_jsonl(lines, args.out, "responses")
    return 0


def _retrieve(retriever, messages: list[dict], args) -> list:
    """Passages for the last user turn of `messages` (none without --rag)."""
    if retriever is None:
        return []
    question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    return retriever.search(question, args.top_k, args.rag_mode)


def _eval(args) -> int:
    from pathlib import Path

    from strop.api import default_eval_dir, evaluate

    out = Path(args.out) if args.out else default_eval_dir(args.target, args.data)
    check_out(str(out), args.force, [args.data], folder=True)  # named as the option, before any work
    s = evaluate(
        args.target,
        args.data,
        out,
        device=args.device,
        quantize=args.quantize,
        data_format=args.data_format,
        max_length=args.max_length,
        progress=True,
        force=args.force,
        rag=args.rag,
        top_k=args.top_k,
        rag_mode=args.rag_mode,
        rag_approximate=args.rag_approximate,
        max_examples=args.limit,
        metrics=args.metric,
        extract=args.extract,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        stop=args.stop,
        batch_size=args.batch_size,
        judge=judge_config(args),
    )
    scores = ", ".join(f"{k} {v:.4f}" for k, v in s["metrics"].items())
    loss = f"loss {s['loss']:.4f}, ppl {s['ppl']:.2f}, " if s["loss"] is not None else ""
    print(
        f"{s['examples']} examples in {s['seconds']:.0f} s ({s['examples_per_s']:.2f} examples/s): {loss}{scores}"
    )
    print(f"wrote {out / 'summary.json'} and {out / 'predictions.jsonl'}")
    if args.rag:
        print(f"passages of each prompt: {out / 'sources.jsonl'}")
    if "judge" in s:
        from strop.eval.judging import headline

        print(f"judge: {headline(s['judge'])} ({out / 'judge.json'})")
    return 0

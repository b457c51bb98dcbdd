"""`strop serve`: an OpenAI-compatible HTTP server for a run or model (strop.serve)."""

from __future__ import annotations

from strop.cli.options import (
    device_arg,
    port,
    positive_int,
    quantize_arg,
    renamed,
    retrieval_args,
    retriever_for,
)
from strop.core.errors import ConfigError


def register(sub) -> None:
    sv = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server for a run or model (and LoRA runs on its base)",
        description="Serves /v1/chat/completions, /v1/completions, /v1/models and /health on localhost, "
        "streaming or not, with concurrent requests decoded together. Each --adapter is listed as a model "
        "and selected by the request's `model`; the base is loaded once. A non-loopback --host needs an "
        "API key (--api-key or STROP_API_KEY). SIGTERM finishes the requests in flight, then exits.",
    )
    sv.add_argument("target", metavar="RUN_DIR|MODEL")
    sv.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=RUN_DIR",
        help="a LoRA run on the same base, served as model NAME (repeatable)",
    )
    sv.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    sv.add_argument("--port", type=port, default=8000, help="default: 8000 (0: any free port)")
    sv.add_argument("--api-key", help="require Authorization: Bearer KEY (default: $STROP_API_KEY)")
    sv.add_argument("--max-batch", type=positive_int, default=16, help="choices decoded together")
    sv.add_argument("--queue", type=positive_int, default=64, help="choices waiting or decoding before 429")
    sv.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=2048,
        help="cap on a request's max_tokens (default 2048)",
    )
    renamed(sv, "--max-tokens", "--max-new-tokens")
    sv.add_argument("--max-n", type=positive_int, default=8, help="cap on a request's n")
    sv.add_argument("--max-prompt-tokens", type=positive_int, help="default: the model's context length")
    device_arg(sv)
    quantize_arg(sv)
    retrieval_args(sv)
    sv.set_defaults(handler=_serve)


def _serve(args) -> int:
    from strop.serve.limits import Limits
    from strop.serve.run import serve

    adapters: dict[str, str] = {}
    for item in args.adapter:
        name, sep, run = item.partition("=")
        if not sep or not name or not run:
            raise ConfigError(f"--adapter {item}: expected NAME=RUN_DIR")
        if name in adapters:
            raise ConfigError(f"--adapter {item}: the name {name!r} is given twice")
        adapters[name] = run
    limits = Limits(
        max_tokens=args.max_new_tokens,
        n=args.max_n,
        prompt_tokens=args.max_prompt_tokens,
        queue=args.queue,
        max_batch=args.max_batch,
    )
    rag = retriever_for(args)
    serve(
        args.target,
        adapters,
        args.host,
        args.port,
        args.api_key,
        limits,
        args.device,
        args.quantize,
        rag=(rag, args.top_k, args.rag_mode) if rag else None,
    )
    return 0

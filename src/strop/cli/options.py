"""The options several commands share, their value types, and what they turn into.

An option means one thing under one name on every command (README, "One vocabulary"); the helpers
here are how a command declares one, so the name, the type check and the help are written once.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import get_args

from strop.core.data_config import DatasetSource
from strop.core.errors import StropError

DEVICES = ["auto", "cpu", "cuda", "mps"]
DATA_FORMATS = get_args(DatasetSource.model_fields["format"].annotation)


# ------------------------------------------------------------------------------------- value types


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def temperature(text: str) -> float:
    value = _number(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number >= 0 (0 = greedy), got {text!r}")
    return value


def probability(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {value}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


# ---------------------------------------------------------------------------------- shared options


def overrides_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key with a YAML value, e.g. --set optim.lr=1e-4 (repeatable)",
    )


def device_arg(p, help: str | None = None) -> None:
    p.add_argument("--device", default="auto", choices=DEVICES, help=help)


def sampling_args(p: argparse.ArgumentParser, temperature_default: float, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens)
    p.add_argument("--temperature", type=temperature, default=temperature_default, help="0 = greedy")
    p.add_argument("--top-p", type=probability, default=0.9 if temperature_default else 1.0, help="in (0, 1]")
    device_arg(p)


def data_format_arg(p) -> None:
    """The format of the rows a command reads (export's --format is the format it writes)."""
    p.add_argument(
        "--data-format", default="auto", choices=DATA_FORMATS, help="data format (default: detected)"
    )
    renamed(p, "--format", "--data-format")


def quantize_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quantize",
        choices=["int8"],
        help="int8 weights for the linear layers (CPU; see the README for its speed and perplexity here)",
    )
    renamed(p, "--quant", "--quantize")


def force_arg(p, help: str = "replace --out if it exists (an input is never replaced)") -> None:
    """--force, the one name for "replace what is there" on every command that writes a file."""
    p.add_argument("--force", action="store_true", help=help)


def mode_arg(p, flag: str) -> None:
    p.add_argument(
        flag, choices=["hybrid", "dense", "bm25"], default="hybrid", help="retrieval (default hybrid)"
    )


def retrieval_args(p) -> None:
    """--rag for the commands that answer prompts: each prompt is answered with passages from INDEX."""
    p.add_argument("--rag", metavar="INDEX", help="answer with passages retrieved from this index")
    p.add_argument("--top-k", type=positive_int, default=4, help="passages per prompt with --rag (default 4)")
    mode_arg(p, "--rag-mode")
    p.add_argument(
        "--rag-approximate",
        action="store_true",
        help="dense hits from an HNSW graph (usearch) instead of exact search: for large indexes",
    )


def retriever_for(args):
    """The --rag index loaded (before any model, so a wrong path fails first), or None."""
    if not getattr(args, "rag", None):
        return None
    from strop.rag.search import Retriever

    return Retriever(args.rag, approximate=args.rag_approximate)


# ------------------------------------------------------------------------------------- old names


class RenamedOption(StropError):
    """An old spelling of an option: one `error:` line naming the new one (exit status 2)."""


class _Renamed(argparse.Action):
    def __init__(self, option_strings, dest, new: str, hint: str = "", **kwargs):
        kwargs.update(nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)
        self.new, self.hint = new, hint

    def __call__(self, parser, namespace, values, option_string=None):
        old = option_string or self.metavar
        raise RenamedOption(f"{old} was renamed {self.new}" + (f": {self.hint}" if self.hint else ""))


def renamed(p, old: str, new: str, hint: str = "") -> None:
    """`old` (an option, or the metavar of a positional argument that became an option) fails with
    `error: OLD was renamed NEW[: hint]`. Hidden from --help; an exact old option name also keeps
    argparse from reading it as an abbreviation of the new one (--quant of --quantize)."""
    if old.startswith("-"):
        p.add_argument(old, action=_Renamed, new=new, hint=hint)
    else:  # a positional argument: a hidden extra one, only seen when the old form gives one too many
        p.add_argument(f"renamed_{old.lower()}", metavar=old, action=_Renamed, new=new, hint=hint)


# ------------------------------------------------------------------------------------------ output


def check_out(out: str | None, force: bool, inputs: list, folder: bool = False) -> None:
    """A bad output path fails before the work whose result it would hold; so does one that exists
    (unless `force`) or that is one of `inputs` (always)."""
    if out:
        from strop.core.io import check_fresh_output

        check_fresh_output(out, "--out", folder, force, inputs)


def emit_jsonl(lines: list[str], out: str | None, what: str) -> None:
    """JSON lines to a file (atomically, with a count on stderr) or to stdout."""
    if out:
        from pathlib import Path

        from strop.core.io import atomic_write_text

        atomic_write_text(Path(out), "".join(line + "\n" for line in lines))
        print(f"wrote {len(lines)} {what} to {out}", file=sys.stderr)
    else:
        print("\n".join(lines))


def judge_options(p, required: bool = False, agreement: bool = True) -> None:
    """The judge of `strop judge` and `strop eval --judge` (core/judge_config.py)."""
    p.add_argument(
        "--judge",
        required=required,
        metavar="URL|RUN|MODEL",
        help="the judge: an OpenAI-compatible base URL (…/v1), or a strop run or catalogue model that "
        "strop serves on loopback while it judges",
    )
    p.add_argument("--judge-model", help="the model name the endpoint serves (default: the first it lists)")
    p.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="the environment variable holding the judge's API key (never the key)",
    )
    p.add_argument(
        "--judge-concurrency", type=positive_int, default=4, help="judge requests in flight at once"
    )
    p.add_argument(
        "--judge-max-new-tokens",
        type=positive_int,
        default=512,
        help="the longest judgment the judge may write",
    )
    p.add_argument(
        "--judge-template",
        metavar="FILE",
        help="the judge prompt: pairwise ({question}, {answer_a}, {answer_b}, {reference}) for strop judge, "
        "rubric ({question}, {answer}, {reference}, {rubric}) for strop eval",
    )
    if agreement:
        p.add_argument(
            "--judge-agreement",
            metavar="PAIRS",
            help="held-out preference pairs {prompt, chosen, rejected}: the judge's agreement with them "
            "is measured first and stated beside its verdicts",
        )


def judge_config(args):
    """The judge settings the options give, checked (None without --judge)."""
    if not getattr(args, "judge", None):
        return None
    from strop.core.judge_config import JudgeConfig
    from strop.eval.judging import check_judge

    rubric = getattr(args, "judge_rubric_template", False)
    cfg = JudgeConfig(
        endpoint=args.judge,
        model=args.judge_model,
        api_key_env=args.api_key_env,
        concurrency=args.judge_concurrency,
        max_tokens=args.judge_max_new_tokens,
        pairwise_template=None if rubric else args.judge_template,
        rubric_template=args.judge_template if rubric else None,
        agreement=getattr(args, "judge_agreement", None),
    )
    check_judge(cfg)
    return cfg

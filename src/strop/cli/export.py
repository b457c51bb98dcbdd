"""`strop merge | export`: a run or model as what other tools load."""

from __future__ import annotations

from strop.cli.options import force_arg, renamed


def register(sub) -> None:
    m = sub.add_parser(
        "merge",
        help="fold a LoRA adapter into its base model",
        description="Write a plain transformers model folder (safetensors) with the adapter "
        "merged in; AutoModelForCausalLM.from_pretrained loads it.",
    )
    m.add_argument("run_dir", metavar="RUN_DIR")
    m.add_argument("--out", required=True, metavar="DIR", help="the merged model's folder (empty or new)")
    renamed(m, "OUT_DIR", "--out", "strop merge RUN_DIR --out DIR")
    force_arg(m, "replace --out if it is not empty (never a run's own model folder)")
    m.set_defaults(handler=_merge)

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
        "--quantize",
        default="q8_0",
        choices=["f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"],
        help="GGUF tensor type (K-quants need llama-cpp-python; default: q8_0)",
    )
    renamed(x, "--quant", "--quantize")
    x.add_argument(
        "--out",
        help="the .gguf file (default: NAME-TYPE.gguf here, TYPE as --quantize) or, for hf, the folder",
    )
    force_arg(
        x, "replace --out if it exists: the GGUF, the Modelfile and the README beside it (or the hf folder)"
    )
    x.set_defaults(handler=_export)


def _merge(args) -> int:
    from strop.core.io import check_output
    from strop.export.merge import merge

    check_output(args.out, "--out", folder=True)  # merge refuses a folder that is not empty
    out = merge(args.run_dir, args.out, args.force, option="--out")
    print(f"merged model written to {out}")
    return 0


def _export(args) -> int:
    from strop.export.ship import export, report

    print(report(export(args.target, args.format, args.quantize, args.out, args.force)))
    return 0

"""`strop data check | prepare`: the data doctor, and cleaning and splitting data into a run's files."""

from __future__ import annotations

import argparse

from strop.cli.configs import CONFIGS, config_path
from strop.cli.options import check_out, data_format_arg, force_arg, overrides_arg, positive_int
from strop.core.errors import StropError


def register(sub) -> None:
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
    dc.add_argument("--max-length", type=positive_int, help="tokens per example (default: the config's)")
    dc.add_argument("--json", action="store_true", help="print the full report as JSON")
    dc.add_argument("--strict", action="store_true", help="exit with status 1 when there is any error")
    dc.add_argument("--no-estimate", action="store_true", help="skip the time and memory estimate")
    overrides_arg(dc)
    dc.set_defaults(handler=_data_check)

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
    data_format_arg(dp)
    dp.add_argument("--seed", type=int, default=0)
    force_arg(dp, "replace --out if it is not empty (no input may be inside it)")
    dp.add_argument("--overwrite", dest="force", action="store_true", help=argparse.SUPPRESS)  # its old name
    dp.set_defaults(handler=_data_prepare)


def _data_check(args) -> int:
    import json
    from pathlib import Path

    from strop.core.config import load_config
    from strop.recipes.data_check import render, run_check

    overrides = list(args.overrides)
    first = Path(args.inputs[0])
    shipped = (CONFIGS / f"{first.name}.yaml").is_file() and not first.exists()
    if len(args.inputs) == 1 and (first.suffix in (".yaml", ".yml") or shipped):
        config: str | dict = config_path(args.inputs[0])
    else:
        config = {"data": {"train": args.inputs}}
    if args.validation:
        overrides.append(f"data.validation={json.dumps(args.validation)}")
    if args.test:
        overrides.append(f"data.test={json.dumps(args.test)}")
    if args.model:
        overrides.append(f"model.name={json.dumps(args.model)}")
    if args.max_length:
        overrides.append(f"data.max_length={args.max_length}")
    cfg = load_config(config, overrides)
    if cfg.stages:  # each stage's data as that stage will read it, with the first stage's tokenizer
        from strop.core.config import stage_configs

        checks = {
            s.name: run_check(s.model_copy(update={"model": cfg.model}), estimate=not args.no_estimate)
            for s in stage_configs(cfg)
        }
        if args.json:
            print(json.dumps({"stages": {k: c.report for k, c in checks.items()}}, indent=1))
        else:
            print("\n\n".join(f"== stage {k} ==\n{render(c.report)}" for k, c in checks.items()))
        return 1 if args.strict and any(c.errors for c in checks.values()) else 0
    result = run_check(cfg, estimate=not args.no_estimate)
    print(json.dumps(result.report, indent=1) if args.json else render(result.report))
    return 1 if args.strict and result.errors else 0


def _data_prepare(args) -> int:
    from pathlib import Path

    from strop.data.prepare import PrepareOptions, prepare

    try:
        split = tuple(float(x) for x in args.split.split(","))
    except ValueError:
        raise StropError(f"--split: expected three fractions like 0.8,0.1,0.1, got {args.split!r}") from None
    if len(split) != 3:
        raise StropError(f"--split: expected three fractions (train,validation,test), got {args.split!r}")
    options = PrepareOptions(
        normalize=not args.no_normalize,
        dedup=args.dedup,
        near_threshold=args.near_threshold,
        min_chars=args.min_chars,
        max_chars=args.max_chars,
        mask_pii=args.mask_pii,
        split=split,
        stratify=args.stratify,
        group_by=args.group_by,
        seed=args.seed,
    )
    check_out(args.out, args.force, args.inputs, folder=True)
    manifest = prepare(args.inputs, Path(args.out), options, fmt=args.data_format, force=args.force)
    counts = ", ".join(f"{k} {v}" for k, v in manifest["counts"].items())
    removed = ", ".join(f"{k} {v}" for k, v in manifest["removed_counts"].items()) or "nothing"
    print(f"wrote {args.out}: {counts}; removed: {removed}")
    print(f"manifest: {Path(args.out) / 'manifest.json'}")
    return 0

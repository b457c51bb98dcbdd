"""`strop data check | prepare`: what the data doctor and the data preparation commands do."""

from __future__ import annotations

from strop.cli.main import CONFIGS
from strop.core.errors import StropError


def _data_check(args) -> int:
    import json
    from pathlib import Path

    from strop.cli.commands import _config_path
    from strop.core.config import load_config
    from strop.recipes.data_check import render, run_check

    overrides = list(args.overrides)
    first = Path(args.inputs[0])
    shipped = (CONFIGS / f"{first.name}.yaml").is_file() and not first.exists()
    if len(args.inputs) == 1 and (first.suffix in (".yaml", ".yml") or shipped):
        config: str | dict = _config_path(args.inputs[0])
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

    from strop.cli.commands import _check_out
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
    _check_out(args.out, args.force, args.inputs, folder=True)
    manifest = prepare(args.inputs, Path(args.out), options, fmt=args.format, force=args.force)
    counts = ", ".join(f"{k} {v}" for k, v in manifest["counts"].items())
    removed = ", ".join(f"{k} {v}" for k, v in manifest["removed_counts"].items()) or "nothing"
    print(f"wrote {args.out}: {counts}; removed: {removed}")
    print(f"manifest: {Path(args.out) / 'manifest.json'}")
    return 0

"""`strop report | compare`: a run's report, and several runs side by side."""

from __future__ import annotations

from strop.cli.options import check_out, force_arg
from strop.core.errors import StropError


def register(sub) -> None:
    r = sub.add_parser(
        "report",
        help="(re)write a run's report: report.html, report.md, report.json",
        description="The run report: config, data, curves, diagnosis, base vs tuned with confidence "
        "intervals, forgetting and sample generations. Written at the end of every run.",
    )
    r.add_argument("run_dir", metavar="RUN_DIR")
    r.set_defaults(handler=_report)

    cmp = sub.add_parser(
        "compare",
        help="several runs side by side (curves overlaid, metrics table) as HTML and Markdown",
    )
    cmp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    cmp.add_argument("--out", default="compare", help="output folder (default: ./compare)")
    force_arg(cmp, "write into --out even when it is not empty (its compare files are replaced)")
    cmp.set_defaults(handler=_compare)


def _report(args) -> int:
    from pathlib import Path

    from strop.report import write_report

    run = Path(args.run_dir)
    if (run / "study.json").is_file():  # a strop tune search
        from strop.report.study import write_study_report

        print(f"wrote {write_study_report(run)}")
        return 0
    if not (run / "config.yaml").is_file():
        raise StropError(f"{run}: not a strop run directory (no config.yaml)")
    paths = write_report(run)
    print("\n".join(f"wrote {p}" for p in paths.values()))
    return 0


def _compare(args) -> int:
    from pathlib import Path

    from strop.report import write_comparison

    runs = [Path(r) for r in args.run_dirs]
    for run in runs:
        if not (run / "config.yaml").is_file():
            raise StropError(f"{run}: not a strop run directory (no config.yaml)")
    check_out(args.out, args.force, [], folder=True)
    paths = write_comparison(runs, Path(args.out))
    print("\n".join(f"wrote {p}" for p in paths.values()))
    return 0

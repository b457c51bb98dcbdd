"""`strop judge compare | check`: a judge model behind an OpenAI-compatible endpoint compares a run's
tuned replies with its base model's, and is itself checked on preference pairs whose better reply is
known (eval/judge.py)."""

from __future__ import annotations

from strop.cli.options import check_out, force_arg, judge_config, judge_options, positive_int, renamed
from strop.core.errors import StropError


def judge_args(p, agreement: bool) -> None:
    judge_options(p, required=True, agreement=agreement)
    renamed(p, "--concurrency", "--judge-concurrency")
    renamed(p, "--template", "--judge-template")
    p.add_argument("--limit", type=positive_int, help="only the first N examples")
    p.add_argument("--out", help="where the judgments go, as JSON (default: print the summary only)")
    force_arg(p)


def register(sub) -> None:
    j = sub.add_parser(
        "judge",
        help="LLM-as-judge: a run's tuned vs base replies, or how well a judge agrees with known preferences",
    )
    jsub = j.add_subparsers(dest="judge_command", required=True, metavar="COMMAND")
    c = jsub.add_parser(
        "compare",
        help="pairwise win rate of a run's tuned replies over its base model's (eval/samples.jsonl)",
        description="Each prompt of the run's evaluation is judged twice, the two replies in both orders; "
        "disagreeing orders count as a tie. Prints the tuned model's win rate with its bootstrap interval, "
        "the position bias and the verdicts the judge did not write in the template's format.",
    )
    c.add_argument("run_dir", metavar="RUN_DIR")
    c.add_argument("--reference", action="store_true", help="show the judge each example's reference reply")
    judge_args(c, agreement=True)
    c.set_defaults(handler=_compare)
    k = jsub.add_parser(
        "check",
        help="how often the judge prefers the chosen reply of held-out preference pairs",
        description="Rows {prompt, chosen, rejected}: the judge's agreement with the known preference, "
        "with its interval; a win rate from a judge is worth what this agreement says.",
    )
    k.add_argument("pairs", metavar="PAIRS")
    judge_args(k, agreement=False)
    k.set_defaults(handler=_check)


def _rows(path, fields: tuple[str, ...], limit: int | None) -> list[dict]:
    from pathlib import Path

    from strop.eval.judging import read_rows

    return read_rows(Path(path), fields, limit)


def _summary(out: dict, who: str) -> str:
    rate = (
        "no verdict could be read"
        if out["win_rate"] is None
        else (
            f"{who} {out['win_rate']:.3f} (95% CI {out['ci'][0]:.3f} to {out['ci'][1]:.3f}) over {out['judged']} prompts"
        )
    )
    u = out["usage"]
    extra = (
        f"; position bias {out['position_bias']:.2f}, orders agreeing {out['consistency']:.2f}"
        if out["judged"]
        else ""
    )
    return (
        f"{rate}{extra}; unreadable verdicts {out['unparsed']} of {out['prompts']}; judge {out['judge']['model']}: "
        f"{u['requests']} requests ({u['retries']} retries), {u['cache_hits']} from the cache, "
        f"{u['prompt_tokens'] + u['completion_tokens']} tokens, {u['seconds']:.0f} s"
    )


def _write(out: dict, path: str | None) -> None:
    if path:
        from pathlib import Path

        from strop.core.io import atomic_write_json

        atomic_write_json(Path(path), out)
        print(f"wrote {path}")


def _compare(args) -> int:
    import tempfile
    from pathlib import Path

    from strop.eval.judge import Judge, compare
    from strop.eval.judging import agreement, judge_endpoint

    samples = Path(args.run_dir) / "eval" / "samples.jsonl"
    check_out(args.out, args.force, [str(samples)])
    if not samples.is_file():
        raise StropError(
            f"{args.run_dir}: no eval/samples.jsonl (a run evaluated with eval.enabled: true has one)"
        )
    rows = _rows(samples, ("input", "base", "tuned"), args.limit)
    refs = [r.get("reference") for r in rows] if args.reference else None
    cfg = judge_config(args)
    with tempfile.TemporaryDirectory() as logs, judge_endpoint(cfg, Path(logs)) as at:
        judge = Judge(at)
        checked = agreement(judge, Path(cfg.agreement), cfg.agreement_limit) if cfg.agreement else None
        out = compare(
            judge, [r["input"] for r in rows], [r["base"] for r in rows], [r["tuned"] for r in rows], refs
        )
    if checked is not None:
        out["agreement"] = {k: v for k, v in checked.items() if k != "per_prompt"}
        print(_summary(checked, "the judge's agreement with the chosen replies"))
    print(_summary(out, "tuned win rate over base"))
    _write(out, args.out)
    return 0


def _check(args) -> int:
    import tempfile
    from pathlib import Path

    from strop.eval.judge import Judge
    from strop.eval.judging import agreement, judge_endpoint

    check_out(args.out, args.force, [args.pairs])
    _rows(args.pairs, ("prompt", "chosen", "rejected"), args.limit)  # a bad row is said before serving
    with tempfile.TemporaryDirectory() as logs, judge_endpoint(judge_config(args), Path(logs)) as at:
        out = agreement(Judge(at), Path(args.pairs), args.limit)
    print(_summary(out, "agreement with the chosen reply"))
    _write(out, args.out)
    return 0

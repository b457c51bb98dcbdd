"""The judge's part of a report, from eval/summary.json's `judge` entry (eval/judging.py): the win rate
and grades with their intervals, and beside them what the judge is worth: its agreement with known
preferences, or a note that it was not checked. A judge no better than chance is said so in a warning."""

from __future__ import annotations

from strop.report.collect import dig, is_number
from strop.report.document import note, num, section, table, text, warning


def judge_section(ev: dict) -> dict | None:
    j = ev.get("judge") if isinstance(ev, dict) else None
    if not isinstance(j, dict):
        return None
    who = dig(j, "judge", "model") or "the judge"
    blocks = [text(f"Judge: {who} at {dig(j, 'judge', 'endpoint') or '?'}.")]
    rows = []
    p = j.get("pairwise")
    if isinstance(p, dict):
        wins = p.get("wins") or {}
        rows.append(
            [
                "tuned win rate over base (ties ½)",
                _ci_cell(p.get("win_rate"), p.get("ci")),
                f"{p.get('judged')} of {p.get('prompts')} prompts; tuned {wins.get('b')}, base {wins.get('a')}, "
                f"tie {wins.get('tie')}; orders disagreeing {p.get('disagreements')}; position bias "
                f"{num(p.get('position_bias'))}; unreadable {p.get('unparsed')}",
            ]
        )
    for model, g in (j.get("rubric") or {}).items():
        if isinstance(g, dict):
            rows.append(
                [
                    f"{model} rubric grade (1-10)",
                    _ci_cell(g.get("mean"), g.get("ci")),
                    f"{g.get('graded')} of {g.get('replies')} replies graded; unreadable {g.get('unparsed')}",
                ]
            )
    a = j.get("agreement")
    if isinstance(a, dict):
        rows.append(
            [
                "judge agreement with known preferences",
                _ci_cell(a.get("win_rate"), a.get("ci")),
                f"{a.get('judged')} of {a.get('prompts')} held-out pairs ({a.get('pairs') or '?'}); 0.5 is chance",
            ]
        )
    blocks.append(table(["", "value (95% CI)", "counts"], rows) if rows else note("No judgment was made."))
    u = j.get("usage") or {}
    blocks.append(
        note(
            f"Judge cost: {u.get('requests', 0)} requests ({u.get('retries', 0)} retries), "
            f"{u.get('cache_hits', 0)} from the cache, "
            f"{(u.get('prompt_tokens') or 0) + (u.get('completion_tokens') or 0)} tokens, "
            f"{num(u.get('wall_seconds'))} s."
        )
    )
    worth = judge_worth(j)
    blocks.append(warning(worth) if worth.startswith("⚠") else note(worth))
    return section("LLM judge", blocks)


def judge_worth(j: dict) -> str:
    a = j.get("agreement")
    if not isinstance(a, dict) or not is_number(a.get("win_rate")):
        return (
            "The judge itself was not checked: its verdicts are unweighed opinions. Set judge.agreement "
            "to held-out preference pairs to measure how often it prefers the known better reply."
        )
    ci = a.get("ci") or [None, None]
    if is_number(ci[0]) and ci[0] <= 0.5:
        return (
            f"⚠ The judge agrees with known preferences {num(a['win_rate'])} of the time (95% CI "
            f"{num(ci[0])} to {num(ci[1])}): not distinguishable from chance, so its verdicts here are not "
            "evidence. A larger judge model is needed."
        )
    return f"The judge agrees with known preferences {num(a['win_rate'])} of the time (95% CI {num(ci[0])} to {num(ci[1])})."


def judge_headline(ev: dict) -> str | None:
    j = ev.get("judge") if isinstance(ev, dict) else None
    p = j.get("pairwise") if isinstance(j, dict) else None
    if not isinstance(j, dict) or not isinstance(p, dict) or not is_number(p.get("win_rate")):
        return None
    ci = p.get("ci") or [None, None]
    return (
        f"Judge: tuned win rate over base {num(p['win_rate'])} (95% CI {num(ci[0])} to {num(ci[1])}). "
        + judge_worth(j).split(":")[0].removeprefix("⚠ ")
        + "."
    )


def _ci_cell(value, ci) -> str:
    if not is_number(value):
        return "—"
    if isinstance(ci, list) and len(ci) == 2 and all(is_number(x) for x in ci):
        return f"{num(value)} ({num(ci[0])} to {num(ci[1])})"
    return num(value)

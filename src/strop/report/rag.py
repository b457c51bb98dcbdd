"""`strop rag compare` (recipes/rag_compare.py) as Markdown: one table of arms, their scores, gains over base and costs."""

from __future__ import annotations

NAMES = {
    "token_f1": "token F1",
    "exact_match": "exact match",
    "rouge_l": "ROUGE-L",
    "embedding": "embedding cos",
}


def _interval(d: dict | None) -> str:
    if not d:
        return "—"
    return f"{d['diff']:+.3f} ({d['ci'][0]:+.3f} to {d['ci'][1]:+.3f})"


def _seconds(s: float | None) -> str:
    return "—" if s is None else f"{s:.0f}" if s >= 10 else f"{s:.1f}"


def compare_markdown(result: dict) -> str:
    primary = result["primary"]
    metrics = list(result["arms"][0]["scores"])
    lines = [
        "# Fine-tune, RAG, or both?",
        "",
        f"{result['questions']} held-out questions; retrieval: top {result['top_k']} chunks, {result['mode']}"
        + (
            f" (gold document in the top {result['top_k']}: {result['retrieval_recall']:.1%})"
            if result.get("retrieval_recall") is not None
            else ""
        )
        + "; greedy answers.",
        "",
        "| arm | "
        + " | ".join(NAMES.get(m, m) for m in metrics)
        + f" | {NAMES.get(primary, primary)} vs base (95% CI) "
        "| train s | index s | prompt tokens | answer tokens | s / answer |",
        "|---|" + "---|" * (len(metrics) + 6),
    ]
    for e in result["arms"]:
        c = e["cost"]
        lines.append(
            f"| {e['arm']} | "
            + " | ".join(f"{e['scores'][m]:.3f}" for m in metrics)
            + f" | {_interval(e['vs_base'].get(primary))} | {_seconds(c['train_seconds'])} | "
            f"{_seconds(c['index_seconds'])} | {c['prompt_tokens']:.0f} | {c['answer_tokens']:.0f} | "
            f"{c['seconds_per_answer']:.2f} |"
        )
    lines += ["", f"**Verdict.** {result['verdict']}", ""]
    if result.get("judge"):
        lines += _judge_lines(result["judge"])
    return "\n".join(lines)


def _judge_lines(j: dict) -> list[str]:
    from strop.report.judge import judge_worth

    lines = [
        f"**Judge** ({j['judge']['model']}): each arm's answer against the base model's, both orders, "
        "the reference shown; a tie counts half.",
        "",
        "| arm | judge win rate vs base (95% CI) | judged | orders disagreeing | position bias | unreadable |",
        "|---|---|---|---|---|---|",
    ]
    for arm, p in j["arms"].items():
        rate = (
            f"{p['win_rate']:.3f} ({p['ci'][0]:.3f} to {p['ci'][1]:.3f})"
            if p.get("win_rate") is not None
            else "—"
        )
        bias = f"{p['position_bias']:.2f}" if p.get("position_bias") is not None else "—"
        lines.append(
            f"| {arm} | {rate} | {p['judged']} of {p['prompts']} | {p['disagreements']} | {bias} | {p['unparsed']} |"
        )
    u = j.get("usage") or {}
    lines += [
        "",
        judge_worth(j),
        f"Judge cost: {u.get('requests', 0)} requests, {u.get('cache_hits', 0)} from the cache, "
        f"{u.get('wall_seconds', 0):.0f} s.",
        "",
    ]
    return lines

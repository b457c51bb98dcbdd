"""The report's section for reinforcement-learning runs (task ppo or grpo): the reward curve, KL and reply
length per step, and the mean reward of the starting and the tuned model's greedy replies to held-out
prompts, with paired examples."""

from __future__ import annotations

import json
from pathlib import Path

from strop.report.collect import dig, is_number
from strop.report.diagnose import series, smooth
from strop.report.document import example, image, note, num, section, table, text
from strop.report.plots import FIGSIZE, new_figure, to_png


def is_rl(ev: dict, config: dict | None) -> bool:
    return (isinstance(ev, dict) and ev.get("task") in ("ppo", "grpo")) or (
        isinstance(config, dict) and config.get("task") in ("ppo", "grpo")
    )


def rl_headline(ev: dict) -> str | None:
    r = ev.get("reward") if isinstance(ev, dict) else None
    if not isinstance(r, dict) or r.get("tuned") is None:
        return None
    start = f" (starting model {num(r['start'])})" if r.get("start") is not None else ""
    return f"Mean reward of greedy replies to {ev.get('prompts')} {ev.get('set')} prompts: {num(r['tuned'])}{start}."


def reward_plot(records: list[dict]) -> bytes | None:
    """Mean rollout reward per step (raw, faint, and smoothed), the held-out greedy reward, and the KL
    to the starting model on a second axis."""
    steps, reward = series(records, "reward")
    vsteps, vreward = series(records, "val_reward")
    if len(reward) == 0:
        return None
    fig, ax = new_figure(FIGSIZE)
    ax.plot(steps, reward, color="C0", alpha=0.35, linewidth=1, label="rollout reward (raw)")
    ax.plot(steps, smooth(reward, min_span=5), color="C0", linewidth=2, label="rollout reward (smoothed)")
    if len(vreward):
        ax.plot(
            vsteps, vreward, color="C1", marker="o", markersize=4, linewidth=1.5, label="held-out (greedy)"
        )
    ksteps, kl = series(records, "kl")
    if len(kl):
        twin = ax.twinx()
        twin.plot(ksteps, kl, color="C3", linestyle="--", linewidth=1, label="KL to start")
        twin.set_ylabel("KL per reply", fontsize=8)
        twin.legend(fontsize=8, frameon=False, loc="lower right")
    ax.set(xlabel="step", ylabel="reward", title="Reward")
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    return to_png(fig)


def policy_plot(records: list[dict]) -> bytes | None:
    """Per step: the mean rollout reply length in tokens, and the share of reply tokens whose ratio the
    clip held (below the range where the advantage is negative, above it where positive): how far
    each update tried to move the policy, for every rl.loss."""
    steps, tokens = series(records, "reply_tokens")
    if len(tokens) == 0:
        return None
    fig, ax = new_figure(FIGSIZE)
    ax.plot(steps, tokens, color="C2", linewidth=1.5, label="reply tokens (rollouts)")
    ax.set(xlabel="step", ylabel="tokens per reply", title="Reply length and clipping")
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    clips = [(key, *series(records, key)) for key in ("clip_low", "clip_high", "clipfrac")]
    clips = [c for c in clips if len(c[2])][:2]  # the two sides, else PPO's one clipfrac
    if clips:
        twin = ax.twinx()
        for (key, csteps, values), style in zip(clips, ("--", ":"), strict=False):
            if len(values):
                twin.plot(
                    csteps, values, color="C3", linestyle=style, linewidth=1, label=key.replace("_", " ")
                )
        twin.set_ylabel("share of tokens clipped", fontsize=8)
        twin.legend(fontsize=8, frameon=False, loc="upper right")
    return to_png(fig)


def rl_section(run_dir: Path, ev: dict, records: list[dict]) -> dict:
    title = "Reward (reinforcement learning)"
    blocks = [
        image("reward", reward_plot(records), "reward and KL per step"),
        image("policy", policy_plot(records), "reply length and clip fractions per step"),
    ]
    if not ev:
        return section(title, [*blocks, note("No evaluation in this run (no eval/summary.json).")])
    r, n = ev.get("reward") or {}, ev.get("reply_tokens") or {}
    blocks.append(
        text(
            f"Greedy replies to {ev.get('prompts')} {ev.get('set')} prompts, never trained on, scored by the run's reward."
        )
    )
    blocks.append(
        table(
            ["model", "mean reward", "reply tokens"],
            [
                ["starting", num(r.get("start")), num(n.get("start"))],
                ["tuned", num(r.get("tuned")), num(n.get("tuned"))],
            ],
        )
    )
    gain = r.get("gain")
    if isinstance(gain, dict) and isinstance(gain.get("ci"), list) and len(gain["ci"]) == 2:
        lo, hi = gain["ci"]
        verdict = "the tuned model scores higher" if lo > 0 else "not a clear gain" if hi > 0 else "lower"
        blocks.append(
            text(
                f"Gain {num(gain.get('diff'))}, 95% paired-bootstrap interval {num(lo)} to {num(hi)} over "
                f"the same prompts: {verdict}."
            )
        )
    path = run_dir / "eval" / "rl_samples.jsonl"
    rows = (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    )
    for s in rows[:4]:
        blocks.append(
            example(
                str(s.get("id")),
                [
                    ("prompt", s.get("prompt")),
                    (f"starting model (reward {num(s.get('start_reward'))})", s.get("start_reply")),
                    (f"tuned (reward {num(s.get('reward'))})", s.get("reply")),
                ],
            )
        )
    return section(title, blocks)


KL_WARN = 10.0  # nats per reply: far from the starting model, where reward hacking tends to begin


def rl_findings(records: list[dict], result: dict | None = None) -> list[dict]:
    """The loss-curve diagnosis does not apply to RL (its losses are surrogate objectives); this says
    whether the rollout reward and the held-out reward rose, whether the policy drifted far, and which
    step's weights were kept."""
    _, reward = series(records, "reward")
    _, vreward = series(records, "val_reward")
    _, kl = series(records, "kl")
    out = []
    if len(reward) >= 8:
        q = max(1, len(reward) // 4)
        first, last = float(reward[:q].mean()), float(reward[-q:].mean())
        rose = last > first
        out.append(
            {
                "kind": "trend",
                "severity": "ok" if rose else "warning",
                "text": f"Rollout reward {'rose' if rose else 'did not rise'}: {num(first)} in the first "
                f"quarter of steps, {num(last)} in the last.",
            }
        )
    if len(vreward) >= 2:
        rose = vreward[-1] > vreward[0]
        out.append(
            {
                "kind": "heldout",
                "severity": "ok" if rose else "warning",
                "text": f"Held-out greedy reward {num(float(vreward[0]))} at the start, {num(float(vreward[-1]))} "
                "at the end.",
            }
        )
    if len(reward) and not len(kl):
        out.append(
            {
                "kind": "kl",
                "severity": "info",
                "text": "No KL to the starting model was measured (rl.kl_coef 0 skips the reference pass), "
                "so drift is unchecked: read the samples.",
            }
        )
    if len(kl) and float(kl[-1]) > KL_WARN:
        out.append(
            {
                "kind": "kl",
                "severity": "warning",
                "text": f"KL to the starting model reached {num(float(kl[-1]))} nats per reply: read the samples "
                "for reward hacking, or raise rl.kl_coef / set rl.target_kl.",
            }
        )
    kept, best = dig(result, "metrics", "kept_step"), dig(result, "metrics", "best_val_reward")
    if is_number(kept):
        out.append(
            {
                "kind": "best",
                "severity": "info",
                "text": f"Kept the weights of step {num(kept)}, whose held-out greedy reward ({num(best)}) was "
                "the best of the trained steps; the tuned figures below are for them. They were chosen on "
                "the validation prompts, so only a test set (data.test) scores them without bias.",
            }
        )
    if len(vreward) >= 2 and is_number(best) and best < vreward[0]:
        out.append(
            {
                "kind": "start_best",
                "severity": "warning",
                "text": f"The starting model's held-out reward ({num(float(vreward[0]))}) beat every trained "
                f"step (best {num(best)}): training did not help on held-out prompts.",
            }
        )
    return out or [
        {"kind": "empty", "severity": "info", "text": "Too few steps to judge the reward's trend."}
    ]

"""The `rl` section of a run config: reinforcement learning from a reward (task: ppo or grpo)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from strop.core.section import Section


class RLConfig(Section):
    """The policy samples replies to the training prompts, a reward scores them, and the policy moves
    toward higher reward while a KL penalty keeps it near the starting model."""

    reward: str = Field(
        description="a strop reward run (its folder), a built-in reward (length, contains, avoid, "
        "exact_match, gsm8k) or a Python function module:function or path/file.py:function, called as "
        "f(prompts, completions, **columns) -> list of floats (imported, so its code runs)"
    )
    reward_args: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments for the reward function (e.g. target: 20)"
    )
    prompts_per_step: int = Field(8, ge=1, description="prompts sampled per rollout (one rollout per step)")
    group_size: int = Field(
        1, ge=1, description="replies sampled per prompt; grpo compares them, so it needs at least 2"
    )
    max_new_tokens: int = Field(48, ge=1, description="longest reply sampled in a rollout")
    missing_eos_penalty: float = Field(
        0.0,
        ge=0.0,
        description="subtracted from the reward of a rollout reply cut off at max_new_tokens before it "
        "ended its turn (TRL's missing_eos_penalty), so the policy learns to finish; 0 turns it off",
    )
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature of rollouts")
    top_p: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="nucleus sampling of rollouts; below 1 the importance ratios use the untruncated "
        "distribution (as TRL does), so keep 1 unless replies degenerate",
    )
    update_epochs: int = Field(2, ge=1, description="passes over each rollout batch")
    mini_batch: int | None = Field(
        None, ge=1, description="rollout replies per optimizer update (default: the whole rollout)"
    )
    kl_coef: float = Field(0.05, ge=0.0, description="weight of the KL penalty to the starting model")
    target_kl: float | None = Field(
        None, gt=0.0, description="ppo: adapt kl_coef toward this KL per reply (Ziegler et al. 2019)"
    )
    kl_horizon: int = Field(10000, ge=1, description="ppo: replies over which the adaptive KL adjusts")
    clip: float = Field(0.2, gt=0.0, description="policy ratio clipping")
    value_clip: float = Field(0.2, gt=0.0, description="ppo: value clipping")
    vf_coef: float = Field(0.1, ge=0.0, description="ppo: weight of the value loss")
    gamma: float = Field(1.0, gt=0.0, le=1.0, description="ppo: discount")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="ppo: GAE lambda")
    eval_prompts: int = Field(
        32, ge=1, description="held-out prompts whose greedy replies are scored for val_reward"
    )

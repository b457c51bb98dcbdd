"""The `rl` section of a run config: reinforcement learning from a reward (task: ppo or grpo), with the
settings each group-relative loss (`rl.loss`) reads."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from strop.core.section import Section


class RewardTerm(Section):
    """One further reward of a weighted sum (`rl.add_rewards`)."""

    reward: str = Field(
        description="a built-in reward (length, contains, avoid, exact_match, gsm8k, format, length_penalty) "
        "or a Python function "
        "module:function or path/file.py:function, as rl.reward"
    )
    weight: float = Field(1.0, description="its weight in the sum")
    args: dict[str, Any] = Field(default_factory=dict, description="its keyword arguments, as rl.reward_args")


class RLConfig(Section):
    """The policy samples replies to the training prompts, a reward scores them, and the policy moves
    toward higher reward while a KL penalty keeps it near the starting model."""

    reward: str = Field(
        description="a strop reward run (its folder), a built-in reward (length, contains, avoid, "
        "exact_match, gsm8k, format, length_penalty) or a Python function module:function or path/file.py:function, "
        "called as "
        "f(prompts, completions, **columns) -> list of floats (imported, so its code runs)"
    )
    reward_args: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments for the reward function (e.g. target: 20)"
    )
    add_rewards: list[RewardTerm] = Field(
        default_factory=list,
        description="further rewards added to rl.reward, each times its weight (e.g. a format reward "
        "beside gsm8k's exact match, or a length penalty): the run's reward is their weighted sum",
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
    loss: Literal["grpo", "dapo", "dr_grpo", "gspo", "cispo", "rloo"] = Field(
        "dapo",
        description="grpo: the group-relative loss (methods/rl_losses.py): dapo (token-level mean, "
        "asymmetric clip; TRL's default), grpo (mean per reply, then over replies), dr_grpo (no std "
        "scaling, constant normaliser), gspo (sequence-level ratio), cispo (truncated detached weight), "
        "rloo (leave-one-out baseline, KL in the reward)",
    )
    clip: float = Field(0.2, gt=0.0, description="policy ratio clipping: the range [1 - clip, 1 + clip]")
    clip_high: float | None = Field(
        None,
        gt=0.0,
        description="grpo: the upper clip, [1 - clip, 1 + clip_high] (DAPO's 0.28; default clip); cispo: "
        "the importance weight's truncation (required; the paper suggests 5.0)",
    )
    dynamic_sampling: bool = Field(
        False, description="dapo: leave out of the update the groups whose rewards are all equal"
    )
    overlong_buffer: int = Field(
        0,
        ge=0,
        description="dapo: soft overlong penalty: 0 up to max_new_tokens - overlong_buffer reply tokens, "
        "then down linearly to -1 at max_new_tokens; 0 turns it off",
    )
    value_clip: float = Field(0.2, gt=0.0, description="ppo: value clipping")
    vf_coef: float = Field(0.1, ge=0.0, description="ppo: weight of the value loss")
    gamma: float = Field(1.0, gt=0.0, le=1.0, description="ppo: discount")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="ppo: GAE lambda")
    eval_prompts: int = Field(
        32, ge=1, description="held-out prompts whose greedy replies are scored for val_reward"
    )

    @model_validator(mode="after")
    def _loss_settings(self) -> RLConfig:
        for key, losses in LOSS_SETTINGS.items():
            if self.loss not in losses and getattr(self, key) != type(self).model_fields[key].default:
                names = [n for n in LOSSES if n in losses]
                raise ValueError(
                    f"{key}: rl.loss {self.loss} does not use it (only {', '.join(names)}); remove it"
                )
        if self.loss == "cispo" and self.clip_high is None:
            raise ValueError(
                "clip_high: rl.loss cispo truncates its importance weights at clip_high; set it (the "
                "MiniMax-M1 and ScaleRL papers use 4 to 5)"
            )
        if self.overlong_buffer > self.max_new_tokens:
            raise ValueError(
                f"overlong_buffer: {self.overlong_buffer} is longer than max_new_tokens ({self.max_new_tokens})"
            )
        return self


LOSSES = ("grpo", "dapo", "dr_grpo", "gspo", "cispo", "rloo")
# which losses (rl.loss) read which of these settings; a value other than the default for a loss that
# does not is refused by name (tests/test_rl_losses.py walks the table)
LOSS_SETTINGS: dict[str, frozenset[str]] = {
    "clip": frozenset(LOSSES) - {"cispo"},  # CISPO has no lower clip: its weight is only truncated
    "clip_high": frozenset(LOSSES),
    "dynamic_sampling": frozenset({"dapo"}),
    "overlong_buffer": frozenset({"dapo"}),
}
GRPO_ONLY = (
    "loss",
    "clip_high",
    "dynamic_sampling",
    "overlong_buffer",
)  # task ppo refuses them (task_settings)

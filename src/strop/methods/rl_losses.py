"""The group-relative RL losses a config can name (`rl.loss`, task grpo), each a RolloutObjective.

Every one samples `group_size` replies per prompt and scores each reply against its group, with no value
head. They differ in four places, each a method here, so a variant is a few lines:
- `shape`: the rewards before any baseline (DAPO's overlong penalty, RLOO's KL penalty);
- `advantages`: one per reply (group mean and std; Dr. GRPO without the std; RLOO's leave-one-out mean);
- `per_token`: the policy loss at each reply token (PPO's clipped surrogate with asymmetric clip range;
  GSPO's sequence-level ratio; CISPO's truncated, detached weight on the log-prob; RLOO's sequence
  ratio);
- `reduce`: the unit the loss is a mean over, which is the Loss count (reply tokens for DAPO and CISPO,
  replies for GRPO, Dr. GRPO, GSPO and RLOO), so the optimizer step (training/step.py) averages each
  over a whole mini-batch however it is split.
With `kl_coef` > 0 the k3 estimate of KL(policy || reference) is added at each token before `reduce`
(except RLOO, which takes the KL off the reward). Each is checked against TRL 1.16's GRPOTrainer /
RLOOTrainer on the same tensors in tests/test_rl_losses.py.

GRPO: Shao et al. 2024, https://arxiv.org/abs/2402.03300. DAPO: Yu et al. 2025,
https://arxiv.org/abs/2503.14476. Dr. GRPO: Liu et al. 2025, https://arxiv.org/abs/2503.20783. GSPO:
Zheng et al. 2025, https://arxiv.org/abs/2507.18071. CISPO: MiniMax-M1, https://arxiv.org/abs/2506.13585.
RLOO: Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740.
"""

from __future__ import annotations

import torch

from strop.methods.objective import Loss
from strop.methods.ppo_losses import clipped_surrogate, grpo_advantages
from strop.methods.rl import PPO, RolloutObjective, ValueHead, response_logps


class GroupObjective(RolloutObjective):
    """The shared part: GRPO's choices at every place a variant may differ (`shape`, `advantages`,
    `keep`, `per_token`, `reduce`), the k3 KL term, and `terms`, the Loss from the policy's log-probs.
    clip / clip_high: the ratio's clip range [1 - clip, 1 + clip_high] (CISPO: clip_high truncates its
    weight); group_size: the replies per prompt, consecutive in the batch; max_new_tokens: the longest
    reply (Dr. GRPO's normaliser, DAPO's overlong penalty); reference: whether there is a KL to keep or
    adapt (else no reference pass, and no KL term)."""

    token_level = False  # the mean is over replies (True: over every reply token of the batch)
    kl_in_loss = True  # the k3 KL is a loss term (RLOO puts it in the reward instead)

    def __init__(
        self,
        temperature: float,
        clip: float,
        clip_high: float,
        kl_coef: float,
        group_size: int,
        max_new_tokens: int,
        reference: bool = True,
    ):
        self.temperature, self.clip, self.clip_high, self.kl_coef = temperature, clip, clip_high, kl_coef
        self.group_size, self.max_new_tokens = group_size, max_new_tokens
        self.needs = frozenset({"rollouts", *(["reference"] if reference else [])})

    def shape(self, scores: torch.Tensor, kl_seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The rewards (N,) the advantages are taken of, from the reward's scores, each reply's sampled
        KL to the reference and its length in tokens (all (N,))."""
        return scores

    def advantages(self, scores: torch.Tensor) -> torch.Tensor:
        """One advantage per reply (N,): (r - group mean) / (group std, unbiased, + 1e-4), as TRL."""
        return grpo_advantages(scores, self.group_size)

    def keep(self, scores: torch.Tensor) -> torch.Tensor | None:
        """Which replies (N,) bool the update learns from; None: all of them (only DAPO's dynamic
        sampling leaves some out)."""
        return None

    def per_token(self, logps, old_logps, advantages, mask):
        """(policy loss (B, T), statistics (B, T) each) from the log-probs (B, T) and advantages (B, 1)."""
        ratio = torch.exp(logps - old_logps)  # (B, T)
        return self.clipped(ratio, advantages)

    def clipped(self, ratio: torch.Tensor, advantages: torch.Tensor):
        """-min(ratio x A, clamp(ratio, 1 - clip, 1 + clip_high) x A), and the clip fractions as TRL
        logs them: low where A < 0 and the ratio fell below the range, high where A > 0 and above."""
        low, high = 1.0 - self.clip, 1.0 + self.clip_high
        loss = clipped_surrogate(ratio, advantages, low, high)
        with torch.no_grad():
            clip_low = ((ratio < low) & (advantages < 0)).float()
            clip_high = ((ratio > high) & (advantages > 0)).float()
        stats = {"clipfrac": clip_low + clip_high, "clip_low": clip_low, "clip_high": clip_high}
        return loss, {**stats, "ratio": ratio.detach()}

    def reduce(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(sum over the batch's units of x's mean per unit, the units) for x (B, T) or (B, 1)."""
        x = x.expand(mask.shape)
        if self.token_level:  # every reply token of the batch weighs alike
            return torch.where(mask, x, 0.0).sum(), int(mask.sum())
        rows = mask.any(1)  # replies with tokens to learn from (all, unless dynamic sampling dropped some)
        per_reply = torch.where(mask, x, 0.0).sum(1) / mask.sum(1).clamp(min=1)  # (B,)
        return per_reply[rows].sum(), int(rows.sum())

    def prepare(self, batch, scores, kl_seq, lengths):
        shaped = self.shape(scores, kl_seq, lengths)
        keep = self.keep(shaped)
        return {"advantages": self.advantages(shaped), **({"keep": keep} if keep is not None else {})}

    def terms(self, logps: torch.Tensor, batch: dict) -> Loss:
        """The Loss from the policy's reply log-probs (B, T) and the batch's old and reference log-probs,
        advantages (B,) and `keep` (B,) (all replies when absent)."""
        mask = batch["response_mask"]
        if "keep" in batch:
            mask = mask & batch["keep"][:, None]
        loss, stats = self.per_token(logps, batch["old_logps"], batch["advantages"][:, None], mask)
        stats["pg_loss"] = loss.detach()
        if self.kl_in_loss and "reference" in self.needs:
            d = batch["ref_logps"] - logps  # k3: exp(d) - d - 1 >= 0 (ppo_losses.k3_kl)
            kl = torch.exp(d) - d - 1.0
            loss = loss + self.kl_coef * kl
            stats["kl_loss"] = kl.detach()
        total, count = self.reduce(loss, mask)
        return Loss(total, count, {k: float(self.reduce(v, mask)[0]) for k, v in stats.items()})

    def loss(self, model, batch) -> Loss:
        logps, _ = response_logps(model, batch, self.temperature)
        return self.terms(logps, batch)


class GRPO(GroupObjective):
    """DeepSeekMath's GRPO: advantage (r - group mean) / (group std + 1e-4); the clipped surrogate per
    token; + kl_coef x k3 KL; a mean over each reply's tokens, then over the replies (so a long reply
    weighs less per token: the length bias Dr. GRPO removes)."""

    name = "grpo"


class DAPO(GroupObjective):
    """DAPO: GRPO's advantages and clipped surrogate with a wider upper clip (`clip_high`, the paper's
    0.28), one mean over every reply token of the batch; optionally dynamic sampling (groups whose
    rewards are all equal, which give no gradient, leave the batch and its normaliser) and the soft
    overlong penalty (Eq. 13): 0 up to max_new_tokens - overlong_buffer tokens, then falling linearly
    to -1 at max_new_tokens. Sampling more prompts to refill dropped groups is not done: the step
    trains on the groups that remain."""

    name = "dapo"
    token_level = True

    def __init__(self, *args, dynamic_sampling: bool = False, overlong_buffer: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.dynamic_sampling, self.overlong_buffer = dynamic_sampling, overlong_buffer

    def shape(self, scores, kl_seq, lengths):
        if not self.overlong_buffer:
            return scores
        start = self.max_new_tokens - self.overlong_buffer
        penalty = ((start - lengths.float()) / self.overlong_buffer).clamp(-1.0, 0.0)  # (N,)
        return scores + penalty.to(scores)

    def keep(self, scores):
        if not self.dynamic_sampling:
            return super().keep(scores)
        groups = scores.view(-1, self.group_size)
        varied = (groups != groups[:, :1]).any(1)  # (N / G,): some reply scored differently
        return varied.repeat_interleave(self.group_size)


class DrGRPO(GroupObjective):
    """Dr. GRPO ("GRPO done right"): advantage r - group mean, no division by the group's std (which
    favours prompts that are too easy or too hard); the per-token losses summed and divided by a
    constant, max_new_tokens, per reply (no per-reply length normalisation), then averaged over replies."""

    name = "dr_grpo"

    def advantages(self, scores):
        groups = scores.float().view(-1, self.group_size)
        return (groups - groups.mean(1, keepdim=True)).view(-1)

    def reduce(self, x, mask):
        rows = mask.any(1)
        per_reply = torch.where(mask, x.expand(mask.shape), 0.0).sum(1) / self.max_new_tokens  # (B,)
        return per_reply[rows].sum(), int(rows.sum())


class GSPO(GroupObjective):
    """GSPO: the importance ratio of a whole reply, exp(mean over its tokens of log pi - log pi_old),
    clipped once per reply (the paper's clip range is far narrower than PPO's, e.g. 3e-4 / 4e-4); as
    TRL's importance_sampling_level="sequence" with loss_type="grpo" (a mean per reply, then over
    replies)."""

    name = "gspo"

    def per_token(self, logps, old_logps, advantages, mask):
        log_ratio = torch.where(mask, logps - old_logps, 0.0)
        seq = log_ratio.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, 1)
        return self.clipped(torch.exp(seq), advantages)  # (B, 1) each: one per reply


class CISPO(GroupObjective):
    """CISPO: the importance weight clamped at clip_high (the paper's eps_max) and detached, multiplying
    the log-prob (a REINFORCE term), so no token's gradient is clipped away; one mean over every reply
    token of the batch. `clip` (a lower bound) is not used."""

    name = "cispo"
    token_level = True

    def per_token(self, logps, old_logps, advantages, mask):
        ratio = torch.exp(logps - old_logps)
        weight = torch.clamp(ratio, max=self.clip_high).detach()
        with torch.no_grad():
            clipped = ((ratio > self.clip_high) & (advantages > 0)).float()
        stats = {"clipfrac": clipped, "clip_high": clipped, "ratio": ratio.detach()}
        return -weight * advantages * logps, stats


class RLOO(GroupObjective):
    """RLOO: the reward less kl_coef x the reply's sampled KL (sum over its tokens of log pi_old -
    log pi_ref, a reward penalty, not a loss term); advantage: the reward less the mean of the other
    replies to the same prompt (leave-one-out); the clipped surrogate on the ratio of whole replies,
    exp(sum log pi - sum log pi_old), a mean over replies. As TRL's RLOOTrainer."""

    name = "rloo"
    kl_in_loss = False

    def shape(self, scores, kl_seq, lengths):
        return scores - self.kl_coef * kl_seq.to(scores)

    def advantages(self, scores):
        groups = scores.float().view(-1, self.group_size)
        others = (groups.sum(1, keepdim=True) - groups) / (self.group_size - 1)  # (N / G, G)
        return (groups - others).view(-1)

    def per_token(self, logps, old_logps, advantages, mask):
        log_ratio = torch.where(mask, logps - old_logps, 0.0).sum(1, keepdim=True)  # (B, 1)
        return self.clipped(torch.exp(log_ratio), advantages)  # (B, 1) each: one per reply


RL_LOSSES: dict[str, type[GroupObjective]] = {c.name: c for c in (GRPO, DAPO, DrGRPO, GSPO, CISPO, RLOO)}


def objective_class(task: str, rl) -> type[RolloutObjective]:
    """The objective class of task ppo or grpo with an `rl:` section (core/rl_config.RLConfig)."""
    return PPO if task == "ppo" else RL_LOSSES[rl.loss]


def rl_objective(task: str, rl, value_head: ValueHead | None = None) -> RolloutObjective:
    """The objective task ppo (with its value head) or grpo (with `rl.loss`) asks for."""
    reference = rl.kl_coef > 0 or rl.target_kl is not None  # a KL to keep, or one to adapt
    if task == "ppo":
        assert value_head is not None  # PPO.needs has "value_head": the task built one
        return PPO(
            value_head,
            rl.temperature,
            rl.clip,
            rl.value_clip,
            rl.vf_coef,
            rl.kl_coef,
            rl.gamma,
            rl.lam,
            reference,
        )
    common = dict(
        temperature=rl.temperature,
        clip=rl.clip,
        clip_high=rl.clip_high if rl.clip_high is not None else rl.clip,
        kl_coef=rl.kl_coef,
        group_size=rl.group_size,
        max_new_tokens=rl.max_new_tokens,
        reference=reference,
    )
    if rl.loss == "dapo":
        return DAPO(**common, dynamic_sampling=rl.dynamic_sampling, overlong_buffer=rl.overlong_buffer)
    return RL_LOSSES[rl.loss](**common)

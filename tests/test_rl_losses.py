"""The group-relative RL losses (methods/rl_losses.py, `rl.loss`) against TRL 1.16's GRPOTrainer and
RLOOTrainer on the same tensors (values and gradients), and against hand-computed cases; settings a
loss does not use are refused by name."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from strop.core.config import load_config
from strop.core.errors import ConfigError
from strop.core.rl_config import LOSS_SETTINGS, RLConfig
from strop.methods import rl_losses
from strop.methods.rl_losses import CISPO, DAPO, GRPO, GSPO, RLOO, DrGRPO, rl_objective

B, T, G, MAX_NEW = 4, 6, 2, 8


def tensors(seed: int = 0) -> dict:
    """A rollout batch of 2 groups of 2 replies, of 6, 3, 1 and 4 tokens, whose policy log-probs have
    moved from the rollout's far enough that some ratios leave the clip range both ways."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 3, 1, 4])
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    old = -torch.rand(B, T, generator=g) * 3
    logps = (old + 0.4 * torch.randn(B, T, generator=g)).masked_fill(~mask, 0.0)
    ref = old + 0.2 * torch.randn(B, T, generator=g)
    advantages = torch.tensor([0.9, -0.9, 1.3, -0.4])
    return {
        "logps": logps,
        "old_logps": old,
        "ref_logps": ref,
        "response_mask": mask,
        "advantages": advantages,
    }


def strop_loss(obj, t: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss as the optimizer step sees it: total / count, d loss / d logps) by strop."""
    logps = t["logps"].clone().requires_grad_(True)
    out = obj.terms(logps, {k: v for k, v in t.items() if k != "logps"})
    mean = out.total / out.count
    mean.backward()
    return mean.detach(), logps.grad


def trl_grpo_loss(t: dict, loss_type: str, beta: float, eps: float, eps_high: float, level: str = "token"):
    """TRL's GRPOTrainer._compute_loss on the same per-token log-probs, through a stand-in trainer."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    logps = t["logps"].clone().requires_grad_(True)
    mask = t["response_mask"].long()
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type,
        epsilon_low=eps,
        epsilon_high=eps_high,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=MAX_NEW,
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x),
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": t["advantages"],
        "old_per_token_logps": t["old_logps"],
        "ref_per_token_logps": t["ref_logps"],
        "num_items_in_batch": mask.sum(),
    }
    loss = GRPOTrainer._compute_loss(fake, None, inputs)
    loss.backward()
    return loss.detach(), logps.grad


def trl_rloo_loss(t: dict, eps: float, eps_high: float):
    from trl.trainer.rloo_trainer import RLOOTrainer

    logps = t["logps"].clone().requires_grad_(True)
    mask = t["response_mask"].long()
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        epsilon_low=eps,
        epsilon_high=eps_high,
        model=SimpleNamespace(training=True),
        aux_loss_enabled=False,
        accelerator=SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction: x),
        _metrics=defaultdict(lambda: defaultdict(list)),
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": t["advantages"],
        "old_logps": (t["old_logps"] * mask).sum(1),
    }
    loss = RLOOTrainer._compute_loss(fake, None, inputs)
    loss.backward()
    return loss.detach(), logps.grad


def make(cls, clip=0.2, clip_high=None, kl_coef=0.0, **extra):
    return cls(
        temperature=1.0,
        clip=clip,
        clip_high=clip if clip_high is None else clip_high,
        kl_coef=kl_coef,
        group_size=G,
        max_new_tokens=MAX_NEW,
        reference=kl_coef > 0,
        **extra,
    )


CASES = [  # (strop class, TRL loss_type, importance sampling level, clip, clip_high)
    (GRPO, "grpo", "token", 0.2, 0.2),
    (DAPO, "dapo", "token", 0.2, 0.28),
    (DrGRPO, "dr_grpo", "token", 0.2, 0.2),
    (GSPO, "grpo", "sequence", 0.05, 0.08),
    (CISPO, "cispo", "token", 0.2, 1.1),
]


@pytest.mark.parametrize("kl_coef", [0.0, 0.04])
@pytest.mark.parametrize(("cls", "loss_type", "level", "clip", "clip_high"), CASES)
def test_each_loss_equals_trls_on_the_same_tensors(cls, loss_type, level, clip, clip_high, kl_coef):
    t = tensors()
    mine, my_grad = strop_loss(make(cls, clip, clip_high, kl_coef), t)
    theirs, their_grad = trl_grpo_loss(t, loss_type, kl_coef, clip, clip_high, level)
    assert torch.allclose(mine, theirs, atol=1e-6), (float(mine), float(theirs))
    assert torch.allclose(my_grad, their_grad, atol=1e-6), (my_grad - their_grad).abs().max()
    assert their_grad.abs().sum() > 0 and not torch.equal(mine, torch.zeros(()))
    stats = make(cls, clip, clip_high, kl_coef).terms(t["logps"], t).stats
    assert stats["clipfrac"] > 0  # the tensors reach the clip (or CISPO's truncation), so it is tested


def test_rloo_loss_equals_trls_on_the_same_tensors():
    t = tensors(1)
    mine, my_grad = strop_loss(make(RLOO, 0.2, 0.28), t)
    theirs, their_grad = trl_rloo_loss(t, 0.2, 0.28)
    assert torch.allclose(mine, theirs, atol=1e-6), (float(mine), float(theirs))
    assert torch.allclose(my_grad, their_grad, atol=1e-6)


def test_the_clipped_surrogate_by_hand():
    """One reply of two tokens, A = 1: ratio 1.5 is clipped to 1.2 (no gradient), ratio 0.5 is not;
    GRPO's loss is the mean over the reply's tokens, -(1.2 + 0.5) / 2."""
    old = torch.zeros(1, 2)
    t = {
        "logps": torch.log(torch.tensor([[1.5, 0.5]])),
        "old_logps": old,
        "ref_logps": old,
        "response_mask": torch.ones(1, 2, dtype=torch.bool),
        "advantages": torch.tensor([1.0]),
    }
    obj = GRPO(1.0, 0.2, 0.2, 0.0, 1, MAX_NEW, reference=False)
    mean, grad = strop_loss(obj, t)
    assert float(mean) == pytest.approx(-(1.2 + 0.5) / 2)
    # d/d logp of -ratio / 2 = -ratio / 2 where unclipped, 0 where the clip holds
    assert grad[0].tolist() == pytest.approx([0.0, -0.25])
    # Dr. GRPO divides the reply's sum by max_new_tokens (8), not by its 2 tokens
    dr = DrGRPO(1.0, 0.2, 0.2, 0.0, 1, MAX_NEW, reference=False)
    assert float(strop_loss(dr, t)[0]) == pytest.approx(-(1.2 + 0.5) / 8)
    # CISPO: weight min(ratio, 5) detached, times A x logp: -(1.5 log 1.5 + 0.5 log 0.5) / 2
    cispo = CISPO(1.0, 0.2, 5.0, 0.0, 1, MAX_NEW, reference=False)
    want = -(1.5 * torch.log(torch.tensor(1.5)) + 0.5 * torch.log(torch.tensor(0.5))) / 2
    assert float(strop_loss(cispo, t)[0]) == pytest.approx(float(want))


def test_advantages_by_hand():
    scores = torch.tensor([1.0, 0.0, 3.0, 3.0, 2.0, 5.0])  # groups of three: (1, 0, 3), (3, 2, 5)
    grpo, dr, rloo = (make(c) for c in (GRPO, DrGRPO, RLOO))
    for obj in (grpo, dr, rloo):
        obj.group_size = 3
    std = torch.tensor([1.0, 0.0, 3.0]).std()  # unbiased; both groups have the same spread
    assert torch.allclose(
        grpo.advantages(scores), torch.tensor([-1 / 3, -4 / 3, 5 / 3, -1 / 3, -4 / 3, 5 / 3]) / (std + 1e-4)
    )
    assert torch.allclose(dr.advantages(scores), torch.tensor([-1 / 3, -4 / 3, 5 / 3, -1 / 3, -4 / 3, 5 / 3]))
    # leave-one-out: 1 - mean(0, 3), 0 - mean(1, 3), 3 - mean(1, 0), ...
    assert torch.allclose(rloo.advantages(scores), torch.tensor([-0.5, -2.0, 2.5, -0.5, -2.0, 2.5]))


def test_rloo_takes_the_kl_off_the_reward():
    rloo = make(RLOO, kl_coef=0.5)
    shaped = rloo.shape(torch.tensor([1.0, 2.0]), torch.tensor([0.4, -0.2]), torch.tensor([3, 3]))
    assert shaped.tolist() == pytest.approx([0.8, 2.1])


def test_dapo_overlong_penalty_equals_trls_and_dynamic_sampling_drops_flat_groups():
    from trl.rewards import get_soft_overlong_punishment

    dapo = make(DAPO, dynamic_sampling=True, overlong_buffer=4)
    lengths = torch.tensor([2, 4, 5, 7, 8, 9])
    shaped = dapo.shape(torch.zeros(6), torch.zeros(6), lengths)
    want = get_soft_overlong_punishment(MAX_NEW, 4)(completion_ids=[[0] * int(n) for n in lengths])
    assert shaped.tolist() == pytest.approx(want) and min(want) == -1.0 and max(want) == 0.0
    keep = dapo.keep(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]))  # groups of two
    assert keep.tolist() == [False, False, True, True, False, False]


def test_dynamic_sampling_leaves_dropped_groups_out_of_the_normaliser():
    """DAPO's token mean over the kept groups only: as if the dropped replies were never sampled."""
    t = tensors()
    dapo = make(DAPO, dynamic_sampling=True)
    keep = torch.tensor([True, True, False, False])
    mine = dapo.terms(t["logps"], {**t, "keep": keep})
    alone = dapo.terms(t["logps"][:2], {k: v[:2] for k, v in t.items()})
    assert mine.count == int(t["response_mask"][:2].sum()) == alone.count
    assert torch.allclose(mine.total, alone.total)


def load(task: str = "grpo", **rl):
    return load_config({"task": task, "data": {"train": ["rows.jsonl"]}, "rl": {"reward": "length", **rl}})


@pytest.mark.parametrize("key", sorted(LOSS_SETTINGS))
def test_a_setting_a_loss_does_not_use_is_refused_by_name(key):
    samples = {"clip": 0.1, "clip_high": 0.28, "dynamic_sampling": True, "overlong_buffer": 4}
    for loss in rl_losses.RL_LOSSES:
        section = {"group_size": 2, "loss": loss, key: samples[key]}
        if loss == "cispo" and key != "clip_high":
            section["clip_high"] = 5.0
        if loss in LOSS_SETTINGS[key]:
            assert getattr(load(**section).rl, key) == samples[key]
        else:
            with pytest.raises(ConfigError, match=f"rl.{key}: rl.loss {loss} does not use it"):
                load(**section)


def test_cispo_needs_its_truncation_and_the_builder_passes_the_settings():
    with pytest.raises(ConfigError, match="rl.clip_high: rl.loss cispo truncates"):
        load(group_size=2, loss="cispo")
    with pytest.raises(ConfigError, match="rl.overlong_buffer: 9 is longer than max_new_tokens"):
        load(group_size=2, overlong_buffer=9, max_new_tokens=8)
    rl = RLConfig(reward="length", group_size=4, loss="dapo", clip_high=0.28, overlong_buffer=3, kl_coef=0.0)
    obj = rl_objective("grpo", rl)
    assert isinstance(obj, DAPO) and (obj.clip, obj.clip_high, obj.overlong_buffer) == (0.2, 0.28, 3)
    assert obj.needs == frozenset({"rollouts"})  # no KL: no reference pass
    assert "reference" in rl_objective("grpo", RLConfig(reward="length", group_size=2)).needs
    with pytest.raises(ConfigError) as refused:  # at config load, each key named (task_settings)
        load_config(
            {
                "model": {"name": "m"},
                "task": "ppo",
                "data": {"train": "p.jsonl"},
                "rl": {"reward": "length", "loss": "gspo", "clip_high": 0.3},
            }
        )
    assert "rl.loss: task ppo does not use it (only grpo uses it); remove it" in str(refused.value)
    assert "rl.clip_high: task ppo does not use it (only grpo uses it); remove it" in str(refused.value)


def test_token_level_against_reply_level_and_the_sequence_ratio_by_hand():
    """Two replies of 2 and 1 tokens at ratio 1, A = +1 and -1: per-token losses -1, -1 | +1. DAPO
    averages the three tokens (-1/3); GRPO the replies' means ((-1 + 1) / 2 = 0). GSPO: one reply whose
    tokens have ratios 1.5 and 1.5 has sequence ratio 1.5, clipped to 1.2 (no gradient), and one of
    1.5 and 0.5 has exp(mean log) = sqrt(0.75), inside the range."""
    zeros = torch.zeros(2, 2)
    t = {
        "logps": zeros,
        "old_logps": zeros,
        "ref_logps": zeros,
        "response_mask": torch.tensor([[True, True], [True, False]]),
        "advantages": torch.tensor([1.0, -1.0]),
    }
    assert float(strop_loss(make(DAPO), t)[0]) == pytest.approx(-1 / 3)
    assert float(strop_loss(make(GRPO), t)[0]) == pytest.approx(0.0)
    t = {
        "logps": torch.log(torch.tensor([[1.5, 1.5], [1.5, 0.5]])),
        "old_logps": zeros,
        "ref_logps": zeros,
        "response_mask": torch.ones(2, 2, dtype=torch.bool),
        "advantages": torch.tensor([1.0, 1.0]),
    }
    mean, grad = strop_loss(make(GSPO), t)
    assert float(mean) == pytest.approx((-1.2 - 0.75**0.5) / 2)
    assert grad[0].tolist() == [0.0, 0.0] and (grad[1] != 0).all()

"""Preference and PPO losses against hand-derived values, explicit loops and, where TRL exposes the
computation, TRL itself. References never call the function under test."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from strop.methods.ppo_losses import (
    AdaptiveKLController,
    gae,
    grpo_advantages,
    kl_penalty_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)
from strop.methods.preference import bradley_terry_loss, dpo_loss, sequence_logps, simpo_loss, token_logps

LOG2 = math.log(2.0)


def neg_logsigmoid(x: float) -> float:
    return math.log(1.0 + math.exp(-x))


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# --- sequence log-probs ---------------------------------------------------------------------------------


def logps_batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 6, 11, generator=g)).to(dtype)  # (B, T, V)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    mask = torch.tensor(
        [[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 0, 0]], dtype=torch.bool
    )  # prompt, response, padding
    return logits, labels.masked_fill(~mask, -100), mask


def loop_logps(logits, labels, mask) -> list[float]:
    """Per-sequence sum over label tokens of log softmax, one token at a time in python floats."""
    out = []
    for b in range(labels.size(0)):
        total = 0.0
        for pos in range(1, labels.size(1)):
            if mask[b, pos]:
                row = [float(v) for v in logits[b, pos - 1]]  # position pos-1 predicts token pos
                top = max(row)
                log_norm = top + math.log(sum(math.exp(v - top) for v in row))
                total += row[int(labels[b, pos])] - log_norm
        out.append(total)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_logps_matches_per_token_loop(dtype):
    logits, labels, mask = logps_batch(dtype)
    got = sequence_logps(logits, labels, mask)
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got, torch.tensor(loop_logps(logits, labels, mask)), rtol=1e-5, atol=1e-5)


def test_token_logps_gradient_is_onehot_minus_softmax():
    """d log softmax(z)_y / dz = onehot(y) - softmax(z) at label positions, 0 elsewhere."""
    logits, labels, mask = logps_batch()
    logits.requires_grad_(True)
    sequence_logps(logits, labels, mask).sum().backward()
    expected = torch.zeros_like(logits)
    for b in range(3):
        for pos in range(1, 6):
            if mask[b, pos]:
                z = logits[b, pos - 1].detach()
                expected[b, pos - 1] = -torch.exp(z - torch.logsumexp(z, dim=0))
                expected[b, pos - 1, labels[b, pos]] += 1.0
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-6)


def test_token_logps_match_trl_selective_log_softmax():
    pytest.importorskip("trl")
    from trl.trainer.utils import selective_log_softmax

    logits, labels, mask = logps_batch()
    ref = selective_log_softmax(logits[:, :-1], labels[:, 1:].clamp(min=0)) * mask[:, 1:]
    torch.testing.assert_close(token_logps(logits, labels, mask), ref, rtol=0, atol=1e-6)


# --- DPO / IPO -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_dpo_with_policy_equal_to_reference_is_log2(label_smoothing):
    g = torch.Generator().manual_seed(3)
    chosen, rejected = -20 * torch.rand(8, generator=g), -20 * torch.rand(8, generator=g)
    loss, metrics = dpo_loss(
        chosen, rejected, chosen.clone(), rejected.clone(), 0.1, "sigmoid", label_smoothing
    )
    assert abs(loss.item() - LOG2) < 1e-7
    assert metrics["rewards/margin"] == 0.0 and metrics["rewards/accuracy"] == 0.0


# two pairs: policy/reference log-probs chosen to give log-ratio differences h = 1.5 and -2.0
PC, PR, RC, RR = t(-1.0, -4.0), t(-3.0, -5.0), t(-2.0, -3.0), t(-2.5, -6.0)
# chosen log-ratios: 1.0, -1.0; rejected: -0.5, 1.0; h = 1.5, -2.0


def test_dpo_sigmoid_by_hand():
    loss, m = dpo_loss(PC, PR, RC, RR, beta=0.1)
    assert loss.item() == pytest.approx((neg_logsigmoid(0.15) + neg_logsigmoid(-0.2)) / 2, abs=1e-7)
    assert m["rewards/chosen"] == pytest.approx((0.1 - 0.1) / 2, abs=1e-7)
    assert m["rewards/rejected"] == pytest.approx((-0.05 + 0.1) / 2, abs=1e-7)
    assert m["rewards/accuracy"] == 0.5  # 0.1 > -0.05, but -0.1 < 0.1
    assert m["rewards/margin"] == pytest.approx((0.15 - 0.2) / 2, abs=1e-7)
    assert m["logps/chosen"] == pytest.approx(-2.5) and m["logps/rejected"] == pytest.approx(-4.0)


def test_dpo_label_smoothing_by_hand():
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.2)
    # h * beta = 0.75 and -1.0; eps = 0.2 of the loss treats the pair as flipped
    per_pair = [0.8 * neg_logsigmoid(x) + 0.2 * neg_logsigmoid(-x) for x in (0.75, -1.0)]
    assert loss.item() == pytest.approx(sum(per_pair) / 2, abs=1e-6)


def test_ipo_by_hand():
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=0.25, loss_type="ipo")
    # target h = 1 / (2 * 0.25) = 2
    assert loss.item() == pytest.approx(((1.5 - 2.0) ** 2 + (-2.0 - 2.0) ** 2) / 2, abs=1e-6)


def test_simpo_by_hand():
    c, r = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.5])  # mean log-prob per reply token
    loss, m = simpo_loss(c, r, beta=2.0, gamma=0.5, label_smoothing=0.1)
    z = [2.0 * 1.0 - 0.5, 2.0 * -0.5 - 0.5]  # beta * (chosen - rejected) - gamma
    per_pair = [0.9 * neg_logsigmoid(x) + 0.1 * neg_logsigmoid(-x) for x in z]
    assert loss.item() == pytest.approx(sum(per_pair) / 2, abs=1e-6)
    assert m["rewards/accuracy"] == 0.5 and m["rewards/margin"] == pytest.approx((2.0 - 1.0) / 2)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_simpo_matches_trl_cpo_trainer(label_smoothing):
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    g = torch.Generator().manual_seed(3)
    c, r = -3 * torch.rand(6, generator=g), -3 * torch.rand(6, generator=g)
    stub = SimpleNamespace(
        alpha=0.0, loss_type="simpo", beta=2.5, simpo_gamma=0.7, label_smoothing=label_smoothing,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )  # fmt: skip
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(stub, c, r)
    loss, m = simpo_loss(c, r, beta=2.5, gamma=0.7, label_smoothing=label_smoothing)
    assert loss.item() == pytest.approx(losses.mean().item(), abs=1e-6)
    assert m["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), abs=1e-6)
    assert m["rewards/margin"] == pytest.approx((chosen_rewards - rejected_rewards).mean().item(), abs=1e-6)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = PC.clone().requires_grad_(True), PR.clone().requires_grad_(True)
    dpo_loss(pc, pr, RC, RR)[0].backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises chosen, lowers rejected


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"loss_type": "hinge"}, "loss_type"), ({"label_smoothing": 0.5}, "label_smoothing"),
     ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing")],
)  # fmt: skip
def test_dpo_rejects_bad_options(kwargs, field):
    with pytest.raises(ValueError, match=field):
        dpo_loss(PC, PR, RC, RR, **kwargs)


def trl_dpo(loss_type, beta, pc, pr, rc, rr, lengths):
    """TRL's DPOTrainer._compute_loss on precomputed log-probs, through a stub trainer and model.

    The loss lives inside the trainer method; a stub `self` carries the attributes it reads, and the
    stub model returns per-token log-probs spread evenly over each completion (TRL sums them).
    """
    pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DPOTrainer

    logps = torch.cat([pc, pr])  # (2B,): TRL's batch is [chosen; rejected]
    n, width = logps.numel(), max(lengths) + 1
    completion_mask = torch.zeros(n, width, dtype=torch.long)  # (2B, T); token 0 is the prompt
    per_token = torch.zeros(n, width - 1)  # (2B, T-1), shifted like the model's log-probs
    for i, k in enumerate(lengths):
        completion_mask[i, 1 : 1 + k] = 1
        per_token[i, :k] = logps[i] / k
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros(n, width - 1),
        mean_logits=torch.zeros(n, width - 1),
        is_top1=torch.zeros(n, width - 1, dtype=torch.bool),
    )
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics={"eval": defaultdict(list)}, _total_train_tokens=0,
    )  # fmt: skip
    inputs = {
        "input_ids": torch.zeros(n, width, dtype=torch.long),
        "attention_mask": torch.ones(n, width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def test_dpo_sigmoid_matches_trl():
    g = torch.Generator().manual_seed(5)
    pc, pr, rc, rr = (-30 * torch.rand(4, generator=g) for _ in range(4))
    ref_loss, ref_metrics = trl_dpo("sigmoid", 0.1, pc, pr, rc, rr, [3, 5, 2, 4, 6, 1, 4, 2])
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    pairs = [("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
             ("rewards/accuracy", "rewards/accuracies"), ("rewards/margin", "rewards/margins"),
             ("logps/chosen", "logps/chosen"), ("logps/rejected", "logps/rejected")]  # fmt: skip
    for ours, theirs in pairs:
        assert metrics[ours] == pytest.approx(ref_metrics[theirs], abs=1e-5), ours


def test_ipo_on_token_means_matches_trl_length_normalized_ipo():
    g = torch.Generator().manual_seed(6)
    pc, pr, rc, rr = (-30 * torch.rand(4, generator=g) for _ in range(4))
    lengths = [3, 5, 2, 4, 6, 1, 4, 2]
    ref_loss, _ = trl_dpo("ipo", 0.1, pc, pr, rc, rr, lengths)
    n_chosen, n_rejected = t(*lengths[:4]), t(*lengths[4:])
    loss, _ = dpo_loss(pc / n_chosen, pr / n_rejected, rc / n_chosen, rr / n_rejected, 0.1, "ipo")
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6, abs=1e-6)


# --- Bradley-Terry reward model --------------------------------------------------------------------------


def test_bradley_terry_by_hand():
    loss, m = bradley_terry_loss(t(2.0, 0.5, 1.0), t(1.0, 1.5, -2.0))
    # r_c - r_r = 1.0, -1.0, 3.0
    assert loss.item() == pytest.approx(
        (neg_logsigmoid(1.0) + neg_logsigmoid(-1.0) + neg_logsigmoid(3.0)) / 3
    )
    assert m["accuracy"] == pytest.approx(2 / 3) and m["margin"] == pytest.approx(1.0)


def test_bradley_terry_margin_by_hand():
    loss, m = bradley_terry_loss(t(2.0, 0.5, 1.0), t(1.0, 1.5, -2.0), margin=t(1.0, 0.0, 4.0))
    # r_c - r_r - margin = 0.0, -1.0, -1.0; metrics ignore the margin
    assert loss.item() == pytest.approx((LOG2 + 2 * neg_logsigmoid(-1.0)) / 3)
    assert m["margin"] == pytest.approx(1.0)


@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_matches_trl_reward_trainer(with_margin):
    """TRL's RewardTrainer.compute_loss through a stub trainer and a model that returns fixed rewards."""
    pytest.importorskip("trl")
    from trl.trainer.reward_trainer import RewardTrainer

    g = torch.Generator().manual_seed(7)
    chosen, rejected, margin = 3 * torch.randn(6, generator=g), 3 * torch.randn(6, generator=g), torch.rand(6)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False),
        args=SimpleNamespace(center_rewards_coefficient=None),
        accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x),
        _metrics={"eval": defaultdict(list)},
        _total_train_tokens=0,
    )
    inputs = {"input_ids": torch.zeros(12, 3, dtype=torch.long)} | ({"margin": margin} if with_margin else {})
    model = lambda **kw: SimpleNamespace(logits=torch.cat([chosen, rejected])[:, None])  # noqa: E731
    ref = RewardTrainer.compute_loss(trainer, model, inputs)
    loss, m = bradley_terry_loss(chosen, rejected, margin if with_margin else None)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    assert m["accuracy"] == pytest.approx(trainer._metrics["eval"]["accuracy"][-1])
    assert m["margin"] == pytest.approx(trainer._metrics["eval"]["margin"][-1], abs=1e-6)


# --- GAE, whitening, KL-shaped rewards -------------------------------------------------------------------


def loop_gae(rewards, values, lengths, gamma, lam):
    """Textbook GAE per row over its valid prefix, in python floats; 0 past the end."""
    advantages, returns = [], []
    for r, v, n in zip(rewards.tolist(), values.tolist(), lengths, strict=True):
        a, last = [0.0] * len(r), 0.0
        for i in reversed(range(n)):
            next_v = v[i + 1] if i + 1 < n else 0.0
            last = r[i] + gamma * next_v - v[i] + gamma * lam * last
            a[i] = last
        advantages.append(a)
        returns.append([a[i] + v[i] if i < n else 0.0 for i in range(len(r))])
    return torch.tensor(advantages), torch.tensor(returns)


def test_gae_two_steps_by_hand():
    adv, ret = gae(t([0.0, 1.0]), t([0.5, 0.2]), torch.tensor([[True, True]]), gamma=0.9, lam=0.8)
    # delta_1 = 1 - 0.2 = 0.8 = A_1; delta_0 = 0 + 0.9 * 0.2 - 0.5 = -0.32; A_0 = -0.32 + 0.72 * 0.8 = 0.256
    torch.testing.assert_close(adv, t([0.256, 0.8]))
    torch.testing.assert_close(ret, t([0.756, 1.0]))


@pytest.mark.parametrize(("gamma", "lam"), [(0.9, 0.8), (1.0, 1.0), (0.99, 0.0), (0.5, 0.95)])
def test_gae_matches_loop(gamma, lam):
    g = torch.Generator().manual_seed(2)
    lengths = [7, 4, 1]
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]  # (3, 7), right-padded
    rewards, values = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    adv, ret = gae(rewards.masked_fill(~mask, 9.0), values.masked_fill(~mask, float("nan")), mask, gamma, lam)
    ref_adv, ref_ret = loop_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, ref_adv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ret, ref_ret, rtol=1e-5, atol=1e-6)


def test_gae_with_gamma_lam_one_returns_are_rewards_to_go():
    rewards, mask = t([1.0, 2.0, 3.0, 0.0]), torch.tensor([[True, True, True, False]])
    _, ret = gae(rewards, t([0.3, -0.7, 5.0, 1.0]), mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, t([6.0, 5.0, 3.0, 0.0]))


def test_whiten_by_hand_ignores_padding():
    x = t([1.0, 2.0, 3.0, float("nan")], [5.0, 1e6, 1e6, 1e6])
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    # valid 1, 2, 3, 5: mean 2.75, unbiased var (3.0625 + 0.5625 + 0.0625 + 5.0625) / 3 = 2.9166..
    std = math.sqrt(8.75 / 3)
    expected = t([(v - 2.75) / std for v in (1.0, 2.0, 3.0)] + [0.0], [(5.0 - 2.75) / std, 0.0, 0.0, 0.0])
    torch.testing.assert_close(whiten(x, mask), expected, rtol=1e-5, atol=1e-6)


def test_kl_penalty_rewards_by_hand():
    logps = t([-1.0, -2.0, -3.0], [-1.0, -2.0, 7.0])
    ref = t([-1.5, -2.0, -2.0], [-0.5, -2.0, 7.5])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rewards = kl_penalty_rewards(t(1.0, 2.0), logps, ref, mask, kl_coef=0.1)
    # -0.1 * (logp - ref): row 0 -0.05, 0, +0.1 (+ score 1 at t=2); row 1 +0.05, 0 (+ score 2 at t=1), pad 0
    torch.testing.assert_close(rewards, t([-0.05, 0.0, 1.1], [0.05, 2.0, 0.0]))


# --- PPO policy and value losses -------------------------------------------------------------------------

# (ratio, advantage, per-token loss, clipped?) for clip = 0.2: the clipped term wins only where the
# ratio has left [0.8, 1.2] in the direction the advantage rewards
PPO_CASES = [
    (1.1, 1.0, -1.1, False),  # inside the range
    (0.9, -1.0, 0.9, False),  # inside the range
    (1.5, 1.0, -1.2, True),  # above, positive advantage: capped at 1.2
    (1.5, -1.0, 1.5, False),  # above, negative advantage: the unclipped, larger loss stays
    (0.5, 1.0, -0.5, False),  # below, positive advantage: the unclipped, larger loss stays
    (0.5, -1.0, 0.8, True),  # below, negative advantage: floored at 0.8
]


def test_ppo_policy_loss_clipping_by_hand():
    ratios, advs, losses, clipped = zip(*PPO_CASES, strict=True)
    old = t([-1.0] * 6 + [0.0])
    logps = (old + t([math.log(r) for r in ratios] + [50.0])).requires_grad_(True)  # last token: padding
    advantages = t(list(advs) + [1e9])
    mask = torch.tensor([[True] * 6 + [False]])
    loss, m = ppo_policy_loss(logps, old, advantages, mask, clip=0.2)
    assert loss.item() == pytest.approx(sum(losses) / 6, abs=1e-6)
    assert m["clipfrac"] == pytest.approx(2 / 6)
    assert m["approx_kl"] == pytest.approx(sum(0.5 * math.log(r) ** 2 for r in ratios) / 6, abs=1e-6)
    loss.backward()
    # d(-A * ratio) / d logp = -A * ratio; a clipped token and the padding get no gradient
    expected = [0.0 if c else -a * r / 6 for r, a, _, c in PPO_CASES] + [0.0]
    torch.testing.assert_close(logps.grad, t(expected), rtol=1e-5, atol=1e-7)


def test_ppo_value_loss_by_hand():
    values = t([1.1, 1.5, 0.5, 1.9, 123.0])
    old, returns = t([1.0, 1.0, 1.0, 2.0, 0.0]), t([2.0, 2.0, 2.0, 1.0, 0.0])
    mask = torch.tensor([[True, True, True, True, False]])
    loss, m = ppo_value_loss(values, old, returns, mask, clip=0.2)
    # V 1.1: inside, 0.9^2 = 0.81. V 1.5: clipped to 1.2, max(0.5^2, 0.8^2) = 0.64 (clipped wins).
    # V 0.5: clipped to 0.8, max(1.5^2, 1.2^2) = 2.25. V 1.9: inside, 0.9^2 = 0.81.
    assert loss.item() == pytest.approx(0.5 * (0.81 + 0.64 + 2.25 + 0.81) / 4, abs=1e-6)
    assert m["vf_clipfrac"] == pytest.approx(1 / 4)


# --- adaptive KL and GRPO --------------------------------------------------------------------------------


def test_adaptive_kl_controller_by_hand():
    kl = AdaptiveKLController(value=0.2, target=6.0, horizon=10000)
    assert kl.update(9.0, 256) == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))  # error 0.5, clipped to 0.2
    assert kl.update(6.6, 100) == pytest.approx(0.2 * 1.00512 * (1 + 0.1 * 100 / 10000))  # error 0.1
    assert kl.update(0.0, 1000) == pytest.approx(
        0.2 * 1.00512 * 1.001 * (1 - 0.2 * 1000 / 10000)
    )  # -1 -> -0.2
    assert kl.value == pytest.approx(0.2 * 1.00512 * 1.001 * 0.98)


def test_grpo_advantages_by_hand():
    rewards = t(1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 1.0, 2.0, 3.0)
    adv = grpo_advantages(rewards, group_size=4)
    s1 = math.sqrt(4 * 0.25 / 3) + 1e-4  # group 1: mean 0.5, unbiased std sqrt(1/3)
    s3 = math.sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3) + 1e-4  # group 3: mean 1.5
    expected = [0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1, 0.0, 0.0, 0.0, 0.0]
    expected += [-1.5 / s3, -0.5 / s3, 0.5 / s3, 1.5 / s3]
    torch.testing.assert_close(adv, t(*expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("group_size", [1, 5])
def test_grpo_rejects_bad_group_size(group_size):
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(torch.zeros(12), group_size)

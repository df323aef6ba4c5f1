"""Tests of radvlm.grpo (advantages, k3 KL, aggregation, micro-batch accumulation) and of the paper's clipped loss
``radvlm.objectives.GRPOLoss`` (the other losses: test_objectives.py)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from radvlm.grpo import (
    AGG_MODES,
    aggregate,
    aggregation_denominator,
    group_advantages,
    group_reward_std,
    kl_k3,
    masked_mean,
)
from radvlm.objectives import GRPOLoss

NAN = float("nan")


def policy_loss(logp, old_logp, advantages, mask, eps_low=0.2, eps_high=0.28, dual_clip=3.0, agg="token-mean",
                **call):
    """``GRPOLoss`` built and called in one go (the flat keyword form these hand-computed tests were written in)."""
    return GRPOLoss(eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, agg=agg)(
        logp, old_logp, advantages, mask, **call)


# ------------------------------------------------------------------------------------------------------
# group advantages
# ------------------------------------------------------------------------------------------------------


def _reference_advantages(rewards: list[float], group_size: int, scale: str, eps: float) -> list[float]:
    """Slow, obvious loop over groups with the statistics module (unbiased std)."""
    all_valid = [r for r in rewards if not math.isnan(r)]
    batch_std = statistics.stdev(all_valid) if len(all_valid) >= 2 else 0.0
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        valid = [r for r in group if not math.isnan(r)]
        if len(valid) < 2:
            out.extend([0.0] * group_size)
            continue
        mean = statistics.fmean(valid)
        denominator = {"group": statistics.stdev(valid) + eps, "batch": batch_std + eps, "none": 1.0}[scale]
        out.extend(0.0 if math.isnan(r) else (r - mean) / denominator for r in group)
    return out


def test_group_advantages_hand_computed_group_scale():
    # group 1: [1, 2, 3, 4]: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, std 1.2909944
    # group 2: [0, 0, 0, 8]: mean 2,   unbiased var (4 + 4 + 4 + 36) / 3 = 16,       std 4
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 8.0])
    std1 = math.sqrt(5 / 3) + 1e-6
    expected = torch.tensor(
        [
            -1.5 / std1,
            -0.5 / std1,
            0.5 / std1,
            1.5 / std1,
            -2 / 4.000001,
            -2 / 4.000001,
            -2 / 4.000001,
            6 / 4.000001,
        ]
    )
    torch.testing.assert_close(group_advantages(rewards, 4), expected, rtol=1e-6, atol=1e-7)


def test_group_advantages_hand_computed_batch_and_none_scales():
    # groups (0, 2) and (4, 6): centred (-1, 1) and (-1, 1)
    # batch: mean 3, unbiased var (9 + 1 + 1 + 9) / 3 = 20/3, std 2.5819889
    # group: std of (0, 2) = sqrt(2) = 1.4142136 (same for (4, 6))
    rewards = torch.tensor([0.0, 2.0, 4.0, 6.0], dtype=torch.float64)
    batch = 1 / (math.sqrt(20 / 3) + 1e-6)
    group = 1 / (math.sqrt(2) + 1e-6)
    torch.testing.assert_close(
        group_advantages(rewards, 2, scale="batch"),
        torch.tensor([-batch, batch, -batch, batch], dtype=torch.float64),
    )
    torch.testing.assert_close(
        group_advantages(rewards, 2, scale="group"),
        torch.tensor([-group, group, -group, group], dtype=torch.float64),
    )
    torch.testing.assert_close(
        group_advantages(rewards, 2, scale="none"), torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    )


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_group_advantages_match_loop_reference_with_nan_rewards(scale, seed):
    gen = torch.Generator().manual_seed(seed)
    group_size = 2 + seed  # 2 … 5
    rewards = torch.randn(7 * group_size, generator=gen, dtype=torch.float64) * 3 + 1
    nan_rows = torch.rand(rewards.shape, generator=gen) < 0.25
    rewards[nan_rows] = NAN
    rewards[:group_size] = NAN  # a group with no valid reward
    rewards[group_size : 2 * group_size - 1] = NAN  # a group with a single valid reward
    rewards[2 * group_size : 3 * group_size] = 0.3  # a group of identical rewards
    expected = _reference_advantages(rewards.tolist(), group_size, scale, 1e-6)
    got = group_advantages(rewards, group_size, scale=scale)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert not torch.isnan(got).any()
    assert (got[rewards.isnan()] == 0).all()
    assert (got[: 3 * group_size] == 0).all()


def test_group_advantages_nan_rewards_are_left_out_of_mean_and_std():
    # group 1: [1, NaN, 3, 5]: valid 1, 3, 5; mean 3; unbiased var (4 + 0 + 4) / 2 = 4; std 2
    #          → [-2/2.000001, 0, 0, 2/2.000001]
    # group 2: [NaN, 7, NaN, NaN]: one valid reward → all 0
    # group 3: all NaN → all 0
    rewards = torch.tensor([1.0, NAN, 3.0, 5.0, NAN, 7.0, NAN, NAN, NAN, NAN, NAN, NAN])
    a = 2 / 2.000001
    expected = torch.tensor([-a, 0.0, 0.0, a] + [0.0] * 8)
    torch.testing.assert_close(group_advantages(rewards, 4), expected, rtol=1e-6, atol=1e-7)


def test_identical_rewards_give_exactly_zero_advantage_and_std():
    # a float32 mean of eight 0.1 is one ulp off 0.1; (0.1 - mean) / (std + 1e-6) would then be about -0.0074
    rewards = torch.full((16,), 0.1)
    rewards[8:] = torch.tensor([0.7] * 8)
    assert (group_advantages(rewards, 8) == 0).all()
    assert (group_reward_std(rewards, 8) == 0).all()
    # in float64 the mean of seven 0.7 is off by 1.1e-16: without care the std is > 0 and passes the filter
    rewards64 = torch.full((7,), 0.7, dtype=torch.float64)
    assert (group_advantages(rewards64, 7) == 0).all()
    assert group_reward_std(rewards64, 7).item() == 0.0


def test_group_reward_std_is_nan_aware():
    # [1, 2, 3, 4]: sqrt(5/3) = 1.2909944; [1, NaN, 3, 5]: 2; [NaN, 7, NaN, NaN]: NaN (< 2 valid); [2]*4: 0
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0, NAN, 3.0, 5.0, NAN, 7.0, NAN, NAN, 2.0, 2.0, 2.0, 2.0])
    std = group_reward_std(rewards, 4)
    assert std.shape == (4,)
    torch.testing.assert_close(std[:2], torch.tensor([math.sqrt(5 / 3), 2.0]))
    assert math.isnan(std[2].item())
    assert std[3].item() == 0.0
    assert (std > 0).tolist() == [True, True, False, False]  # the zero-variance filter keeps groups 0, 1


def test_group_advantages_keep_float_dtype_and_promote_integers():
    assert group_advantages(torch.tensor([1, 2, 3, 4]), 2).dtype == torch.float32
    assert group_advantages(torch.tensor([1.0, 2.0], dtype=torch.bfloat16), 2).dtype == torch.bfloat16
    assert group_advantages(torch.empty(0), 8).shape == (0,)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rewards": torch.zeros(8), "group_size": 1}, ValueError, "group_size must be >= 2"),
        ({"rewards": torch.zeros(8), "group_size": 3}, ValueError, "not divisible by group_size 3"),
        ({"rewards": torch.zeros(2, 4), "group_size": 4}, ValueError, r"1-D \(B\*G,\)"),
        ({"rewards": torch.zeros(8), "group_size": 4.0}, TypeError, "group_size must be an int"),
        ({"rewards": torch.zeros(8), "group_size": 4, "scale": "std"}, ValueError, "scale must be one of"),
        (
            {"rewards": torch.tensor([0.0, 1.0, float("inf"), 2.0]), "group_size": 2},
            ValueError,
            r"±inf at rows \[2\]",
        ),
        ({"rewards": [0.0, 1.0], "group_size": 2}, TypeError, "must be a torch.Tensor"),
    ],
)
def test_group_advantages_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        group_advantages(**kwargs)


def test_group_reward_std_rejects_bad_group_size():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_reward_std(torch.zeros(4), 1)


# ------------------------------------------------------------------------------------------------------
# policy loss: one hand-computed batch
# ------------------------------------------------------------------------------------------------------
# old_logp = -1 everywhere; logp = -1 + log(ratio). eps_low 0.2 → lower bound 0.8, eps_high 0.28 → 1.28.
# row 0, A = +2,  ratios 1.0 | 1.5 | 0.5
#   1.0: max(-2*1.0, -2*1.0)   = -2.0                       gradient -A*r = -2
#   1.5: max(-3.0,  -2*1.28)   = -2.56   (clip high)        gradient 0
#   0.5: max(-1.0,  -2*0.8)    = -1.0    (A > 0: no clip)   gradient -1
# row 1, A = -1,  ratios 0.5 | 1.1 | 4.0
#   0.5: max(0.5, 0.8) = 0.8 (clip low); min(0.8, 3) = 0.8  gradient 0
#   1.1: max(1.1, 1.1) = 1.1;            min(1.1, 3) = 1.1  gradient -A*r = 1.1
#   4.0: max(4.0, 1.28) = 4.0;           min(4.0, 3) = 3.0  (dual clip) gradient 0
# row 2, A = +0.5, ratios 1.2 | (masked: ratio 100) | (masked: logp NaN)
#   1.2: max(-0.6, -0.5*1.2) = -0.6                         gradient -0.6
# row 3, A = +1, all masked (logp -inf there)
# sums: row 0 -5.56, row 1 4.9, row 2 -0.6; 7 tokens, 3 non-empty rows
#   token-mean                  (-5.56 + 4.9 - 0.6) / 7             = -1.26 / 7 = -0.18
#   seq-mean-token-mean         (-5.56/3 + 4.9/3 - 0.6/1) / 3       = -0.82 / 3
#   seq-mean-token-sum-norm(4)  ((-5.56 + 4.9 - 0.6) / 4) / 3       = -0.315 / 3 = -0.105
#   no dual clip, token-mean    (-1.26 - 3.0 + 4.0) / 7             = -0.26 / 7


def _hand_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ratios = torch.tensor(
        [[1.0, 1.5, 0.5], [0.5, 1.1, 4.0], [1.2, 100.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64
    )
    old_logp = torch.full((4, 3), -1.0, dtype=torch.float64)
    logp = old_logp + ratios.log()
    logp[2, 2] = NAN
    logp[3] = -math.inf
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    advantages = torch.tensor([2.0, -1.0, 0.5, 1.0], dtype=torch.float64)
    return logp.requires_grad_(), old_logp, advantages, mask


@pytest.mark.parametrize(
    ("agg", "max_len", "expected"),
    [
        ("token-mean", None, -1.26 / 7),
        ("seq-mean-token-mean", None, -0.82 / 3),
        ("seq-mean-token-sum-norm", 4, -0.105),
    ],
)
def test_policy_loss_hand_computed_for_each_aggregation(agg, max_len, expected):
    logp, old_logp, advantages, mask = _hand_batch()
    loss, _ = policy_loss(logp, old_logp, advantages, mask, agg=agg, max_len=max_len)
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_policy_loss_gradient_is_zero_on_clipped_and_masked_tokens():
    logp, old_logp, advantages, mask = _hand_batch()
    loss, _ = policy_loss(logp, old_logp, advantages, mask)
    loss.backward()
    # token-mean: d loss / d logp = (d L_tok / d logp) / 7 with d(-A*r)/d logp = -A*r on unclipped tokens
    expected = (
        torch.tensor(
            [[-2.0, 0.0, -1.0], [0.0, 1.1, 0.0], [-0.6, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64
        )
        / 7
    )
    torch.testing.assert_close(logp.grad, expected, rtol=1e-12, atol=1e-14)


def test_policy_loss_stats_hand_computed():
    logp, old_logp, advantages, mask = _hand_batch()
    _, stats = policy_loss(logp, old_logp, advantages, mask)
    # one clip-high (row 0, r 1.5), one clip-low (row 1, r 0.5), one dual clip (row 1, r 4) of 7 tokens
    assert stats["clip_frac_high"].item() == pytest.approx(1 / 7)
    assert stats["clip_frac_low"].item() == pytest.approx(1 / 7)
    assert stats["clip_frac_dual"].item() == pytest.approx(1 / 7)
    # ratio mean (1 + 1.5 + 0.5 + 0.5 + 1.1 + 4 + 1.2) / 7 = 9.8 / 7 = 1.4
    assert stats["ratio_mean"].item() == pytest.approx(1.4, rel=1e-12)
    # approx_kl = mean of r - 1 - ln r: 0 + 0.0945349 + 2 * 0.1931472 + 0.0046898 + 1.6137056 + 0.0176784
    kl = [r - 1 - math.log(r) for r in (1.0, 1.5, 0.5, 0.5, 1.1, 4.0, 1.2)]
    assert stats["approx_kl"].item() == pytest.approx(sum(kl) / 7, rel=1e-12)
    assert stats["approx_kl"].item() == pytest.approx(2.1169032 / 7, rel=1e-6)
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())


def test_policy_loss_without_dual_clip_keeps_the_large_ratio_loss():
    logp, old_logp, advantages, mask = _hand_batch()
    loss, stats = policy_loss(logp, old_logp, advantages, mask, dual_clip=None)
    assert loss.item() == pytest.approx(-0.26 / 7, rel=1e-12)
    assert stats["clip_frac_dual"].item() == 0.0


def test_policy_loss_all_zero_mask_gives_zero_loss_and_zero_gradient():
    logp = torch.full((3, 4), NAN, dtype=torch.float64, requires_grad=True)
    old_logp = torch.full((3, 4), -math.inf, dtype=torch.float64)
    mask = torch.zeros(3, 4)
    for agg in AGG_MODES:
        loss, stats = policy_loss(logp, old_logp, torch.ones(3), mask, agg=agg, max_len=4)
        loss.backward()
        assert loss.item() == 0.0
        assert (logp.grad == 0).all()
        assert all(v.item() == 0.0 for v in stats.values())
        logp.grad = None


# ------------------------------------------------------------------------------------------------------
# gradients through the whole chain
# ------------------------------------------------------------------------------------------------------


def test_identical_group_rewards_give_zero_gradient_through_policy_loss():
    # group 0: eight identical rewards (advantage 0); group 1: varied rewards
    rewards = torch.tensor([0.1] * 8 + [0.0, 1.0, 0.5, 0.2, 0.9, 0.3, 0.4, 0.8])
    advantages = group_advantages(rewards, 8)  # (16,)
    gen = torch.Generator().manual_seed(0)
    old_logp = -torch.rand(16, 5, generator=gen) * 3
    logp = (old_logp + 0.3 * torch.randn(16, 5, generator=gen)).requires_grad_()
    mask = torch.ones(16, 5)
    loss, _ = policy_loss(logp, old_logp, advantages, mask)
    loss.backward()
    assert (logp.grad[:8] == 0).all()
    assert (logp.grad[8:] != 0).any()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gradient_step_moves_logp_in_the_direction_of_the_advantage(sign):
    old_logp = torch.tensor([[-1.0, -2.0]])
    logp = old_logp.clone().requires_grad_()
    loss, _ = policy_loss(logp, old_logp, torch.tensor([sign]), torch.ones(1, 2))
    loss.backward()
    # ratio 1 (unclipped): d loss / d logp = -A * 1 / 2 tokens
    torch.testing.assert_close(logp.grad, torch.full((1, 2), -sign / 2))
    stepped = logp.detach() - 0.1 * logp.grad  # one SGD step
    assert (torch.sign(stepped - old_logp) == sign).all()


# ------------------------------------------------------------------------------------------------------
# micro-batch accumulation
# ------------------------------------------------------------------------------------------------------


def _random_minibatch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    n, length = 8, 7
    lengths = torch.tensor([7, 3, 0, 5, 1, 6, 2, 4])  # row 2 is empty
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)  # (8, 7)
    old_logp = -torch.rand(n, length, generator=gen, dtype=torch.float64) * 4
    logp = old_logp + 0.4 * torch.randn(n, length, generator=gen, dtype=torch.float64)
    ref_logp = old_logp + 0.2 * torch.randn(n, length, generator=gen, dtype=torch.float64)
    advantages = torch.randn(n, generator=gen, dtype=torch.float64)
    return logp, old_logp, ref_logp, advantages, mask


@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batch_losses_sum_to_the_mini_batch_loss(agg):
    logp, old_logp, ref_logp, advantages, mask = _random_minibatch(seed=3)
    beta, max_len = 0.01, 9

    def full_loss(lp, old, ref, adv, m, den=None):
        pg, _ = policy_loss(lp, old, adv, m, agg=agg, max_len=max_len, denominator=den)
        return pg + beta * aggregate(kl_k3(lp, ref), m, agg, max_len=max_len, denominator=den)

    whole_logp = logp.clone().requires_grad_()
    whole = full_loss(whole_logp, old_logp, ref_logp, advantages, mask)
    whole.backward()

    den = aggregation_denominator(mask, agg)
    parts_logp = logp.clone().requires_grad_()
    total = torch.zeros((), dtype=torch.float64)
    for rows in (slice(0, 3), slice(3, 8)):
        width = int(mask[rows].sum(dim=1).max())  # each micro-batch padded only to its own longest row
        part = full_loss(
            parts_logp[rows, :width],
            old_logp[rows, :width],
            ref_logp[rows, :width],
            advantages[rows],
            mask[rows, :width],
            den,
        )
        part.backward()
        total = total + part.detach()
    torch.testing.assert_close(total, whole.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(parts_logp.grad, whole_logp.grad, rtol=1e-12, atol=1e-14)

    # without the shared denominator each half is normalised on its own, which is a different number
    halves = sum(
        full_loss(logp[r], old_logp[r], ref_logp[r], advantages[r], mask[r])
        for r in (slice(0, 3), slice(3, 8))
    )
    assert abs(halves.item() - whole.item()) > 1e-3


def test_aggregation_denominator_counts_tokens_or_nonempty_rows():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert aggregation_denominator(mask, "token-mean").item() == 3.0
    assert aggregation_denominator(mask, "seq-mean-token-mean").item() == 2.0
    assert aggregation_denominator(mask, "seq-mean-token-sum-norm").item() == 2.0


def test_aggregate_with_zero_denominator_gives_zero():
    values = torch.ones(2, 2, requires_grad=True)
    out = aggregate(values, torch.ones(2, 2), "token-mean", denominator=0)
    out.backward()
    assert out.item() == 0.0 and (values.grad == 0).all()


# ------------------------------------------------------------------------------------------------------
# k3 KL, masked mean, aggregation of half precision
# ------------------------------------------------------------------------------------------------------


def test_kl_k3_zero_when_equal_positive_otherwise_and_clamped():
    logp = torch.tensor([[-1.0, -1.0, -2.0, -1.0, -1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.0, 0.0, -1.0, -2.0, 4.0, -50.0]], dtype=torch.float64)
    kl = kl_k3(logp, ref)
    # d = ref - logp: 0 → 0; 1 → e - 2 = 0.7182818; 1 → 0.7182818; -1 → 1/e = 0.3678794;
    # 5 → e^5 - 6 = 142.41 → clamped to 10; -50 → clamped to -20 → e^-20 + 19 ≈ 19 → clamped to 10
    expected = torch.tensor([[0.0, math.e - 2, math.e - 2, math.exp(-1), 10.0, 10.0]], dtype=torch.float64)
    torch.testing.assert_close(kl, expected, rtol=1e-12, atol=1e-14)
    kl.sum().backward()
    # d/d logp of exp(d) - d - 1 with d = ref - logp is 1 - exp(d); 0 where clamped
    expected_grad = torch.tensor(
        [[0.0, 1 - math.e, 1 - math.e, 1 - math.exp(-1), 0.0, 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(logp.grad, expected_grad, rtol=1e-12, atol=1e-14)


def test_kl_k3_mask_zeroes_padding_even_when_non_finite():
    logp = torch.tensor([[-1.0, -math.inf]], requires_grad=True)
    ref = torch.tensor([[-2.0, -math.inf]])
    kl = kl_k3(logp, ref, mask=torch.tensor([[1, 0]]))
    kl.sum().backward()
    # d = -2 - (-1) = -1 → e^-1 + 1 - 1 = 0.3678794; the masked position is 0
    torch.testing.assert_close(kl, torch.tensor([[math.exp(-1), 0.0]]))
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0


def test_masked_mean_ignores_masked_non_finite_values():
    x = torch.tensor([[1.0, 3.0, NAN], [math.inf, 2.0, 4.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert masked_mean(x, mask).item() == pytest.approx((1 + 3 + 2 + 4) / 4)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([2.0, 3.0]))
    assert masked_mean(x, torch.zeros(2, 3)).item() == 0.0


def test_policy_loss_upcasts_bfloat16_logp_and_still_reaches_it_with_the_gradient():
    # ratio exp(0.25) = 1.284 > 1.28 is clipped for A > 0; in bfloat16 the log-ratio 0.25 is exact, but a
    # bf16 ratio would round 1.284 to 1.2813 and 1.28 to 1.2813 too, losing the clip decision
    old_logp = torch.tensor([[-1.0, -1.0]], dtype=torch.bfloat16)
    logp = torch.tensor([[-0.75, -1.0]], dtype=torch.bfloat16, requires_grad=True)
    loss, stats = policy_loss(logp, old_logp, torch.tensor([1.0]), torch.ones(1, 2))
    loss.backward()
    assert loss.dtype == torch.float32 and logp.grad.dtype == torch.bfloat16
    # token 0 clipped (loss -1.28, gradient 0), token 1 ratio 1 (loss -1, gradient -1); token-mean over 2
    assert loss.item() == pytest.approx((-1.28 - 1.0) / 2, rel=1e-6)
    assert logp.grad.float().tolist() == [[0.0, -0.5]]
    assert stats["clip_frac_high"].item() == 0.5


def test_aggregate_of_bfloat16_values_is_computed_in_float32():
    values = torch.full((1, 300), 1.0, dtype=torch.bfloat16)
    out = aggregate(values, torch.ones(1, 300), "token-mean")
    assert out.dtype == torch.float32 and out.item() == 1.0


# ------------------------------------------------------------------------------------------------------
# argument errors
# ------------------------------------------------------------------------------------------------------


def _ok_args():
    return {
        "logp": torch.zeros(2, 3),
        "old_logp": torch.zeros(2, 3),
        "advantages": torch.zeros(2),
        "mask": torch.ones(2, 3),
    }


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        ({"logp": torch.zeros(2, 3, 1)}, ValueError, r"logp must be 2-D \(N, L\)"),
        ({"old_logp": torch.zeros(2, 4)}, ValueError, "old_logp shape"),
        ({"advantages": torch.zeros(3)}, ValueError, r"advantages must have shape \(N,\) = \(2,\)"),
        ({"advantages": torch.tensor([0.0, NAN])}, ValueError, "advantages contain NaN"),
        ({"mask": torch.ones(2, 2)}, ValueError, "mask shape"),
        ({"mask": torch.full((2, 3), 0.5)}, ValueError, "only 0 and 1"),
        ({"agg": "sum"}, ValueError, "agg must be one of"),
        ({"agg": "seq-mean-token-sum-norm"}, ValueError, "needs max_len"),
        ({"agg": "seq-mean-token-sum-norm", "max_len": 0}, ValueError, "max_len must be a positive int"),
        ({"dual_clip": 1.0}, ValueError, "dual_clip must be > 1"),
        ({"eps_low": 1.0}, ValueError, r"eps_low must be in \[0, 1\)"),
        ({"eps_high": -0.1}, ValueError, "eps_high must be >= 0"),
    ],
)
def test_policy_loss_rejects_bad_arguments(override, error, match):
    with pytest.raises(error, match=match):
        policy_loss(**{**_ok_args(), **override})


def test_kl_and_aggregate_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="does not match ref_logp shape"):
        kl_k3(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="mask shape"):
        aggregate(torch.zeros(2, 3), torch.ones(3, 2), "token-mean")
    with pytest.raises(ValueError, match="denominator must be >= 0"):
        aggregate(torch.zeros(2, 3), torch.ones(2, 3), "token-mean", denominator=-1)
    with pytest.raises(ValueError, match="denominator must be >= 0"):
        aggregate(torch.zeros(2, 3), torch.ones(2, 3), "token-mean", denominator=float("nan"))
    with pytest.raises(ValueError, match="denominator must be a scalar"):
        aggregate(torch.zeros(2, 3), torch.ones(2, 3), "token-mean", denominator=torch.ones(2))

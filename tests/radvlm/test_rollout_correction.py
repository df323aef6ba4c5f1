"""Rollout correction (``radvlm.rollout_correction``) against hand-computed values and a loop reference."""

from __future__ import annotations

import math

import pytest
import torch

from radvlm.objectives import GRPOLoss
from radvlm.rollout_correction import (
    RolloutCorrection,
    logprob_agreement,
    rejection_mask,
    rollout_log_ratio,
    truncated_is_weights,
)

# one rollout of 3 tokens, the last one padding: π_old = (0.5, 0.25), π_rollout = (0.25, 0.5) → ratios (2, 0.5)
OLD = torch.log(torch.tensor([[0.5, 0.25, 0.9]]))
ROLL = torch.log(torch.tensor([[0.25, 0.5, 0.1]]))
MASK = torch.tensor([[1, 1, 0]])


def test_log_ratio_is_zero_on_padding_and_float32():
    lr = rollout_log_ratio(OLD.bfloat16(), ROLL.bfloat16(), MASK)
    assert lr.dtype == torch.float32
    assert lr[0, 2] == 0 and lr[0, 0] == pytest.approx(math.log(2), abs=1e-2)


def test_token_weights_cap_each_ratio():
    w = truncated_is_weights(OLD, ROLL, MASK, "token", cap=1.5)
    assert w.tolist()[0] == pytest.approx([1.5, 0.5, 0.0])  # min(2, 1.5), min(0.5, 1.5), padding 0


def test_sequence_weights_use_the_product_of_the_ratios():
    w = truncated_is_weights(OLD, ROLL, MASK, "sequence", cap=1.5)
    assert w.tolist()[0] == pytest.approx([1.0, 1.0, 0.0])  # 2 · 0.5 = 1 for every token of the rollout
    big = truncated_is_weights(OLD, torch.log(torch.tensor([[0.25, 0.125, 0.1]])), MASK, "sequence", cap=3.0)
    assert big.tolist()[0] == pytest.approx([3.0, 3.0, 0.0])  # 2 · 2 = 4, capped at 3


def test_rejection_by_token_sequence_and_geometric_mean():
    assert rejection_mask(OLD, ROLL, MASK, "token", 0.6, 1.5).tolist() == [[False, False, False]]
    assert rejection_mask(OLD, ROLL, MASK, "sequence", 0.6, 1.5).tolist() == [[True, True, False]]
    assert rejection_mask(OLD, ROLL, MASK, "geometric", 0.6, 1.5).tolist() == [[True, True, False]]
    # ratios (2, 2): product 4 is outside [0.5, 2], geometric mean 2 is inside
    roll = torch.log(torch.tensor([[0.25, 0.125, 0.1]]))
    assert rejection_mask(OLD, roll, MASK, "sequence", 0.5, 2.0).tolist() == [[False, False, False]]
    assert rejection_mask(OLD, roll, MASK, "geometric", 0.5, 2.0).tolist() == [[True, True, False]]


def test_weights_match_a_loop_reference():
    g = torch.Generator().manual_seed(0)
    old, roll = -torch.rand(4, 6, generator=g) * 3, -torch.rand(4, 6, generator=g) * 3
    mask = (torch.rand(4, 6, generator=g) > 0.3).long()
    token = truncated_is_weights(old, roll, mask, "token", cap=2.0)
    seq = truncated_is_weights(old, roll, mask, "sequence", cap=2.0)
    for i in range(4):
        total = sum(float(old[i, t] - roll[i, t]) for t in range(6) if mask[i, t])
        for t in range(6):
            want_tok = min(math.exp(float(old[i, t] - roll[i, t])), 2.0) if mask[i, t] else 0.0
            want_seq = min(math.exp(total), 2.0) if mask[i, t] else 0.0
            assert float(token[i, t]) == pytest.approx(want_tok, rel=1e-5)
            assert float(seq[i, t]) == pytest.approx(want_seq, rel=1e-5)


def test_agreement_is_mean_and_max_absolute_difference():
    mean, top = logprob_agreement(OLD, ROLL, MASK)
    assert mean == pytest.approx(math.log(2)) and top == pytest.approx(math.log(2))
    assert logprob_agreement(OLD, ROLL, torch.zeros_like(MASK)) == (0.0, 0.0)


def test_correction_settings_combine_rejection_and_weights():
    weights, kept, stats = RolloutCorrection(level="token", cap=1.5, reject="token", reject_low=0.4,
                                             reject_high=1.8).apply(OLD, ROLL, MASK)
    assert kept.tolist() == [[0, 1, 0]]  # ratio 2 rejected, 0.5 kept
    assert weights.tolist()[0] == pytest.approx([0.0, 0.5, 0.0])
    assert stats["rollout_rejected_frac"] == 0.5 and stats["rollout_is_capped_frac"] == 0.0
    weights, kept, stats = RolloutCorrection(level=None).apply(OLD, ROLL, MASK)
    assert weights.tolist() == [[1.0, 1.0, 0.0]] and kept.tolist() == MASK.tolist()


def test_policy_loss_weighs_each_token():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9]])).requires_grad_()
    adv = torch.tensor([1.0])
    plain, _ = GRPOLoss()(logp, logp.detach(), adv, MASK)
    w = torch.tensor([[1.5, 0.5, 0.0]])
    weighted, _ = GRPOLoss()(logp, logp.detach(), adv, MASK, token_weights=w)
    # on-policy ratio 1: token losses −A = −1 each; token-mean plain −1, weighted (−1.5 − 0.5) / 2 = −1
    assert float(plain) == pytest.approx(-1.0) and float(weighted) == pytest.approx(-1.0)
    weighted.backward()
    assert logp.grad.tolist()[0] == pytest.approx([-0.75, -0.25, 0.0])  # −A·w/2 per token

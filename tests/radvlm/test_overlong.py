"""Tests of DAPO's overlong reward shaping (radvlm.rewards.OverlongPenalty) and its route through compute_rewards."""

from __future__ import annotations

import pytest
import torch

from radvlm.rewards import OverlongPenalty, RewardTerm, compute_rewards


class Constant:
    """A text metric that gives every answer 1 (its worst value 0 goes to unclosed thinking)."""

    higher_is_better = True
    worst_value = 0.0

    def score(self, preds, targets):
        return torch.ones(len(preds))


def test_overlong_penalty_hand_computed():
    # L_max 10, L_cache 4: no penalty up to 6 tokens, then (6 − L) / 4: 7 → −0.25, 8 → −0.5, 10 → −1; 12 → −1
    penalty = OverlongPenalty(max_length=10, cache_length=4)
    got = penalty.score_lengths([0, 6, 7, 8, 10, 12])
    assert got.dtype == torch.float32
    assert got.tolist() == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]


def test_overlong_term_is_added_with_its_weight_whatever_the_thinking():
    # rows: lengths 5, 9, 10; weights: text metric 1, overlong 0.5 → penalties 0, −0.75, −1 → totals
    # 1 + 0, 1 − 0.375, and for the unclosed thinking row 0 (worst value) − 0.5 = −0.5
    terms = [RewardTerm(Constant(), name="constant"),
             RewardTerm(OverlongPenalty(max_length=10, cache_length=4), weight=0.5, name="overlong")]
    result = compute_rewards(terms, ["a", "b", "<think>never closed"], ["t"] * 3, [None] * 3,
                             [False, False, True], lengths=[5, 9, 10])
    assert result.total.tolist() == pytest.approx([1.0, 0.625, -0.5])
    assert result.values["overlong"].tolist() == [0.0, -0.75, -1.0]
    assert result.failed["overlong"] == 0


def test_overlong_term_without_lengths_or_with_bad_settings_is_a_clear_error():
    terms = [RewardTerm(OverlongPenalty(max_length=10, cache_length=4), name="overlong")]
    with pytest.raises(ValueError, match="'overlong' scores token lengths: compute_rewards needs lengths="):
        compute_rewards(terms, ["a"], ["t"], [None], [False])
    with pytest.raises(ValueError, match="lengths has 2 values for 1 completions"):
        compute_rewards(terms, ["a"], ["t"], [None], [False], lengths=[1, 2])
    with pytest.raises(ValueError, match="cache_length 11 exceeds max_length 10"):
        OverlongPenalty(max_length=10, cache_length=11)
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        OverlongPenalty(max_length=0, cache_length=0)

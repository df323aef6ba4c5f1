"""Tests of radvlm.objectives: GSPO, CISPO, SAPO losses (value and gradient), the entropy bonus, and the advantage
estimators (group and per-term normalisation), each against numbers computed by hand below. GRPOLoss's own
hand-computed batch is in test_grpo_math.py."""

from __future__ import annotations

import math

import pytest
import torch

from radvlm.objectives import (
    CISPOLoss,
    GroupNormalization,
    GRPOLoss,
    GSPOLoss,
    PerTermNormalization,
    SAPOLoss,
)
from radvlm.vocab_chunks import chunk_logprobs

NAN = float("nan")


def _leaf(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).requires_grad_()


# ------------------------------------------------------------------------------------------------------ GSPO
# old_logp = 0, so logp is the per-token log-ratio. eps 0.2 / 0.2 → clip range [0.8, 1.2].
# row 0, A = +2, logp [0.3, -0.1]: s = exp((0.3 - 0.1) / 2) = exp(0.1) = 1.1051709 (inside): token losses
#   -2 * 1.1051709 each, row mean -2.2103418; gradient per token -A * s / (|y| * N') = -2 * 1.1051709 / (2 * 3)
#   = -0.3683903 for BOTH tokens (the token with a negative log-ratio too: one ratio per sequence)
# row 1, A = -1, logp [0.5, pad]: s = exp(0.5) = 1.6487213 > 1.2 but A < 0: max(1.6487213, 1.2) keeps the
#   unclipped branch; gradient -A * s / (1 * 3) = 0.5495738
# row 2, A = +1, logp [0.4, 0.4]: s = exp(0.4) = 1.4918247 > 1.2, A > 0: clipped, loss -1.2 each, gradient 0
# seq-mean-token-mean: (-2.2103418 + 1.6487213 - 1.2) / 3 = -0.5872069


def _gspo_batch():
    logp = _leaf([[0.3, -0.1], [0.5, 0.0], [0.4, 0.4]])
    old = torch.zeros(3, 2, dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    adv = torch.tensor([2.0, -1.0, 1.0], dtype=torch.float64)
    return logp, old, adv, mask


def test_gspo_loss_and_gradient_hand_computed():
    logp, old, adv, mask = _gspo_batch()
    loss, stats = GSPOLoss(eps_low=0.2, eps_high=0.2)(logp, old, adv, mask)
    loss.backward()
    assert loss.item() == pytest.approx(-0.5872068551503891, rel=1e-12)
    expected = torch.tensor([[-0.3683903060252159, -0.3683903060252159], [0.5495737569000427, 0.0], [0.0, 0.0]],
                            dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected, rtol=1e-12, atol=1e-14)
    # row 2's two tokens are in a clipped sequence (A > 0, above): 2 of 5 tokens
    assert stats["clip_frac_high"].item() == pytest.approx(2 / 5) and stats["clip_frac_low"].item() == 0.0
    assert "clip_frac_dual" not in stats


def test_gspo_paper_clip_range_is_three_and_four_in_ten_thousand():
    loss_fn = GSPOLoss()
    assert (loss_fn.eps_low, loss_fn.eps_high, loss_fn.agg) == (3e-4, 4e-4, "seq-mean-token-mean")
    # one row, A = +1: s = exp(0.00035) = 1.00035 < 1.0004 is inside (gradient -1 / 2 per token);
    # s = exp(0.00045) = 1.00045 > 1.0004 is clipped (gradient 0)
    for mean_log_ratio, grad in ((0.00035, -0.5), (0.00045, 0.0)):
        logp = _leaf([[mean_log_ratio, mean_log_ratio]])
        loss, _ = loss_fn(logp, torch.zeros(1, 2, dtype=torch.float64), torch.tensor([1.0]), torch.ones(1, 2))
        loss.backward()
        assert logp.grad.tolist()[0] == pytest.approx([grad * math.exp(mean_log_ratio)] * 2, rel=1e-9, abs=0)


# ----------------------------------------------------------------------------------------------------- CISPO
# old_logp = -1, logp = -1 + ln r. eps_low 0.2, eps_high 0.28 (relative): weights clamp(r, 0.8, 1.28).
# row 0, A = +1, r [1.5, 0.5]: weights [1.28, 0.8]; logp [-0.5945349, -1.6931472]
#   token losses -1.28 * 1 * -0.5945349 = 0.7610047, -0.8 * -1.6931472 = 1.3545177
# row 1, A = -2, r [1.1, pad]: weight 1.1; logp -0.9046898: loss -1.1 * -2 * -0.9046898 = -1.9903176
# token-mean over 3 tokens: (0.7610047 + 1.3545177 - 1.9903176) / 3 = 0.0417349
# gradient -weight * A / 3: [-1.28 / 3, -0.8 / 3], [2.2 / 3]: the clipped tokens keep a gradient


def test_cispo_loss_and_gradient_hand_computed():
    ratios = torch.tensor([[1.5, 0.5], [1.1, 1.0]], dtype=torch.float64)
    logp = (-1.0 + ratios.log()).requires_grad_()
    old = torch.full((2, 2), -1.0, dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss, stats = CISPOLoss(eps_low=0.2, eps_high=0.28)(logp, old, adv, mask)
    loss.backward()
    assert loss.item() == pytest.approx(0.04173493387967361, rel=1e-10)
    expected = torch.tensor([[-1.28 / 3, -0.8 / 3], [2.2 / 3, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected, rtol=1e-12, atol=1e-14)
    assert stats["clip_frac_high"].item() == pytest.approx(1 / 3) and stats["clip_frac_low"].item() == pytest.approx(1 / 3)


def test_cispo_default_has_no_lower_bound_and_rejects_out_of_range_bounds():
    loss_fn = CISPOLoss()
    assert (loss_fn.eps_low, loss_fn.eps_high, loss_fn.agg) == (1.0, 0.28, "token-mean")
    # r = 0.01, A = -1: weight 0.01 (no lower clamp), gradient -0.01 * -1 / 1 = 0.01
    logp = _leaf([[math.log(0.01)]])
    loss, _ = loss_fn(logp, torch.zeros(1, 1, dtype=torch.float64), torch.tensor([-1.0]), torch.ones(1, 1))
    loss.backward()
    assert logp.grad.item() == pytest.approx(0.01, rel=1e-9)
    with pytest.raises(ValueError, match=r"CISPOLoss: eps_low must be in \[0, 1\]"):
        CISPOLoss(eps_low=1.5)
    with pytest.raises(ValueError, match="CISPOLoss: eps_high must be >= 0"):
        CISPOLoss(eps_high=-1.0)


# ------------------------------------------------------------------------------------------------------ SAPO
# old_logp = 0, logp = ln r; f(r) = σ(τ (r − 1)) · 4 / τ, d f / d logp = 4 σ (1 − σ) r.
# row 0, A = +1 (τ 1), r [1, 2]: f(1) = 0.5 * 4 = 2, f(2) = σ(1) * 4 = 0.7310586 * 4 = 2.9242343
#   row mean -(2 + 2.9242343) / 2 = -2.4621172; gradients -A * [1, 4 σ(1)(1 − σ(1)) 2 = 1.5728955] / (2 tok * 2 rows)
#   = [-0.25, -0.3932239]
# row 1, A = -0.5 (τ 1.05), r 0.5: σ(-0.525) = 0.3716838, f = 0.3716838 * 4 / 1.05 = 1.4159383, loss 0.7079692
#   gradient 0.5 * 4 * 0.3716838 * 0.6283162 * 0.5 / (1 tok * 2 rows) = 0.1167675
# seq-mean-token-mean: (-2.4621172 + 0.7079692) / 2 = -0.8770740


def test_sapo_loss_and_gradient_hand_computed():
    logp = torch.log(torch.tensor([[1.0, 2.0], [0.5, 1.0]], dtype=torch.float64)).requires_grad_()
    old = torch.zeros(2, 2, dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([1.0, -0.5], dtype=torch.float64)
    loss, stats = SAPOLoss()(logp, old, adv, mask)
    loss.backward()
    assert loss.item() == pytest.approx(-0.8770739960541631, rel=1e-12)
    expected = torch.tensor([[-0.25, -0.3932238664829637], [0.11676747791067407, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected, rtol=1e-12, atol=1e-14)
    # gate 4 σ (1 − σ): 1, 0.7864477, 0.9341398 → mean 0.9068625
    assert stats["gate_mean"].item() == pytest.approx(0.9068625187504399, rel=1e-12)


def test_sapo_on_policy_gradient_equals_grpo_gradient():
    # r = 1: d f / d logp = 4 * 0.25 * 1 = 1, as the unclipped GRPO token (-A per token, token-mean here)
    logp = _leaf([[-1.0, -2.0]])
    loss, _ = SAPOLoss(agg="token-mean")(logp, logp.detach(), torch.tensor([3.0]), torch.ones(1, 2))
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([-1.5, -1.5], rel=1e-12)


# --------------------------------------------------------------------------------------------- entropy bonus
# GRPOLoss, on-policy (r = 1), A = +1, two tokens of one row, token-mean, entropy_coeff 0.1, entropy [0.5, 1.5]:
#   policy loss -1; bonus mean(0.5, 1.5) = 1.0; loss = -1 - 0.1 * 1.0 = -1.1
#   d loss / d entropy = -0.1 / 2 tokens = -0.05 each; d loss / d logp = -1 / 2 = -0.5 each (unchanged)


def test_entropy_bonus_hand_computed_value_and_gradient():
    logp = _leaf([[-1.0, -2.0]])
    entropy = _leaf([[0.5, 1.5]])
    loss_fn = GRPOLoss(entropy_coeff=0.1)
    assert loss_fn.needs_entropy and not GRPOLoss().needs_entropy
    loss, stats = loss_fn(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 2), entropy=entropy)
    loss.backward()
    assert loss.item() == pytest.approx(-1.1, rel=1e-12)
    assert entropy.grad.tolist()[0] == pytest.approx([-0.05, -0.05], rel=1e-12)
    assert logp.grad.tolist()[0] == pytest.approx([-0.5, -0.5], rel=1e-12)
    assert stats["entropy_bonus"].item() == pytest.approx(1.0)


def test_entropy_bonus_is_aggregated_like_the_loss():
    # seq-mean-token-mean: rows [0.5, 1.5] (mean 1.0) and [3.0] (mean 3.0) → bonus (1 + 3) / 2 = 2.0;
    # token-mean would give (0.5 + 1.5 + 3) / 3 = 1.6667. Zero advantages: loss = -0.5 * 2.0 = -1.0
    entropy = _leaf([[0.5, 1.5], [3.0, 9.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, _ = SAPOLoss(entropy_coeff=0.5)(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2), mask,
                                          entropy=entropy)
    loss.backward()
    assert loss.item() == pytest.approx(-1.0, rel=1e-12)
    # d / d H: -0.5 * (1/2 rows) * (1/|y_i|): row 0 -0.125 per token, row 1 -0.25, the masked one 0
    assert entropy.grad.tolist() == [[-0.125, -0.125], [-0.25, 0.0]]


def test_entropy_bonus_without_entropy_is_a_clear_error():
    with pytest.raises(ValueError, match=r"needs the per-token entropy"):
        GSPOLoss(entropy_coeff=0.01)(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2))


def test_chunk_entropy_is_over_the_full_vocabulary_at_the_temperature():
    # (computed in float32) a head that returns the logits [0, ln 3] for the one position: p = [1/4, 3/4] at T = 1,
    # H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623351; at T = 2, z = [0, ln 3 / 2], p ∝ [1, √3]: H = 0.6568064
    head = torch.nn.Linear(1, 2, bias=True, dtype=torch.float64)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, math.log(3.0)]))
    h = torch.ones(1, 1, 1, dtype=torch.float64)
    target = torch.tensor([[1]])
    for temperature, entropy, logp in ((1.0, 0.5623351446188083, math.log(0.75)),
                                       (2.0, 0.6568063976894717, math.log(math.sqrt(3) / (1 + math.sqrt(3))))):
        lp, ent = chunk_logprobs(head, h, target, temperature)
        assert ent.item() == pytest.approx(entropy, rel=1e-6) and lp.item() == pytest.approx(logp, rel=1e-6)  # float32
    lp, ent = chunk_logprobs(head, h, target, 1.0, with_entropy=False)
    assert ent is None and lp.item() == pytest.approx(math.log(0.75), rel=1e-6)


def test_losses_give_zero_loss_and_gradient_on_an_empty_mask():
    for loss_fn in (GRPOLoss(), GSPOLoss(), CISPOLoss(), SAPOLoss()):
        logp = torch.full((2, 3), NAN, dtype=torch.float64, requires_grad=True)
        loss, _ = loss_fn(logp, torch.full((2, 3), -math.inf, dtype=torch.float64), torch.ones(2), torch.zeros(2, 3))
        loss.backward()
        assert loss.item() == 0.0 and bool((logp.grad == 0).all()), type(loss_fn).__name__


@pytest.mark.parametrize("loss_fn", [GRPOLoss(), GSPOLoss(), CISPOLoss(), SAPOLoss()], ids=repr)
def test_losses_upcast_bfloat16_and_return_float32(loss_fn):
    logp = torch.tensor([[-0.75, -1.0]], dtype=torch.bfloat16, requires_grad=True)
    loss, stats = loss_fn(logp, torch.full((1, 2), -1.0, dtype=torch.bfloat16), torch.tensor([1.0]), torch.ones(1, 2))
    loss.backward()
    assert loss.dtype == torch.float32 and logp.grad.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in stats.values())


@pytest.mark.parametrize(("make", "match"), [
    (lambda: GRPOLoss(dual_clip=1.0), "GRPOLoss: dual_clip must be > 1"),
    (lambda: GSPOLoss(eps_low=1.0), r"GSPOLoss: eps_low must be in \[0, 1\)"),
    (lambda: SAPOLoss(tau_neg=0.0), "SAPOLoss: tau_pos and tau_neg must be > 0"),
    (lambda: SAPOLoss(agg="sum"), "agg must be one of"),
    (lambda: GroupNormalization(scale="rank"), "GroupNormalization: scale must be one of"),
])
def test_objectives_reject_bad_settings_naming_the_class(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --------------------------------------------------------------------------------------- advantage estimators
# two groups of G = 3, terms [t0 (weight 1), t1 (weight 0.5)], signed values:
#   group 0 (both terms): t0 [1, 0, 0.5], t1 [0, 4, 2]; row 2 unavailable (total NaN): left out everywhere
#     t0 over rows 0, 1: mean 0.5, std 0.7071068 → z [+0.7071068, -0.7071068]; t1: z [-0.7071068, +0.7071068]
#     sum 1 * z0 + 0.5 * z1 = [+0.3535534, -0.3535534], row 2: 0
#   group 1 (t1 does not score it: NaN): t0 [0, 1, 0.5]: mean 0.5, std 0.5 → z [-1, 1, 0]; sum [-1, 1, 0]
#   batch over the 5 available rows: [0.3535534, -0.3535534, -1, 1, 0], mean 0, unbiased std
#   sqrt((0.125 + 0.125 + 1 + 1 + 0) / 4) = 0.75 → [0.4714045, -0.4714045, -1.3333333, 1.3333333, 0]
# the total (1 * t0 + 0.5 * t1) of group 0 is [1, 2]: group normalisation ranks row 1 first, per-term row 0


def _two_terms():
    values = torch.tensor([[1.0, 0.0], [0.0, 4.0], [0.5, 2.0], [0.0, NAN], [1.0, NAN], [0.5, NAN]])
    weights = torch.tensor([1.0, 0.5])
    total = torch.tensor([1.0, 2.0, NAN, 0.0, 1.0, 0.5])
    return total, values, weights


def test_per_term_normalisation_hand_computed():
    total, values, weights = _two_terms()
    adv = PerTermNormalization()(total, 3, values, weights)
    expected = [0.4714045, -0.4714045, 0.0, -1.3333333, 1.3333333, 0.0]
    assert adv.dtype == torch.float32
    assert adv.tolist() == pytest.approx(expected, abs=1e-5)
    assert adv[2].item() == 0.0  # the unavailable row


def test_group_normalisation_of_the_same_total_ranks_the_other_way():
    total, values, weights = _two_terms()
    # group 0: [1, 2] → mean 1.5, std 0.7071068 → [-0.7071068, 0.7071068, 0]; group 1: [0, 1, 0.5] → [-1, 1, 0]
    adv = GroupNormalization()(total, 3, values, weights)
    assert adv.tolist() == pytest.approx([-0.7071068, 0.7071068, 0.0, -1.0, 1.0, 0.0], abs=1e-5)
    # Dr. GRPO: centred only
    adv = GroupNormalization(scale="none")(total, 3)
    assert adv.tolist() == pytest.approx([-0.5, 0.5, 0.0, -0.5, 0.5, 0.0], abs=1e-7)


def test_per_term_normalisation_needs_the_terms():
    total, values, weights = _two_terms()
    with pytest.raises(ValueError, match="needs term_values"):
        PerTermNormalization()(total, 3)
    with pytest.raises(ValueError, match=r"term_values must be \(B\*G, K\)"):
        PerTermNormalization()(total, 3, values[:4], weights)

"""Rollout correction: the trainer's π_old against the rollout engine's own log-probs (π_rollout).

An engine other than the training model (vLLM) samples from a slightly different distribution: other kernels,
bf16 rounding, a prompt or image processed differently. The update then is off-policy by the ratio
π_old/π_rollout per token. Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework
secretly brings you off-policy RL training"; verl ``algorithm.rollout_correction``, TRL
``vllm_importance_sampling_correction``) multiplies each token's policy loss by that ratio, capped; rejection
masks out the tokens or rollouts whose ratio lies outside a band. Pure functions of tensors, float32 whatever
the input dtype, all detached; ``RolloutCorrection`` holds the settings (``GRPOModule(rollout_correction=...)``).

Log-ratios are clamped to ±20 before ``exp`` (as the losses of ``radvlm.objectives`` do for their ratio).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0
WeightLevel = Literal["token", "sequence"]
RejectLevel = Literal["token", "sequence", "geometric"]


def _check(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor) -> Tensor:
    if old_logp.dim() != 2 or old_logp.shape != rollout_logp.shape or mask.shape != old_logp.shape:
        raise ValueError(f"old_logp, rollout_logp and mask must share one (N, L) shape, got "
                         f"{tuple(old_logp.shape)}, {tuple(rollout_logp.shape)}, {tuple(mask.shape)}")
    return mask.bool()


def rollout_log_ratio(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor) -> Tensor:  # (N, L)
    """log π_old − log π_rollout per selected token (float32, 0 outside ``mask``, clamped to ±20)."""
    m = _check(old_logp, rollout_logp, mask)
    diff = old_logp.detach().float() - rollout_logp.detach().float()  # (N, L)
    return torch.where(m, diff, torch.zeros_like(diff)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def truncated_is_weights(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, level: WeightLevel = "token",
                         cap: float = 2.0) -> Tensor:  # (N, L)
    """Importance weights ``min(π_old/π_rollout, cap)`` per token (``token``) or one per rollout for all its
    tokens (``sequence``: the product of its token ratios), 0 outside ``mask``.

    Example: token ratios [2, 0.5] of one rollout, cap 1.5 → token [1.5, 0.5]; sequence 2·0.5 = 1 → [1, 1].
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    log_ratio = rollout_log_ratio(old_logp, rollout_logp, mask)  # (N, L)
    m = mask.bool()
    if level == "token":
        weights = log_ratio.exp().clamp(max=cap)  # (N, L)
    elif level == "sequence":
        per_row = log_ratio.sum(dim=1, keepdim=True).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (N, 1)
        weights = per_row.exp().clamp(max=cap).expand_as(log_ratio)  # (N, L)
    else:
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    return torch.where(m, weights, torch.zeros_like(weights))


def rejection_mask(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, level: RejectLevel = "sequence",
                   low: float = 0.5, high: float = 2.0) -> Tensor:  # (N, L) bool
    """``mask`` without the tokens (``token``) or whole rollouts (``sequence``: product of the ratios;
    ``geometric``: their geometric mean over the rollout's tokens) whose ratio π_old/π_rollout is outside
    ``[low, high]``.

    Example: token ratios [2, 0.5], band [0.6, 1.5] → token: both rejected; sequence (1.0) and geometric (1.0):
    both kept.
    """
    if not 0 < low <= 1 <= high:
        raise ValueError(f"need 0 < low ≤ 1 ≤ high, got low={low}, high={high}")
    log_ratio = rollout_log_ratio(old_logp, rollout_logp, mask)  # (N, L)
    m = mask.bool()
    lo, hi = torch.log(torch.tensor(low)), torch.log(torch.tensor(high))
    if level == "token":
        value = log_ratio  # (N, L)
    elif level == "sequence":
        value = log_ratio.sum(dim=1, keepdim=True).expand_as(log_ratio)  # (N, L)
    elif level == "geometric":
        count = m.sum(dim=1, keepdim=True).clamp(min=1)  # (N, 1)
        value = (log_ratio.sum(dim=1, keepdim=True) / count).expand_as(log_ratio)  # (N, L)
    else:
        raise ValueError(f"level must be 'token', 'sequence' or 'geometric', got {level!r}")
    return m & (value >= lo - 1e-6) & (value <= hi + 1e-6)


def logprob_agreement(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor) -> tuple[float, float]:
    """Mean and max of |log π_old − log π_rollout| over the selected tokens (0, 0 when none are selected): a
    large value at the first step is a prompt, image or weight mismatch between trainer and engine."""
    diff = rollout_log_ratio(old_logp, rollout_logp, mask).abs()  # (N, L)
    m = mask.bool()
    if not bool(m.any()):
        return 0.0, 0.0
    return float(diff[m].mean()), float(diff[m].max())


@dataclass(frozen=True)
class RolloutCorrection:
    """How the update corrects for the rollout engine's own distribution.

    Args:
        level: truncated importance weights per ``token`` or per ``sequence``; ``None``: no weights.
        cap: the weights' upper bound (verl's and TRL's default: 2.0).
        reject: also mask out tokens / rollouts whose ratio leaves ``[reject_low, reject_high]``
            (``token``, ``sequence``, ``geometric``); ``None``: no rejection.
        reject_low, reject_high: the band of kept ratios.
    """

    level: WeightLevel | None = "token"
    cap: float = 2.0
    reject: RejectLevel | None = None
    reject_low: float = 0.5
    reject_high: float = 2.0

    def apply(self, old_logp: Tensor, rollout_logp: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, dict[str, float]]:
        """``(weights (N, L) float32, mask (N, L), stats)``: the per-token loss weights (ones without
        ``level``), the mask after rejection, and ``rollout_is_mean``, ``rollout_is_capped_frac``,
        ``rollout_rejected_frac`` over the selected tokens."""
        m = mask.bool()
        kept = m
        if self.reject is not None:
            kept = rejection_mask(old_logp, rollout_logp, mask, self.reject, self.reject_low, self.reject_high)
        if self.level is None:
            weights = kept.float()
        else:
            weights = truncated_is_weights(old_logp, rollout_logp, kept, self.level, self.cap)
        n = max(int(m.sum()), 1)
        raw = rollout_log_ratio(old_logp, rollout_logp, kept).exp()  # (N, L)
        stats = {"rollout_is_mean": float(weights[kept].mean()) if bool(kept.any()) else 0.0,
                 "rollout_is_capped_frac": float(((raw > self.cap) & kept).sum()) / n if self.level else 0.0,
                 "rollout_rejected_frac": float((m & ~kept).sum()) / n}
        return weights, kept.to(mask.dtype), stats

"""Pure GRPO math: group advantages, the k3 KL term and loss aggregation (the losses: ``radvlm.objectives``),
and which groups DAPO's dynamic sampling keeps (:class:`DynamicSampling`, :func:`informative_groups`,
:func:`groups_to_take`, :func:`split_buffer`).

Every function here is a pure function of tensors (no model, no optimizer, no Lightning), so the step logic
in ``lightning_modules/grpo.py`` stays thin and this file can be tested against hand-computed numbers. One GRPO
step as the paper runs it (docs/paper.md §2): :func:`group_advantages`, then ``radvlm.objectives.GRPOLoss`` +
β·:func:`kl_k3`, each reduced by :func:`aggregate`; the formulas are in those functions.

Deviations from the paper and from verl (whose ``core_algos`` the paper's settings are written for), each
described where it is made: unavailable (NaN) rewards and exact zeros for identical rewards
(:func:`group_advantages`); masked positions, the ``seq-mean-*`` modes and an all-zero mask (:func:`aggregate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

__all__ = [
    "ADVANTAGE_SCALES",
    "DynamicSampling",
    "DynamicSamplingError",
    "AGG_MODES",
    "KL_CLAMP",
    "LOG_RATIO_CLAMP",
    "aggregate",
    "aggregation_denominator",
    "group_advantages",
    "group_reward_std",
    "groups_to_take",
    "informative_groups",
    "kl_k3",
    "masked_mean",
    "split_buffer",
]

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AdvantageScale = Literal["group", "batch", "none"]

AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
ADVANTAGE_SCALES: tuple[str, ...] = ("group", "batch", "none")
LOG_RATIO_CLAMP = 20.0  # |log π_θ − log π_old| and |log π_ref − log π_θ| are clamped to this before exp
KL_CLAMP = 10.0  # the per-token k3 value is clamped to [−KL_CLAMP, KL_CLAMP] (verl "low_var_kl")


# ----------------------------------------------------------------------------------------------------------
# advantages
# ----------------------------------------------------------------------------------------------------------


def _grouped_rewards(rewards: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Validate ``rewards (B*G,)`` and return ``(values (B, G) float64, valid (B, G) bool)``."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__} {group_size!r}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group needs two rollouts to compare), got {group_size}")
    if not isinstance(rewards, Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B*G,), got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards length {rewards.numel()} is not divisible by group_size {group_size}: "
            "groups must be complete and contiguous (rows i*G … i*G+G-1)"
        )
    if rewards.is_complex():
        raise TypeError(f"rewards must be real, got dtype {rewards.dtype}")
    values = rewards.detach().to(torch.float64).view(-1, group_size)  # (B, G)
    infinite = torch.isinf(values)  # (B, G)
    if bool(infinite.any()):
        rows = infinite.flatten().nonzero().flatten()[:8].tolist()
        raise ValueError(
            f"rewards contain ±inf at rows {rows} (first 8 shown); mark unavailable rewards with NaN instead"
        )
    valid = ~torch.isnan(values)  # (B, G)
    return values, valid


def _shifted_group_moments(values: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """NaN-aware group statistics of ``values (B, G)`` in float64.

    Returns ``(centred (B, G), std (B,), count (B,))``: ``centred`` is r − mean of the group (0 where the
    reward is invalid), ``std`` the unbiased std of the valid rewards (0 where count < 2), ``count`` the
    number of valid rewards. Values are shifted by the group's first valid reward before summing (see
    :func:`group_advantages`) so identical rewards give exactly 0.
    """
    count = valid.sum(dim=1)  # (B,)
    first = valid.to(torch.int8).argmax(dim=1, keepdim=True)  # (B, 1) index of the first valid reward
    filled = torch.where(valid, values, torch.zeros_like(values))  # (B, G) NaN → 0
    shift = filled.gather(1, first)  # (B, 1) first valid reward (0 for an all-NaN group)
    x = torch.where(valid, filled - shift, torch.zeros_like(values))  # (B, G) shifted, 0 where invalid
    mean_x = x.sum(dim=1, keepdim=True) / count.clamp(min=1).unsqueeze(1)  # (B, 1)
    centred = torch.where(valid, x - mean_x, torch.zeros_like(values))  # (B, G) r − mean
    var = centred.square().sum(dim=1) / (count - 1).clamp(min=1)  # (B,) unbiased
    std = torch.where(count >= 2, var.sqrt(), torch.zeros_like(var))  # (B,)
    return centred, std, count


def group_reward_std(rewards: Tensor, group_size: int) -> Tensor:
    """Unbiased std of the valid (non-NaN) rewards of each group: ``(B*G,)`` → ``(B,)``.

    NaN for a group with fewer than 2 valid rewards (the spread is undefined there), so ``std > 0`` selects
    exactly the groups that carry a learning signal and ``torch.nanmean`` gives a loggable average. A group
    of identical rewards has a std of exactly 0. Returned in the dtype of ``rewards`` (float32 for integer
    rewards).
    """
    values, valid = _grouped_rewards(rewards, group_size)  # (B, G), (B, G)
    _, std, count = _shifted_group_moments(values, valid)  # (B,), (B,)
    std = torch.where(count >= 2, std, torch.full_like(std, float("nan")))  # (B,)
    return std.to(_out_dtype(rewards))


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale: AdvantageScale = "group",
    eps: float = 1e-6,
) -> Tensor:
    """GRPO advantages of contiguous groups: ``rewards (B*G,)`` → ``advantages (B*G,)``.

    ``scale``: ``"group"`` (paper): (r − mean_g) / (std_g + eps), std unbiased; ``"batch"``:
    (r − mean_g) / (std of all valid rewards of the batch + eps); ``"none"`` (Dr. GRPO): r − mean_g.
    NaN rewards are left out of their group's mean and std and get advantage 0; a group with fewer than 2
    valid rewards gets 0 everywhere. Returned in the dtype of ``rewards`` (float32 for integer rewards);
    no gradient flows back to ``rewards``.

    The paper's step (docs/paper.md §2): ``B`` prompts and ``G`` rollouts per prompt (paper: B = 512, G = 8)
    are sampled with the current policy, which at this moment is the "old" policy π_old. Rows are contiguous:
    rollouts of prompt i are rows i·G … i·G+G−1. Every rollout is scored with the reward metric →
    ``rewards (B*G,)``; an unavailable reward is NaN. Advantage of rollout j of prompt i (``scale="group"``)::

        A_ij = (r_ij − mean_j r_ij) / (std_j r_ij + 1e-6)          std unbiased (divides by n − 1)

    The same scalar advantage is used for every token of the rollout. Groups whose rewards are all equal have
    A = 0 and carry no gradient; :func:`group_reward_std` finds them (filter / logging).

    Deviations from the paper and from verl:

    - Unavailable (NaN) rewards: left out of their group's mean and std, advantage 0 (DESIGN.md). A group
      with fewer than 2 valid rewards gets advantage 0 everywhere; verl gives a one-sample group mean 0 and
      std 1, i.e. the raw reward as advantage. ±inf rewards are rejected with an error (they are bugs, not
      "unavailable").
    - Group mean and std are computed in float64 after subtracting the group's first valid reward (a shift
      that leaves both unchanged mathematically), so a group of identical rewards gets a std of exactly 0 and
      advantages of exactly 0. A plain float32 mean of eight copies of 0.1 is off by one ulp, which the 1e-6
      denominator turns into advantages of −0.0074 instead of 0.
    - ``scale="batch"`` divides by the unbiased std of all valid rewards in the batch; ``scale="none"`` is the
      Dr. GRPO advantage (centred only). The paper uses ``"group"``.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    values, valid = _grouped_rewards(rewards, group_size)  # (B, G), (B, G)
    centred, std, count = _shifted_group_moments(values, valid)  # (B, G), (B,), (B,)
    if scale == "group":
        adv = centred / (std + eps).unsqueeze(1)  # (B, G)
    elif scale == "batch":
        flat_values, flat_valid = values.view(1, -1), valid.view(1, -1)  # (1, B*G)
        _, batch_std, _ = _shifted_group_moments(flat_values, flat_valid)  # (1,) 0 if < 2 valid overall
        adv = centred / (batch_std + eps)  # (B, G)
    else:
        adv = centred  # (B, G)
    usable = valid & (count >= 2).unsqueeze(1)  # (B, G)
    adv = torch.where(usable, adv, torch.zeros_like(adv))  # (B, G)
    return adv.reshape(-1).to(_out_dtype(rewards))  # (B*G,)


def _out_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float32


# ----------------------------------------------------------------------------------------------------------
# masks and aggregation
# ----------------------------------------------------------------------------------------------------------


def _bool_mask(mask: Tensor, shape: torch.Size, name: str = "mask") -> Tensor:
    """Check ``mask`` against ``shape`` and return it as bool; a non-bool mask must hold only 0 and 1."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(f"{name} shape {tuple(mask.shape)} does not match values shape {tuple(shape)}")
    if mask.dtype == torch.bool:
        return mask
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{name} must hold only 0 and 1 (or be bool); got other values")
    return mask != 0


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1; 0 (not NaN) where nothing is selected.

    Masked-out entries may hold NaN or inf: they are replaced by 0 before summing and get zero gradient.
    ``dim=None`` reduces everything to a 0-d tensor, otherwise that dimension.
    """
    m = _bool_mask(mask, x.shape)  # same shape as x
    total = torch.where(m, x, torch.zeros_like(x)).sum(dim=dim)  # reduced
    count = m.sum(dim=dim)  # reduced, integer
    return total / count.clamp(min=1).to(total.dtype)


def _check_agg(agg: str, max_len: int | None) -> None:
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    if agg == "seq-mean-token-sum-norm":
        if max_len is None:
            raise ValueError(
                "agg='seq-mean-token-sum-norm' needs max_len (the constant response-length budget)"
            )
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")


def _check_2d(values: Tensor, name: str) -> None:
    if not isinstance(values, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if values.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, L), got shape {tuple(values.shape)}")


def aggregation_denominator(mask: Tensor, agg: AggMode) -> Tensor:
    """What :func:`aggregate` divides by for this ``mask (N, L)``: a 0-d float tensor.

    ``"token-mean"``: the number of selected tokens; both ``seq-mean-*`` modes: the number of rows with at
    least one selected token. Compute it once on a whole mini-batch and pass it as ``denominator`` to every
    micro-batch so the micro-batch results sum to the mini-batch result.
    """
    _check_agg(agg, max_len=1)
    _check_2d(mask, "mask")
    m = _bool_mask(mask, mask.shape)  # (N, L)
    if agg == "token-mean":
        return m.sum().to(torch.float32)  # ()
    return m.any(dim=1).sum().to(torch.float32)  # ()


def aggregate(
    values: Tensor,
    mask: Tensor,
    agg: AggMode,
    max_len: int | None = None,
    denominator: Tensor | float | None = None,
) -> Tensor:
    """Reduce per-token ``values (N, L)`` over the 0/1 ``mask (N, L)`` to a scalar (formulas below).

    ``max_len`` is used (and required) only by ``"seq-mean-token-sum-norm"``. ``denominator`` replaces the
    count this call would divide by (see :func:`aggregation_denominator`); a denominator of 0 gives 0.
    Masked entries never reach the result or its gradient, even when they are NaN or inf. An all-zero mask
    gives exactly 0. The result is float32 for half-precision ``values``, else their dtype.

    Modes (``m`` is the 0/1 response mask, ``N'`` the number of rows with at least one response token)::

        "token-mean"              Σ_i Σ_t m·x / Σ_i Σ_t m                 (paper, DAPO)
        "seq-mean-token-mean"     (1/N') Σ_i [Σ_t m·x / Σ_t m]            (original GRPO)
        "seq-mean-token-sum-norm" (1/N') Σ_i [Σ_t m·x / max_len]          (Dr. GRPO; max_len a constant)

    Gradient accumulation: pass ``denominator=aggregation_denominator(mini_batch_mask, agg)`` to every
    micro-batch call; the sum of the micro-batch results then equals the whole mini-batch result (up to float
    summation order), whatever the micro-batches' padding lengths.

    Deviations from verl:

    - Masked positions are replaced by 0 before any arithmetic, so NaN/inf log-probs at padding never reach
      the loss or its gradient (verl multiplies by the mask, where a NaN at a padded position poisons the
      loss).
    - ``seq-mean-*`` modes average over rows that have at least one response token; verl averages over all
      rows (and its "seq-mean-token-mean" divides 0 by 0 for an empty row). "seq-mean-token-sum-norm" here
      divides by the constant ``max_len`` and takes the *mean* over sequences as Dr. GRPO writes it; verl sums
      over sequences and divides by the padded length of the batch.
    - An all-zero mask gives a loss of exactly 0 (and zero gradient) instead of NaN.
    """
    _check_agg(agg, max_len)
    _check_2d(values, "values")
    m = _bool_mask(mask, values.shape)  # (N, L)
    dtype = torch.promote_types(values.dtype, torch.float32)  # bf16/fp16 sums and counts need float32
    x = torch.where(m, values, torch.zeros_like(values)).to(dtype)  # (N, L) masked entries → 0
    row_tokens = m.sum(dim=1)  # (N,)
    if agg == "token-mean":
        numerator = x.sum()  # ()
        default_den = row_tokens.sum()  # ()
    else:
        if agg == "seq-mean-token-mean":
            per_row = x.sum(dim=1) / row_tokens.clamp(min=1).to(x.dtype)  # (N,) empty rows → 0
        else:
            per_row = x.sum(dim=1) / float(max_len)  # (N,) Dr. GRPO constant normaliser
        numerator = per_row.sum()  # ()
        default_den = (row_tokens > 0).sum()  # () rows with ≥ 1 token
    if denominator is None:
        den = default_den.to(x.dtype)  # ()
    else:
        den = torch.as_tensor(denominator, dtype=x.dtype, device=x.device)  # ()
        if den.dim() != 0:
            raise ValueError(f"denominator must be a scalar, got shape {tuple(den.shape)}")
        if not bool(den >= 0):
            raise ValueError(f"denominator must be >= 0, got {den.item()}")
    positive = den > 0  # ()
    return numerator / torch.where(positive, den, torch.ones_like(den)) * positive  # ()


# ----------------------------------------------------------------------------------------------------------
# KL
# ----------------------------------------------------------------------------------------------------------


def kl_k3(logp: Tensor, ref_logp: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-token k3 ("low_var_kl") estimate of KL(π_θ ‖ π_ref) on tokens sampled from π_θ.

    ``d = clamp(ref_logp − logp, ±20)``; value ``exp(d) − d − 1`` clamped to [−10, 10] (it is ≥ 0, so only
    the upper clamp can act, and there the gradient is 0). ``(N, L)`` in, ``(N, L)`` out (any equal shapes
    work). ``ref_logp`` is detached (the reference policy never trains). With ``mask`` (same shape, 0/1)
    masked positions are 0 with zero gradient even if non-finite. Computed (and returned) in at least
    float32.
    """
    if not isinstance(logp, Tensor) or not isinstance(ref_logp, Tensor):
        raise TypeError("logp and ref_logp must be torch.Tensor")
    if logp.shape != ref_logp.shape:
        raise ValueError(
            f"logp shape {tuple(logp.shape)} does not match ref_logp shape {tuple(ref_logp.shape)}"
        )
    dtype = torch.promote_types(logp.dtype, torch.float32)
    d = ref_logp.detach().to(dtype) - logp.to(dtype)  # (N, L) log π_ref − log π_θ
    if mask is not None:
        d = torch.where(_bool_mask(mask, logp.shape), d, torch.zeros_like(d))  # (N, L) masked → 0 → k3 = 0
    d = d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (N, L)
    return (torch.exp(d) - d - 1.0).clamp(-KL_CLAMP, KL_CLAMP)  # (N, L)


def token_micro_batches(rows: list[int], lengths: list[int], max_rows: int, max_tokens: int | None) -> list[list[int]]:
    """Micro-batches of ``rows`` balanced by tokens: rows sorted by ``lengths`` (their real tokens; ties in
    the given order), then cut in order before a micro-batch passes ``max_rows`` rows or ``max_tokens`` padded
    tokens (rows × its longest row: what the padded pass computes); a row alone is always a micro-batch.
    ``max_tokens=None``: ``max_rows`` rows at a time in the given order (plain micro-batches).

    Example: rows [0, 1, 2, 3], lengths [10, 2, 9, 3], max_rows 4, max_tokens 12 → sorted 1 (2), 3 (3),
    2 (9), 0 (10): [1, 3] is 2 × 3 = 6, adding 2 gives 3 × 9 = 27 > 12, so [[1, 3], [2], [0]]."""
    max_rows = max(1, int(max_rows))
    if max_tokens is None:
        return [rows[i : i + max_rows] for i in range(0, len(rows), max_rows)]
    if max_tokens < 1:
        raise ValueError(f"micro_batch_tokens must be >= 1 or None, got {max_tokens}")
    out: list[list[int]] = []
    longest = 0
    for k in sorted(range(len(rows)), key=lambda i: lengths[i]):
        grown = max(longest, lengths[k])
        if out and len(out[-1]) < max_rows and (len(out[-1]) + 1) * grown <= max_tokens:
            out[-1].append(rows[k])
            longest = grown
        else:
            out.append([rows[k]])
            longest = lengths[k]
    return out


# ----------------------------------------------------------------------------------------------------------
# dynamic sampling (DAPO)
# ----------------------------------------------------------------------------------------------------------


class DynamicSamplingError(RuntimeError):
    """Dynamic sampling generated ``max_gen_batches`` batches without filling a training batch."""


@dataclass(frozen=True)
class DynamicSampling:
    """DAPO dynamic sampling (arXiv 2503.14476, §3.2): groups whose outcome does not vary are dropped, and
    generation goes on, one data-loader batch at a time, until every process holds a full batch of informative
    groups; the groups beyond it are carried to the next step (``GRPOModule(dynamic_sampling=...)``).

    Args:
        outcome: the reward term(s) (``RewardTerm.name``, e.g. ``soft_f1``) whose variation makes a group
            informative: a group is kept when one of them varies within it. Not the shaped total: an
            all-correct group with one overlong or format penalty has a varying total and no outcome signal.
        min_std: a group is informative when the unbiased std of its outcome is above this (0: any variation,
            for exact or binary outcomes; continuous rewards need a floor, e.g. 0.05).
        max_gen_batches: at most this many generation batches toward one training batch, then
            ``DynamicSamplingError`` (``None``: no limit).
        max_carried: at most this many informative groups carried to the next step, the oldest first (the
            others are dropped and counted); ``None``: one batch (``batch_groups``).
        batch_groups: informative groups per process per training step; ``None``: the data module's
            ``batch_size`` (prompts per process per batch).

    Deviations from DAPO (verl's recipe): the extra groups are carried, not dropped, and they are one policy
    update old when they train (their π_old is computed at the step that trains them, as for fresh groups); the
    filter reads named outcome terms, not the total; NaN outcomes (unavailable) never count as variation.
    """

    outcome: str | list[str]
    min_std: float = 0.0
    max_gen_batches: int | None = 10
    max_carried: int | None = None
    batch_groups: int | None = None

    def __post_init__(self) -> None:
        if not self.names or not all(isinstance(n, str) and n for n in self.names):
            raise ValueError(f"dynamic_sampling.outcome must name one or more reward terms, got {self.outcome!r}")
        if not self.min_std >= 0:
            raise ValueError(f"dynamic_sampling.min_std must be >= 0, got {self.min_std}")
        for name in ("max_gen_batches", "batch_groups"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"dynamic_sampling.{name} must be an int >= 1 or None, got {value!r}")
        if self.max_carried is not None and (not isinstance(self.max_carried, int) or self.max_carried < 0):
            raise ValueError(f"dynamic_sampling.max_carried must be an int >= 0 or None, got {self.max_carried!r}")

    @property
    def names(self) -> tuple[str, ...]:
        """The outcome term names as a tuple."""
        return (self.outcome,) if isinstance(self.outcome, str) else tuple(self.outcome)


def informative_groups(outcomes: Tensor, group_size: int, min_std: float = 0.0) -> Tensor:
    """Which groups carry an outcome signal: ``outcomes (T, B*G)`` (or ``(B*G,)``: one term) → ``(B,)`` bool.

    A group is informative when, for at least one term, the unbiased std of its valid (non-NaN) values is
    above ``min_std`` (:func:`group_reward_std`: exactly 0 for identical values; NaN, never informative, with
    fewer than 2 valid values). Example, G = 4, one term: [1, 1, 1, 1] → std 0 → False; [1, 0, 1, 1] → std 0.5
    → True with ``min_std`` 0 or 0.4, False with 0.6; [1, NaN, NaN, NaN] → False.
    """
    if not isinstance(outcomes, Tensor):
        raise TypeError(f"outcomes must be a torch.Tensor, got {type(outcomes).__name__}")
    if outcomes.dim() == 1:
        outcomes = outcomes.unsqueeze(0)  # (1, B*G)
    if outcomes.dim() != 2 or outcomes.shape[0] == 0:
        raise ValueError(f"outcomes must be (T, B*G) with T >= 1 or (B*G,), got shape {tuple(outcomes.shape)}")
    stds = torch.stack([group_reward_std(term.double(), group_size) for term in outcomes])  # (T, B) NaN: < 2 valid
    return (stds > float(min_std)).any(dim=0)  # (B,) NaN > x is False


def groups_to_take(buffered: Sequence[int], target: int, gen_batches: int, max_gen_batches: int | None,
                   outcome: Sequence[str] = ()) -> int:
    """Informative groups every process trains on now: ``target`` when every process holds at least ``target``
    (``buffered``: the groups each process holds, the same list on every process), else 0 (generate another
    batch). ``gen_batches``: generation batches so far toward this training batch, this one included; when it
    reaches ``max_gen_batches`` without a full batch, raises ``DynamicSamplingError`` naming the cap.

    Example: target 4; buffered [5, 3] → 0 (process 1 lacks one); [5, 4] → 4; [5, 3] with gen_batches 3 and
    max_gen_batches 3 → error.
    """
    counts = [int(c) for c in buffered]
    if not counts or target < 1:
        raise ValueError(f"groups_to_take needs the counts of every process and a target >= 1, got {counts}, {target}")
    if min(counts) >= target:
        return target
    if max_gen_batches is not None and gen_batches >= max_gen_batches:
        where = f" (per process: {counts})" if len(counts) > 1 else ""
        raise DynamicSamplingError(
            f"dynamic sampling: {gen_batches} generation batches (the cap, dynamic_sampling.max_gen_batches="
            f"{max_gen_batches}) gave {min(counts)} of the {target} informative groups a training batch needs"
            f"{where}; the outcome {list(outcome)} rarely varies within a group (prompts too easy or too hard for "
            f"the policy, or min_std too high): raise max_gen_batches (null: no cap), lower min_std, or use "
            f"harder / easier prompts")
    return 0


def split_buffer(n_buffered: int, take: int, max_carried: int) -> tuple[list[int], list[int], int]:
    """First in, first out: the buffered groups ``0 … n_buffered−1`` (oldest first) → ``(trained now, carried
    to the next step, number dropped)``. The ``take`` oldest train; of the rest, the ``max_carried`` oldest are
    carried and the newer ones dropped (a group never waits behind a newer one: with ``max_carried`` at most
    ``take``, every carried group trains at the next step).
    Example: 7 buffered, take 4, max_carried 2 → [0, 1, 2, 3], [4, 5], 1 dropped."""
    if not 0 <= take <= n_buffered:
        raise ValueError(f"cannot take {take} of {n_buffered} buffered groups")
    if max_carried < 0:
        raise ValueError(f"max_carried must be >= 0, got {max_carried}")
    rest = list(range(take, n_buffered))
    return list(range(take)), rest[:max_carried], max(0, len(rest) - max_carried)

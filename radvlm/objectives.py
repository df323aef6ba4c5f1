"""Policy losses (GRPO, GSPO, CISPO, SAPO) and advantage estimators as small classes, chosen by ``class_path``.

A loss is built with its hyper-parameters and called ``loss_fn(logp, old_logp, advantages, mask) -> (loss,
stats)`` (``(N, L)``, ``(N, L)``, ``(N,)``, ``(N, L)``); an estimator ``estimator(rewards, group_size,
term_values, term_weights) -> advantages (B*G,)``. Both are pure torch (docs/objectives.md has a config per
variant). Every loss adds ``−entropy_coeff · aggregate(entropy)`` when ``entropy_coeff ≠ 0`` and multiplies
each token's loss by the rollout-correction weights when given.

Deviations, each described in its class: the ±20 log-ratio clamp of all losses; GSPO's log sequence ratio
clamped to ±20 too (verl: ≤ 10); CISPO with verl's relative bounds; the ``seq-mean-*`` aggregations over
non-empty rows (``radvlm.grpo.aggregate``); per-term normalisation's masking of unavailable rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from radvlm import grpo
from radvlm.grpo import LOG_RATIO_CLAMP, AdvantageScale, AggMode

__all__ = [
    "AdvantageEstimator",
    "CISPOLoss",
    "GRPOLoss",
    "GSPOLoss",
    "GroupNormalization",
    "PerTermNormalization",
    "PolicyLoss",
    "SAPOLoss",
]


# ----------------------------------------------------------------------------------------------------------
# policy losses
# ----------------------------------------------------------------------------------------------------------


class PolicyLoss(ABC):
    """Base of the policy losses: input checks, rollout-correction weights, aggregation, entropy bonus.

    A subclass implements :meth:`token_loss` (per-token loss ``(N, L)`` and its statistics); ``__call__``
    weighs, aggregates with ``agg`` (``radvlm.grpo.aggregate``; the step also aggregates its k3 KL term with
    it) and subtracts ``entropy_coeff · aggregate(entropy)``.
    """

    def __init__(self, agg: AggMode = "token-mean", entropy_coeff: float = 0.0) -> None:
        grpo._check_agg(agg, max_len=1)
        if not (isinstance(entropy_coeff, (int, float)) and entropy_coeff == entropy_coeff):
            raise ValueError(f"{type(self).__name__}: entropy_coeff must be a number, got {entropy_coeff!r}")
        self.agg = agg
        self.entropy_coeff = float(entropy_coeff)

    @property
    def needs_entropy(self) -> bool:
        """Whether a call needs ``entropy`` with its gradient (``entropy_coeff ≠ 0``)."""
        return self.entropy_coeff != 0.0

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"

    @abstractmethod
    def token_loss(self, logp: Tensor, old_logp: Tensor, adv: Tensor, m: Tensor,
                   log_ratio: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-token loss ``(N, L)`` and detached statistics; ``adv (N, 1)``, ``m (N, L)`` bool, ``log_ratio``
        the clamped ``logp − old_logp`` (0 off the mask); all in at least float32."""

    def __call__(
        self,
        logp: Tensor,
        old_logp: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        max_len: int | None = None,
        denominator: Tensor | float | None = None,
        token_weights: Tensor | None = None,
        entropy: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, stats)``: ``loss`` 0-d with gradient; ``stats`` detached 0-d means over the selected tokens
        (0 where there are none), always ``ratio_mean`` and ``approx_kl`` (k3 of KL(π_old ‖ π_θ): mean of
        r − 1 − log r), plus the class's own.

        Args:
            logp: ``(N, L)`` log π_θ of the sampled tokens (carries the gradient).
            old_logp: ``(N, L)`` log π_old (detached here).
            advantages: ``(N,)`` one finite advantage per rollout (detached here).
            mask: ``(N, L)`` 0/1, 1 on response tokens; rows or all of it may be 0 (loss exactly 0).
            max_len, denominator: see ``radvlm.grpo.aggregate`` (the constant budget of
                ``seq-mean-token-sum-norm``; a mini-batch's denominator for each micro-batch).
            token_weights: ``(N, L)`` detached weights of each token's loss (``radvlm.rollout_correction``).
            entropy: ``(N, L)`` per-token entropy with its gradient; required when ``entropy_coeff ≠ 0``.
        """
        grpo._check_2d(logp, "logp")
        grpo._check_2d(old_logp, "old_logp")
        if old_logp.shape != logp.shape:
            raise ValueError(f"old_logp shape {tuple(old_logp.shape)} does not match logp shape {tuple(logp.shape)}")
        if not isinstance(advantages, Tensor):
            raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
        if advantages.shape != logp.shape[:1]:
            raise ValueError(f"advantages must have shape (N,) = ({logp.shape[0]},) (one per row of logp), "
                             f"got {tuple(advantages.shape)}")
        if not bool(torch.isfinite(advantages).all()):
            raise ValueError("advantages contain NaN or inf; the estimators give 0 for unavailable rewards")
        grpo._check_agg(self.agg, max_len)
        m = grpo._bool_mask(mask, logp.shape)  # (N, L)
        dtype = torch.promote_types(logp.dtype, torch.float32)  # bf16 ratios would blur the clip boundaries
        logp, old_logp = logp.to(dtype), old_logp.detach().to(dtype)  # (N, L), (N, L)
        adv = advantages.detach().to(dtype).unsqueeze(1)  # (N, 1)
        log_ratio = torch.where(m, logp - old_logp, torch.zeros_like(logp))  # (N, L) padding → 0
        log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (N, L)
        loss_tok, stats = self.token_loss(torch.where(m, logp, torch.zeros_like(logp)), old_logp, adv, m, log_ratio)
        if token_weights is not None:  # importance weights π_old/π_rollout of an engine other than the trainer
            loss_tok = loss_tok * token_weights.detach().to(dtype)  # (N, L)
        agg = {"agg": self.agg, "max_len": max_len, "denominator": denominator}
        loss = grpo.aggregate(loss_tok, m, **agg)  # ()
        if self.needs_entropy:
            if entropy is None:
                raise ValueError(f"{type(self).__name__}(entropy_coeff={self.entropy_coeff}) needs the per-token "
                                 f"entropy (N, L) with its gradient: token_logprobs(return_entropy=True, "
                                 f"entropy_grad=True)")
            bonus = grpo.aggregate(entropy.to(dtype), m, **agg)  # () aggregated like the loss
            loss = loss - self.entropy_coeff * bonus
            stats["entropy_bonus"] = bonus.detach()
        with torch.no_grad():
            ratio = torch.exp(log_ratio)  # (N, L)
            stats["ratio_mean"] = grpo.masked_mean(ratio, m)  # ()
            stats["approx_kl"] = grpo.masked_mean(ratio - 1.0 - log_ratio, m)  # ()
        return loss, {k: v.detach() for k, v in stats.items()}


def _check_eps(name: str, eps_low: float, eps_high: float) -> None:
    if not 0.0 <= eps_low < 1.0:
        raise ValueError(f"{name}: eps_low must be in [0, 1), got {eps_low}")
    if not eps_high >= 0.0:
        raise ValueError(f"{name}: eps_high must be >= 0, got {eps_high}")


def _clipped(ratio: Tensor, adv: Tensor, m: Tensor, eps_low: float, eps_high: float,
             dual_clip: float | None) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO pessimistic bound with an optional dual clip: ``ratio (N, L)``, ``adv (N, 1)`` → ``(N, L)``."""
    loss_unclipped = -adv * ratio  # (N, L)
    loss_clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)  # (N, L)
    loss_tok = torch.maximum(loss_unclipped, loss_clipped)  # (N, L)
    negative = (adv < 0).expand_as(loss_tok)  # (N, L)
    if dual_clip is not None:
        loss_cap = -adv * dual_clip  # (N, 1) > 0 where A < 0
        dual_active = negative & (loss_tok > loss_cap)  # (N, L)
        loss_tok = torch.where(negative, torch.minimum(loss_tok, loss_cap), loss_tok)  # (N, L)
    else:
        dual_active = torch.zeros_like(m)  # (N, L)
    with torch.no_grad():
        f = ratio.dtype
        clip_active = loss_clipped > loss_unclipped  # (N, L) the clipped branch wins: zero gradient
        positive = (adv > 0).expand_as(loss_tok)  # (N, L)
        stats = {"clip_frac_low": grpo.masked_mean((clip_active & negative).to(f), m),
                 "clip_frac_high": grpo.masked_mean((clip_active & positive).to(f), m),
                 "clip_frac_dual": grpo.masked_mean(dual_active.to(f), m)}
    return loss_tok, stats


class GRPOLoss(PolicyLoss):
    """The paper's clipped GRPO loss: asymmetric clip, dual clip (docs/paper.md §2, verl ``vanilla``).

    Per token (``r = exp(clamp(logp − old_logp, ±20))``)::

        L_clip = max(−A·r, −A·clamp(r, 1 − eps_low, 1 + eps_high))          paper: 0.20 / 0.28
        L_tok  = min(L_clip, −A·dual_clip) if A < 0 else L_clip               paper: dual_clip 3.0

    aggregated with ``agg`` (paper: ``token-mean``; ``seq-mean-token-sum-norm`` with ``max_len`` is Dr. GRPO's).
    The step adds β·aggregate(k3 KL to the reference) with the same ``agg`` (paper: β = 0.01, no entropy
    bonus). Stats: ``clip_frac_high`` (A > 0, r > 1 + eps_high: gradient cut), ``clip_frac_low`` (A < 0,
    r < 1 − eps_low), ``clip_frac_dual`` (A < 0, loss capped). Deviation (as verl): the ±20 log-ratio clamp.
    ``dual_clip=None`` disables the dual clip.
    """

    def __init__(self, eps_low: float = 0.2, eps_high: float = 0.28, dual_clip: float | None = 3.0,
                 agg: AggMode = "token-mean", entropy_coeff: float = 0.0) -> None:
        super().__init__(agg, entropy_coeff)
        _check_eps("GRPOLoss", eps_low, eps_high)
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"GRPOLoss: dual_clip must be > 1 (or None to disable), got {dual_clip}")
        self.eps_low, self.eps_high = float(eps_low), float(eps_high)
        self.dual_clip = None if dual_clip is None else float(dual_clip)

    def token_loss(self, logp, old_logp, adv, m, log_ratio):
        return _clipped(torch.exp(log_ratio), adv, m, self.eps_low, self.eps_high, self.dual_clip)


class GSPOLoss(PolicyLoss):
    """GSPO (arXiv 2507.18071): the clip acts on one length-normalised ratio per sequence.

    Per row ``i`` with ``|y_i|`` response tokens, in the token form ("GSPO-token") whose value is the
    sequence ratio and whose gradient reaches every token::

        s_i     = exp(Σ_t m·(logp − old_logp) / |y_i|)                      (N, 1)
        s_i,t   = sg[s_i] · exp(logp_t − sg[logp_t])                        (N, L), value s_i
        L_tok   = max(−A·s_i,t, −A·clamp(s_i,t, 1 − eps_low, 1 + eps_high))  paper: 3e-4 / 4e-4

    aggregated ``seq-mean-token-mean`` by default, so unclipped ∂loss/∂logp_t = −A·s_i / (|y_i|·N'), equal for
    every token of the row (the paper's gradient). Stats: ``clip_frac_high`` / ``clip_frac_low`` as in
    :class:`GRPOLoss` (the fraction of tokens in clipped sequences). Deviations: no dual clip (the paper has
    none); per-token log-ratios clamped to ±20 before the mean and the log sequence ratio to ±20 (verl: ≤ 10).
    """

    def __init__(self, eps_low: float = 3e-4, eps_high: float = 4e-4, agg: AggMode = "seq-mean-token-mean",
                 entropy_coeff: float = 0.0) -> None:
        super().__init__(agg, entropy_coeff)
        _check_eps("GSPOLoss", eps_low, eps_high)
        self.eps_low, self.eps_high = float(eps_low), float(eps_high)

    def token_loss(self, logp, old_logp, adv, m, log_ratio):
        tokens = m.sum(dim=1, keepdim=True).clamp(min=1).to(logp.dtype)  # (N, 1)
        log_seq = (log_ratio.sum(dim=1, keepdim=True) / tokens).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (N, 1)
        log_tok = log_seq.detach() + logp - logp.detach()  # (N, L) value log s_i, gradient 1 per token
        loss_tok, stats = _clipped(torch.exp(log_tok), adv, m, self.eps_low, self.eps_high, None)
        stats.pop("clip_frac_dual")
        return loss_tok, stats


class CISPOLoss(PolicyLoss):
    """CISPO (MiniMax-M1, arXiv 2506.13585): the importance weight is clipped and detached, never the gradient.

    Per token (``r = exp(clamp(logp − old_logp, ±20))``)::

        L_tok = −sg[clamp(r, 1 − eps_low, 1 + eps_high)] · A · logp           ∂L_tok/∂logp = −clamp(r)·A

    aggregated ``token-mean`` (the paper's 1/Σ|o_i|). Every token keeps a gradient, clipped ones included.
    The bounds are verl's relative ones (1 − eps_low, 1 + eps_high); TRL's ``epsilon_high`` for CISPO is an
    absolute cap on r and EasyR1 clamps log r. The paper sets no lower bound (``eps_low=1``: r ≥ 0, the
    default) and tunes the upper one without publishing it: the default 0.28 is the GRPO upper clip. The loss
    value depends on the level of logp (only its gradient means anything); stats: ``clip_frac_high``
    (r > 1 + eps_high) and ``clip_frac_low`` (r < 1 − eps_low), whatever the sign of A.
    """

    def __init__(self, eps_low: float = 1.0, eps_high: float = 0.28, agg: AggMode = "token-mean",
                 entropy_coeff: float = 0.0) -> None:
        super().__init__(agg, entropy_coeff)
        if not 0.0 <= eps_low <= 1.0:
            raise ValueError(f"CISPOLoss: eps_low must be in [0, 1] (1: no lower bound), got {eps_low}")
        _check_eps("CISPOLoss", 0.0, eps_high)
        self.eps_low, self.eps_high = float(eps_low), float(eps_high)

    def token_loss(self, logp, old_logp, adv, m, log_ratio):
        ratio = torch.exp(log_ratio)  # (N, L)
        weight = ratio.clamp(1.0 - self.eps_low, 1.0 + self.eps_high).detach()  # (N, L)
        loss_tok = -weight * adv * logp  # (N, L)
        with torch.no_grad():
            f = ratio.dtype
            stats = {"clip_frac_high": grpo.masked_mean((ratio > 1.0 + self.eps_high).to(f), m),
                     "clip_frac_low": grpo.masked_mean((ratio < 1.0 - self.eps_low).to(f), m)}
        return loss_tok, stats


class SAPOLoss(PolicyLoss):
    """SAPO (arXiv 2511.20347): a soft, temperature-controlled gate instead of the hard clip.

    Per token (``r = exp(clamp(logp − old_logp, ±20))``, ``τ = tau_pos`` where A > 0, else ``tau_neg``)::

        f(r)  = σ(τ·(r − 1)) · 4/τ                 f(1) = 2/τ, f'(1) = 1: on-policy gradient as GRPO's
        L_tok = −f(r) · A                          ∂L_tok/∂logp = −A · 4·σ(1 − σ) · r

    aggregated ``seq-mean-token-mean`` by default (the paper's 1/G Σ_i 1/|y_i| Σ_t). The gradient fades
    smoothly as r leaves 1 (faster for larger τ; the paper: τ_neg > τ_pos, negative tokens are damped more).
    Stats: ``gate_mean``, the mean of 4·σ(1 − σ) (the factor on the on-policy gradient, 1 at r = 1).
    Deviation: the ±20 log-ratio clamp (σ is saturated long before).
    """

    def __init__(self, tau_pos: float = 1.0, tau_neg: float = 1.05, agg: AggMode = "seq-mean-token-mean",
                 entropy_coeff: float = 0.0) -> None:
        super().__init__(agg, entropy_coeff)
        if not (tau_pos > 0 and tau_neg > 0):
            raise ValueError(f"SAPOLoss: tau_pos and tau_neg must be > 0, got {tau_pos}, {tau_neg}")
        self.tau_pos, self.tau_neg = float(tau_pos), float(tau_neg)

    def token_loss(self, logp, old_logp, adv, m, log_ratio):
        ratio = torch.exp(log_ratio)  # (N, L)
        tau = torch.where(adv > 0, torch.full_like(adv, self.tau_pos), torch.full_like(adv, self.tau_neg))  # (N, 1)
        gate = torch.sigmoid(tau * (ratio - 1.0))  # (N, L)
        loss_tok = -adv * gate * (4.0 / tau)  # (N, L)
        with torch.no_grad():
            stats = {"gate_mean": grpo.masked_mean(4.0 * gate * (1.0 - gate), m)}
        return loss_tok, stats


# ----------------------------------------------------------------------------------------------------------
# advantage estimators
# ----------------------------------------------------------------------------------------------------------


class AdvantageEstimator(ABC):
    """Base of the advantage estimators: ``(rewards (B*G,), group_size, term_values (B*G, K) | None,
    term_weights (K,) | None) -> advantages (B*G,)`` float32, 0 where unavailable.

    ``rewards`` is the weighted total (NaN = unavailable); ``term_values`` the signed value of each reward
    term (``sign · value``, NaN where the term does not score the row or failed) and ``term_weights`` their
    weights, for estimators that look at the terms (:class:`PerTermNormalization`)."""

    uses_terms = False

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"

    @abstractmethod
    def __call__(self, rewards: Tensor, group_size: int, term_values: Tensor | None = None,
                 term_weights: Tensor | None = None) -> Tensor:
        """Advantages ``(N,)`` float32 from the total rewards ``(N,)`` (and each term's values and weights)."""


class GroupNormalization(AdvantageEstimator):
    """GRPO's group advantage (``radvlm.grpo.group_advantages``): ``scale="group"`` (paper)
    (r − mean_g)/(std_g + eps); ``"batch"``: the batch's std; ``"none"``: Dr. GRPO's r − mean_g."""

    def __init__(self, scale: AdvantageScale = "group", eps: float = 1e-6) -> None:
        if scale not in grpo.ADVANTAGE_SCALES:
            raise ValueError(f"GroupNormalization: scale must be one of {grpo.ADVANTAGE_SCALES}, got {scale!r}")
        if not eps >= 0:
            raise ValueError(f"GroupNormalization: eps must be >= 0, got {eps}")
        self.scale, self.eps = scale, float(eps)

    def __call__(self, rewards, group_size, term_values=None, term_weights=None):
        return grpo.group_advantages(rewards, group_size, scale=self.scale, eps=self.eps).float()  # (B*G,)


class PerTermNormalization(AdvantageEstimator):
    """Per-term normalisation (GDPO, arXiv 2601.05242; TRL ``normalize_then_sum``): each term is z-scored
    in its group, the weighted z-scores are summed, and the sum is z-scored over the batch::

        z_k   = (v_k − mean_g v_k) / (std_g v_k + eps)        per term k, per group, over available rows
        S     = Σ_k w_k · z_k                                  terms that do not score a row add 0
        A     = (S − mean_batch S) / (std_batch S + eps)       over the rows with an available reward

    so a term of large scale (RadCliQ's, a box count) no longer drowns a small one (soft-F1). Stds are
    unbiased. Unavailable rows (NaN total: a term failed) are left out of every term's group statistics
    and of the batch's, and get 0, as in :class:`GroupNormalization`; so do groups with < 2 available rows.
    Deviations: ``eps`` 1e-6 as GRPO's (TRL: 1e-4); the NaN masking; under several processes the batch is
    this process's batch (as ``GroupNormalization(scale="batch")``), not the global one.
    """

    uses_terms = True

    def __init__(self, eps: float = 1e-6) -> None:
        if not eps >= 0:
            raise ValueError(f"PerTermNormalization: eps must be >= 0, got {eps}")
        self.eps = float(eps)

    def __call__(self, rewards, group_size, term_values=None, term_weights=None):
        if term_values is None or term_weights is None:
            raise ValueError("PerTermNormalization needs term_values (B*G, K) and term_weights (K,)")
        n = rewards.numel()
        if term_values.dim() != 2 or term_values.shape[0] != n or term_weights.shape != term_values.shape[1:]:
            raise ValueError(f"PerTermNormalization: term_values must be (B*G, K) = ({n}, K) and term_weights "
                             f"(K,), got {tuple(term_values.shape)} and {tuple(term_weights.shape)}")
        grpo._grouped_rewards(rewards, group_size)  # the checks of the total: 1-D, whole groups, no ±inf
        available = ~torch.isnan(rewards.detach().double())  # (B*G,)
        summed = torch.zeros(n, dtype=torch.float64, device=rewards.device)  # (B*G,)
        for k in range(term_values.shape[1]):
            v = term_values[:, k].detach().double()  # (B*G,)
            v = torch.where(available, v, torch.full_like(v, float("nan")))  # unavailable rows out of every term
            z = grpo.group_advantages(v, group_size, scale="group", eps=self.eps)  # (B*G,) 0 where NaN
            summed = summed + float(term_weights[k]) * z
        grouped = available.view(-1, group_size)  # (B, G)
        usable = (grouped & (grouped.sum(dim=1, keepdim=True) >= 2)).reshape(1, -1)  # (1, B*G)
        centred, std, _ = grpo._shifted_group_moments(summed.view(1, -1), usable)  # (1, B*G), (1,)
        adv = torch.where(usable, centred / (std + self.eps), torch.zeros_like(centred))  # (1, B*G)
        return adv.reshape(-1).float()  # (B*G,)

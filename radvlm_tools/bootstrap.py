"""Percentile bootstrap confidence intervals, shared by ``radvlm_tools.evaluate`` (the paper's tables) and
``radvlm_tools.shuffle_control`` (paired own − shuffled differences); below both, so neither imports the other
for it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

NAN = float("nan")


def bootstrap_ci(values: Any, stat_fn: Callable[[np.ndarray], float], n: int = 2000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat_fn(values)``: ``n`` resamples of the rows (axis 0) of ``values`` with
    replacement (``numpy.random.default_rng(seed)``); the ``alpha/2`` and ``1 - alpha/2`` quantiles of the
    finite resampled statistics, ``(nan, nan)`` when there are none or ``values`` is empty."""
    if n < 1:
        raise ValueError(f"bootstrap needs n >= 1 resamples, got {n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    data = np.asarray(values)
    m = data.shape[0] if data.ndim else 0
    if m == 0:
        return NAN, NAN
    rng = np.random.default_rng(seed)
    stats = np.array([stat_fn(data[rng.integers(0, m, size=m)]) for _ in range(n)])  # (n,) one per resample
    finite = stats[np.isfinite(stats)]
    if finite.size == 0:
        return NAN, NAN
    lo, hi = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)

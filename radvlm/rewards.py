"""Rewards of rollouts: reward terms, per-task routing, thinking-aware answers, failure masking.

A GRPO run is configured with a list of ``RewardTerm`` s, each a metric, a weight and the tasks it scores;
:func:`compute_rewards` scores every prompt by the terms of its task and sums the signed, weighted values. A
term that fails or runs past its timeout makes the reward of its rows NaN ("unavailable", DESIGN.md), masked
out of the advantage, and a timed-out call is stopped (:func:`score_with_timeout`). A term whose metric scores
token lengths instead of text (:class:`OverlongPenalty`, DAPO's overlong shaping) gets the completions' lengths.

This file is framework-free (no Lightning); ``lightning_modules/grpo.py`` calls it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

import torch

from radvlm.chat import answer_of, check_think_split
from radvlm.tasks import TASK_ALIASES, canonical_task


class ScoringMetric(Protocol):
    higher_is_better: bool
    worst_value: float

    def score(self, preds: list[str], targets: list[str]) -> torch.Tensor: ...


class RewardTerm:
    """One weighted reward: ``metric`` scores the answers of the prompts whose task is in ``tasks``.

    The metric is any object with ``score(preds, targets) -> Tensor[N]``, ``higher_is_better`` and
    ``worst_value``, i.e. the classes of ``metrics/``. For thinking prompts the answer is the text after the
    first or the last ``</think>`` (case-insensitive), per term: ``think_split``, by default the metric class's
    ``think_split`` attribute, which follows the authors' reward of that metric (grounding metrics: first;
    RadCliQ and text metrics: last; ``"last"`` for a metric without one). A completion without ``</think>``
    gets the term's ``worst_value`` (RadCliQ: 3 → reward −3, as the authors did; soft-F1: 0). Evaluation splits
    by task the same way (``radvlm.tasks.task_think_split``).

    Args:
        metric: a ``metrics`` class instance (``SoftF1``, ``RadCliQ``, ``GLEU`` …).
        weight: multiplies the signed value.
        tasks: tasks this term scores (``radvlm.tasks`` names or their aliases); ``None`` scores every task.
        name: name in logs (default: the metric's class name in lower case).
        think_split: for thinking completions, score the text after the ``"first"`` or the ``"last"``
            ``</think>`` (case-insensitive); default: the metric's ``think_split`` attribute, else ``"last"``.
    """

    def __init__(self, metric: Any, weight: float = 1.0, tasks: list[str] | None = None,
                 name: str | None = None, think_split: str | None = None) -> None:
        self.metric = metric
        self.weight = float(weight)
        self.tasks = None if tasks is None else [canonical_task(t) for t in tasks]
        self.name = name or type(metric).__name__.lower()
        self.think_split = check_think_split(think_split or getattr(metric, "think_split", "last"))

    def applies(self, task: str | None) -> bool:
        return self.tasks is None or TASK_ALIASES.get(task, task) in self.tasks

    @property
    def sign(self) -> float:
        return 1.0 if getattr(self.metric, "higher_is_better", True) else -1.0

    def __repr__(self) -> str:
        return f"RewardTerm({self.name}, weight={self.weight}, tasks={self.tasks}, think_split={self.think_split})"


class OverlongPenalty:
    """DAPO's overlong reward shaping (arXiv 2503.14476) as the metric of a ``RewardTerm``: a function of the
    completion's length in tokens ``L`` (its completion mask: the stop token counts), not of its text::

        0                                   L ≤ max_length − cache_length
        (max_length − cache_length − L) / cache_length       up to −1 at L = max_length
        −1                                  L > max_length

    ``max_length`` is DAPO's L_max (normally the run's ``max_new_tokens``: a truncated completion gets −1),
    ``cache_length`` its L_cache (DAPO: 20 480 and 4 096). The term's ``weight`` scales it; it scores thinking
    completions whether or not ``</think>`` was closed (the length is known either way) and takes no part in
    validation (no ``torchmetrics`` state). Values are float32, never NaN.
    """

    uses_lengths = True  # compute_rewards passes lengths (score_lengths), not texts (score)
    higher_is_better = True
    worst_value = -1.0

    def __init__(self, max_length: int, cache_length: int) -> None:
        for name, value in (("max_length", max_length), ("cache_length", cache_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"OverlongPenalty: {name} must be a positive int, got {value!r}")
        if cache_length > max_length:
            raise ValueError(f"OverlongPenalty: cache_length {cache_length} exceeds max_length {max_length}")
        self.max_length, self.cache_length = max_length, cache_length

    def score_lengths(self, lengths: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """``lengths (N,)`` token counts → ``(N,)`` penalties in [−1, 0] (formula in the class docstring)."""
        n = torch.as_tensor(lengths, dtype=torch.float64).reshape(-1)  # (N,)
        if bool((n < 0).any()) or not bool(torch.isfinite(n).all()):
            raise ValueError(f"OverlongPenalty: lengths must be finite and >= 0, got {n.tolist()[:8]}")
        start = self.max_length - self.cache_length  # no penalty up to here
        penalty = ((start - n) / self.cache_length).clamp(min=-1.0, max=0.0)  # (N,) linear, then −1
        return penalty.to(torch.float32)

    def __repr__(self) -> str:
        return f"OverlongPenalty(max_length={self.max_length}, cache_length={self.cache_length})"


@dataclass
class RewardResult:
    total: torch.Tensor  # (N,) NaN where unavailable
    values: dict[str, torch.Tensor]  # term name → (N,) raw metric value, NaN where not applicable/failed
    failed: dict[str, int]  # term name → rows that could not be scored (exception/timeout/NaN)
    closed: torch.Tensor  # (N,) bool: thinking block closed (True for non-thinking prompts)
    seconds: dict[str, float] = field(default_factory=dict)  # term name → time spent scoring

    @property
    def unavailable(self) -> torch.Tensor:  # (N,) bool
        return torch.isnan(self.total)


class RewardError(RuntimeError):
    """A metric could not be computed (raised inside ``score_with_timeout``, turned into NaN)."""


#: thread attribute holding a scoring thread's cancellation event: ``metrics.base.CANCEL_ATTR`` (the same name;
#: the core does not import ``metrics``), polled by the metrics' ``check_cancelled`` between batches
CANCEL_ATTR = "cancel_event"
#: at most this many timed-out calls of metrics that ignore cancellation may still run (a safety net: one per
#: metric object is the rule, so a run's reward terms bound it already); then calls are refused
MAX_ABANDONED = 8
#: after the deadline, wait at most min(timeout, this) seconds for a cooperative metric to stop
CANCEL_GRACE_S = 5.0
_abandoned: list[tuple[threading.Thread, int]] = []  # (thread, id(metric)) of timed-out calls still running
_abandoned_lock = threading.Lock()


def score_with_timeout(metric: ScoringMetric, preds: list[str], targets: list[str],
                       timeout: float | None) -> torch.Tensor:
    """``metric.score`` with a wall-clock limit; raises ``RewardError`` on timeout or failure.

    With a ``timeout`` the call runs in a new thread whose cancellation event (``CANCEL_ATTR``) is set at the
    deadline; the thread is then given ``min(timeout, CANCEL_GRACE_S)`` s to stop at the metric's next
    cancellation check, so nothing of a cooperative metric keeps running once this raises. A thread still
    alive after that is abandoned and counted: while one of the same metric object is alive (its caches are
    not made for two threads), or ``MAX_ABANDONED`` of any, calls raise ``RewardError`` without starting a
    thread, so repeated timeouts never add threads beyond one per metric object.

    The metrics of ``metrics/`` check the cancellation event between batches and stop (their per-sample
    inputs are capped in tokens, so a batch is bounded). A metric that never checks runs on to its end,
    abandoned; while it runs, further calls are refused (NaN in ``compute_rewards``)."""
    if timeout is None:
        return metric.score(preds, targets)
    name = type(metric).__name__
    with _abandoned_lock:
        _abandoned[:] = [(t, m) for t, m in _abandoned if t.is_alive()]
        if any(m == id(metric) for _, m in _abandoned):
            raise RewardError(f"{name}: its previous call timed out and is still running")
        if len(_abandoned) >= MAX_ABANDONED:
            raise RewardError(f"{len(_abandoned)} timed-out reward calls are still running; {name} not started")
    outcome: dict[str, Any] = {}
    # a new thread starts on CUDA device 0: give it the caller's (a DDP rank's own GPU) for "cuda" models
    cuda_device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def run() -> None:
        try:
            if cuda_device is not None:
                torch.cuda.set_device(cuda_device)
            outcome["value"] = metric.score(preds, targets)
        except BaseException as exc:  # noqa: BLE001  (handed to the caller below; cancellation included)
            outcome["error"] = exc

    worker = threading.Thread(target=run, name=f"reward-{name}", daemon=True)
    setattr(worker, CANCEL_ATTR, threading.Event())
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        getattr(worker, CANCEL_ATTR).set()
        worker.join(min(timeout, CANCEL_GRACE_S))
        if worker.is_alive():
            with _abandoned_lock:
                _abandoned.append((worker, id(metric)))
        raise RewardError(f"{name} took longer than {timeout}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def abandoned_reward_calls() -> int:
    """Timed-out reward calls still running (metrics that ignore cancellation)."""
    with _abandoned_lock:
        return sum(t.is_alive() for t, _ in _abandoned)


@contextlib.contextmanager
def float32_default() -> Iterator[None]:
    """Float32 as torch's (process-global) default dtype inside the block, restored after."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def compute_rewards(
    terms: Sequence[RewardTerm],
    completions: Sequence[str],
    targets: Sequence[str],
    tasks: Sequence[str | None],
    thinking: Sequence[bool],
    timeout: float | None = None,
    lengths: Sequence[int] | torch.Tensor | None = None,
) -> RewardResult:
    """Rewards of ``N`` completions. ``targets``/``tasks``/``thinking`` (and ``lengths``, the completions' token
    counts, needed by terms whose metric ``uses_lengths``: :class:`OverlongPenalty`) are per row.

    Every prompt is scored by the terms of its task and the reward is the weighted sum of the signed values
    (``value`` if higher is better, else ``−value``)::

        reward_i = Σ_terms w · sign · value_term(answer_i, reference_i)       over the terms of task_i

    For thinking prompts the answer is cut as each ``RewardTerm`` says. A term that raises or exceeds
    ``timeout`` seconds (:func:`score_with_timeout`) yields NaN for the rows it had to score: the reward of
    those rows is NaN ("unavailable", DESIGN.md), masked out of the advantage by ``radvlm.grpo``, and counted
    in ``failed``. A prompt whose task no term scores is a configuration error and raises.

    Every tensor of the result is float32 (``closed`` bool), whatever the default dtype of the caller: under
    ``bf16-true`` training the default dtype is bfloat16 (8 bits of mantissa), so every tensor here names its
    dtype and the scoring runs with a float32 default (:func:`float32_default`), which the metrics' own float32
    guard then leaves untouched."""
    with float32_default():
        return _compute_rewards(terms, completions, targets, tasks, thinking, timeout, lengths)


def _compute_rewards(terms, completions, targets, tasks, thinking, timeout, lengths=None) -> RewardResult:
    n = len(completions)
    if not (len(targets) == len(tasks) == len(thinking) == n):
        raise ValueError("completions, targets, tasks and thinking must have the same length")
    if lengths is not None and len(lengths) != n:
        raise ValueError(f"lengths has {len(lengths)} values for {n} completions")
    answers: dict[str, list[str]] = {}  # think split → (N,) answers
    closed: list[bool] = [True] * n  # closed or not is the same for either split
    for split in sorted({term.think_split for term in terms}):
        parts = [answer_of(c, t, split) for c, t in zip(completions, thinking)]
        answers[split], closed = [a for a, _ in parts], [c for _, c in parts]
    closed_t = torch.tensor(closed, dtype=torch.bool)  # (N,)
    total = torch.zeros(n, dtype=torch.float32)  # (N,)
    covered = torch.zeros(n, dtype=torch.bool)  # (N,)
    values: dict[str, torch.Tensor] = {}
    failed: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for term in terms:
        rows = [i for i in range(n) if term.applies(tasks[i])]
        value = torch.full((n,), float("nan"), dtype=torch.float32)  # (N,)
        if not rows:
            values[term.name] = value
            continue
        start = time.perf_counter()
        if getattr(term.metric, "uses_lengths", False):  # a function of the token count: every row, closed or not
            if lengths is None:
                raise ValueError(f"reward term {term.name!r} scores token lengths: compute_rewards needs lengths=")
            value[rows] = term.metric.score_lengths([int(lengths[i]) for i in rows])
            scored = []
        else:
            scored = [i for i in rows if closed[i]]
            for i in rows:
                if not closed[i]:
                    value[i] = float(term.metric.worst_value)
        if scored:
            try:
                out = score_with_timeout(term.metric, [answers[term.think_split][i] for i in scored],
                                         [targets[i] for i in scored], timeout)
                out = torch.as_tensor(out, dtype=torch.float32).reshape(-1).cpu()
                if out.numel() != len(scored):
                    raise RewardError(f"{term.name} returned {out.numel()} values for {len(scored)} samples")
            except Exception:  # any failure of a reward is "unavailable", never a low score
                out = torch.full((len(scored),), float("nan"), dtype=torch.float32)
            value[scored] = out
        seconds[term.name] = time.perf_counter() - start
        failed[term.name] = int(torch.isnan(value[rows]).sum())
        values[term.name] = value
        total[rows] = total[rows] + term.weight * term.sign * value[rows]
        covered[rows] = True
    if not bool(covered.all()):
        missing = sorted({str(tasks[i]) for i in range(n) if not covered[i]})
        raise ValueError(f"no reward term scores task(s) {missing}; add a RewardTerm with these tasks")
    return RewardResult(total=total, values=values, failed=failed, closed=closed_t, seconds=seconds)

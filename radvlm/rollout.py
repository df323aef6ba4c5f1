"""Rollouts and their rewards: reward terms, per-task routing, thinking-aware answers, failure masking.

A GRPO run is configured with a list of ``RewardTerm`` s, each a metric (any object with
``score(preds, targets) -> Tensor[N]``, ``higher_is_better`` and ``worst_value``, i.e. the classes of
``metrics/``), a weight and the tasks it scores. Every prompt is scored by the terms of its task and the
reward is the weighted sum of the signed values (``value`` if higher is better, else ``−value``)::

    reward_i = Σ_terms w · sign · value_term(answer_i, reference_i)       over the terms of task_i

- For thinking prompts the answer is the text after the first or the last ``</think>`` (case-insensitive),
  per term: ``RewardTerm(think_split=...)``, by default the metric class's ``think_split`` attribute, which
  follows the authors' reward of that metric (grounding metrics: first; RadCliQ and text metrics: last;
  ``"last"`` for a metric without one). A completion without ``</think>`` gets the term's ``worst_value``
  (RadCliQ: 3 → reward −3, as the authors did; soft-F1: 0). Evaluation splits by task the same way
  (``radvlm.tasks.task_think_split``).
- A term that raises or exceeds ``timeout`` seconds yields NaN for the rows it had to score: the reward of
  those rows is NaN ("unavailable", DESIGN.md), masked out of the advantage by ``radvlm.grpo``, and counted.
- A prompt whose task no term scores is a configuration error and raises.
- Rewards are float32 whatever the caller's default dtype: under ``bf16-true`` training the default dtype is
  bfloat16 (8 bits of mantissa), so every tensor here names its dtype and the scoring runs with a float32
  default (:func:`float32_default`), which the metrics' own float32 guard then leaves untouched.

This file is framework-free (no Lightning); ``lightning_modules/grpo.py`` calls it.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
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


def score_with_timeout(metric: ScoringMetric, preds: list[str], targets: list[str],
                       timeout: float | None) -> torch.Tensor:
    """``metric.score`` with a wall-clock limit; raises ``RewardError`` on timeout or failure."""
    if timeout is None:
        return metric.score(preds, targets)
    pool = futures.ThreadPoolExecutor(max_workers=1)
    job = pool.submit(metric.score, preds, targets)
    try:
        return job.result(timeout=timeout)
    except futures.TimeoutError:
        raise RewardError(f"{type(metric).__name__} took longer than {timeout}s") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


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
) -> RewardResult:
    """Rewards of ``N`` completions (see module docstring). ``targets``/``tasks``/``thinking`` are per row.

    Every tensor of the result is float32 (``closed`` bool), whatever the default dtype of the caller."""
    with float32_default():
        return _compute_rewards(terms, completions, targets, tasks, thinking, timeout)


def _compute_rewards(terms, completions, targets, tasks, thinking, timeout) -> RewardResult:
    n = len(completions)
    if not (len(targets) == len(tasks) == len(thinking) == n):
        raise ValueError("completions, targets, tasks and thinking must have the same length")
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
        scored = [i for i in rows if closed[i]]
        for i in rows:
            if not closed[i]:
                value[i] = float(term.metric.worst_value)
        start = time.perf_counter()
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


def build_rollout_batch(prompt_inputs: dict[str, Any], completion_ids: torch.Tensor,
                        completion_mask: torch.Tensor) -> dict[str, Any]:
    """Prompt inputs (already repeated G times, left-padded) + completions → a model batch (N, P+C)."""
    batch = dict(prompt_inputs)
    batch["input_ids"] = torch.cat([prompt_inputs["input_ids"], completion_ids], dim=1)  # (N, P+C)
    batch["attention_mask"] = torch.cat([prompt_inputs["attention_mask"], completion_mask], dim=1)  # (N, P+C)
    zeros = torch.zeros_like(completion_mask, dtype=prompt_inputs["mm_token_type_ids"].dtype)  # (N, C)
    batch["mm_token_type_ids"] = torch.cat([prompt_inputs["mm_token_type_ids"], zeros], dim=1)  # (N, P+C)
    return batch


def select_rows(batch: dict[str, Any], rows: Sequence[int]) -> dict[str, Any]:
    """Rows ``rows`` of a rollout batch (one image per row)."""
    idx = torch.as_tensor(list(rows), dtype=torch.long)
    out: dict[str, Any] = {}
    n = batch["input_ids"].shape[0]
    for key, value in batch.items():
        if key in ("pixel_values", "image_grid_thw"):
            continue
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            out[key] = value[idx]
    if batch.get("pixel_values") is not None:
        grid = batch["image_grid_thw"]  # (N, 3), one image per row
        blocks = torch.split(batch["pixel_values"], grid.prod(-1).tolist())
        out["pixel_values"] = torch.cat([blocks[i] for i in idx.tolist()])  # (patches, D)
        out["image_grid_thw"] = grid[idx]
    return out

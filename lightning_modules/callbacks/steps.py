"""Where a run stands, in training batches: the step axis of every TensorBoard point (``log_step``), the batches
finished (``batches_done``), the run's plan (``training_plan``: total batches and epochs, also after a resume)
and durations as clock times (``clock``). Used by the callbacks and by ``lightning_modules.common``.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L


def log_step(trainer: L.Trainer) -> int:
    """The x of every TensorBoard point of a run: Lightning's logging step, the number of training batches
    stepped so far (what ``self.log`` uses; GRPO: rollout batches), not ``global_step`` (optimizer steps).

    One step axis per run: Lightning's own logging step (``fit_loop.epoch_loop._batches_that_stepped``) is the
    index of the training batch (GRPO: of the rollout batch), 0-based; a validation after batch i is written at
    i, the ``ValidateAtStart`` one at 0. It is not the optimizer step (``global_step``), which advances
    ``ppo_epochs`` × mini-batches times per GRPO rollout batch.
    """
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))


def clock(seconds: float) -> str:
    """``1:05:03`` / ``5:03`` for a duration; ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def batches_done(trainer: L.Trainer, pl_module: L.LightningModule, after_batch: bool = False) -> int:
    """Training batches finished in the run: the module's checkpointed ``batches_trained`` when it has one
    (``PolicyModule``; right also at ``on_train_start`` after a resume), else Lightning's logging step (which
    counts a batch only after ``on_train_batch_end``: ``after_batch`` adds it)."""
    n = getattr(pl_module, "batches_trained", None)
    if isinstance(n, int):
        return n
    return log_step(trainer) + int(after_batch)


def training_plan(trainer: L.Trainer, done: int, steps_per_batch: float, after_batch: bool = False) -> dict[str, Any]:
    """Where a run stands in training batches: ``done``, ``total`` (None when unbounded), ``epoch`` (1-based: of
    the batch just finished with ``after_batch``, else of the next one) and ``epochs`` (None when unknown).
    ``total`` is the tighter of ``max_steps`` (optimizer steps, converted with ``steps_per_batch``) and
    ``max_epochs`` × batches per epoch; it holds after a resume because it is computed from the restored
    counters."""
    per_epoch = trainer.num_training_batches
    per_epoch = int(per_epoch) if per_epoch and math.isfinite(per_epoch) else None
    totals = []
    if trainer.max_steps is not None and trainer.max_steps > 0:
        remaining = max(trainer.max_steps - trainer.global_step, 0)
        totals.append(done + math.ceil(remaining / max(steps_per_batch, 1e-9) - 1e-9))
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and per_epoch:
        totals.append(int(trainer.max_epochs * per_epoch))
    total = min(totals) if totals else None
    epochs = math.ceil(total / per_epoch) if total and per_epoch else None
    if per_epoch:
        epoch = max(math.ceil(done / per_epoch), 1) if after_batch else min(done // per_epoch + 1, epochs or math.inf)
    else:
        epoch = trainer.current_epoch + 1
    return {"done": done, "total": total, "epoch": int(epoch), "epochs": epochs}

"""``RunProgress``: progress of a whole run, not of an epoch, that reads right in a terminal (a tqdm bar) and in
a log file (plain lines); the numbers come from ``lightning_modules.callbacks.steps``.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

from lightning_modules.callbacks.steps import batches_done, clock, training_plan


class RunProgress(ProgressBar):
    """Progress of a whole run, not of an epoch: a tqdm bar on a terminal, else plain lines.

    Plain log lines come every ``every_n_seconds`` (and after each validation) when stdout is not a terminal
    (files, ``make demo | tee``, cluster jobs). The total of training batches is derived from ``max_steps`` and
    the optimizer steps per batch, also after a resume.

    A plain line::

        [GRPO] batch 20/60 (33%) | epoch 1/1 | step 40 | train/reward_mean 0.412 | 0.45 it/s | elapsed 0:44 | ETA 1:29

    ``batch`` counts training batches (GRPO: rollout batches) over the whole run, ``epoch`` passes over the
    training data (of how many the run makes), ``step`` the optimizer step (``global_step``), ``it/s`` training
    batches per second in this process since its first batch (validation included), ``ETA`` the remaining
    batches at that rate. The optimizer steps per batch (to turn ``max_steps`` into batches) are measured once
    the run has made some, before that taken from the module's ``optimizer_steps_per_batch`` (default 1).
    """

    def __init__(self, every_n_seconds: float = 30.0, plain: bool | None = None,
                 metrics: list[str] | None = None) -> None:
        """
        Args:
            every_n_seconds: plain mode: at most one training line per this many seconds (the first and the last
                batch and each validation always print a line).
            plain: force plain lines (True) or the bar (False); ``None``: plain when stdout is not a terminal.
            metrics: logged values shown with each line (``name``, else ``name_step``, when logged).
        """
        super().__init__()
        if every_n_seconds < 0:
            raise ValueError(f"every_n_seconds must be >= 0, got {every_n_seconds}")
        self.every_n_seconds = every_n_seconds
        self.plain = plain
        self.metrics = list(metrics) if metrics is not None else ["train/loss", "train/reward_mean"]
        self._enabled = True
        self._bar = None
        self._t0: float | None = None  # first training batch of this process
        self._origin = (0, 0)  # (batches, global_step) at this process's start
        self._last_line = -math.inf
        self._eval_start = 0.0
        self._done = 0  # training batches finished (as of the last hook)

    # ---------------------------------------------------------------- ProgressBar interface
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_plain(self) -> bool:
        return (not sys.stdout.isatty()) if self.plain is None else bool(self.plain)

    def _active(self, trainer: L.Trainer) -> bool:
        return self._enabled and trainer.is_global_zero

    # ---------------------------------------------------------------- numbers
    def steps_per_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, done: int) -> float:
        batches, steps = done - self._origin[0], trainer.global_step - self._origin[1]
        if batches > 0 and steps > 0:
            return steps / batches
        hint = getattr(pl_module, "optimizer_steps_per_batch", None)
        return float(hint) if isinstance(hint, (int, float)) and hint > 0 else 1.0

    def plan(self, trainer: L.Trainer, pl_module: L.LightningModule, after_batch: bool = False) -> dict[str, Any]:
        done = batches_done(trainer, pl_module, after_batch)
        plan = training_plan(trainer, done, self.steps_per_batch(trainer, pl_module, done), after_batch)
        elapsed = time.monotonic() - self._t0 if self._t0 is not None else 0.0
        made = done - self._origin[0]
        rate = made / elapsed if made > 0 and elapsed > 0 else float("nan")
        left = plan["total"] - done if plan["total"] is not None else float("nan")
        plan.update(rate=rate, elapsed=elapsed, eta=left / rate if rate > 0 else float("nan"))
        return plan

    def values(self, trainer: L.Trainer) -> dict[str, float]:
        found = {}
        metrics = trainer.callback_metrics
        for name in self.metrics:
            for key in (name, f"{name}_step"):
                if key in metrics:
                    found[name] = float(metrics[key])
                    break
        return found

    @staticmethod
    def _name(pl_module: L.LightningModule) -> str:
        return type(pl_module).__name__.removesuffix("Module") or "train"

    @staticmethod
    def _epoch(p: dict[str, Any]) -> str:
        return f"epoch {p['epoch']}/{p['epochs']}" if p["epochs"] else f"epoch {p['epoch']}"

    def line(self, trainer: L.Trainer, pl_module: L.LightningModule, after_batch: bool = True) -> str:
        p = self.plan(trainer, pl_module, after_batch)
        total, done = p["total"], p["done"]
        where = f"batch {done}/{total} ({100 * done / total:.0f}%)" if total else f"batch {done}"
        parts = [f"[{self._name(pl_module)}] {where}", self._epoch(p), f"step {trainer.global_step}"]
        parts += [f"{k} {v:.4g}" for k, v in self.values(trainer).items()]
        parts += [f"{p['rate']:.3g} it/s" if math.isfinite(p["rate"]) else "? it/s",
                  f"elapsed {clock(p['elapsed'])}", f"ETA {clock(p['eta'])}"]
        return " | ".join(parts)

    def _print(self, text: str) -> None:
        print(text, flush=True)

    # ---------------------------------------------------------------- training
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._origin = (batches_done(trainer, pl_module), trainer.global_step)
        self._done = self._origin[0]
        self._t0, self._last_line = None, -math.inf
        if not self._active(trainer):
            return
        p = self.plan(trainer, pl_module)
        if self.is_plain:
            resumed = f", resuming after batch {p['done']} (step {trainer.global_step})" if p["done"] else ""
            self._print(f"[{self._name(pl_module)}] training {p['total'] or '?'} batches{resumed}")
        else:
            from tqdm import tqdm

            self._bar = tqdm(total=p["total"], initial=p["done"], desc=f"{self._name(pl_module)} {self._epoch(p)}",
                             dynamic_ncols=True, file=sys.stdout, smoothing=0, leave=True)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._t0 is None:
            self._t0 = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._done = batches_done(trainer, pl_module, after_batch=True)
        if not self._active(trainer):
            return
        if self._bar is not None:
            p = self.plan(trainer, pl_module, after_batch=True)
            self._bar.total = p["total"]
            self._bar.n = p["done"]
            self._bar.set_description(f"{self._name(pl_module)} {self._epoch(p)}", refresh=False)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in self.values(trainer).items()}, refresh=False)
            self._bar.refresh()
            return
        now = time.monotonic()
        done = batches_done(trainer, pl_module, after_batch=True)
        total = self.plan(trainer, pl_module, after_batch=True)["total"]
        first, last = done - self._origin[0] == 1, total is not None and done >= total
        if first or last or now - self._last_line >= self.every_n_seconds:
            self._last_line = now
            self._print(self.line(trainer, pl_module))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._active(trainer) and self.is_plain:
            elapsed = time.monotonic() - self._t0 if self._t0 is not None else 0.0
            self._print(f"[{self._name(pl_module)}] training done: {batches_done(trainer, pl_module)} batches, "
                        f"step {trainer.global_step}, {clock(elapsed)} in this process")

    # ---------------------------------------------------------------- validation and prediction
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start = time.monotonic()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active(trainer) or trainer.sanity_checking:
            return
        shown = {k: float(v) for k, v in trainer.callback_metrics.items()
                 if k.startswith("val/") and getattr(v, "numel", lambda: 1)() == 1}
        text = " | ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items())[:8])
        where = f"after {self._done} batches" if trainer.state.fn == "fit" else ""
        msg = f"[{self._name(pl_module)}] validation {where} ({clock(time.monotonic() - self._eval_start)})"
        msg = " ".join(msg.split()) + (f": {text}" if text else "")
        if self._bar is not None:
            self._bar.write(msg, file=sys.stdout)
        elif self.is_plain:
            self._print(msg)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = self._last_line = time.monotonic()

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._active(trainer):
            return
        total = self.total_predict_batches_current_dataloader
        done = batch_idx + 1
        now = time.monotonic()
        if now - self._last_line < self.every_n_seconds and done < total:
            return
        self._last_line = now
        elapsed = now - self._t0
        rate = done / elapsed if elapsed > 0 else float("nan")
        eta = (total - done) / rate if rate > 0 and math.isfinite(total) else float("nan")
        total_text = f"/{total}" if math.isfinite(total) else ""
        self._print(f"[predict] batch {done}{total_text} | {rate:.3g} it/s | elapsed {clock(elapsed)} | "
                    f"ETA {clock(eta)}")

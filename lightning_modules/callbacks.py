"""Callbacks: prediction JSONL writer (resumable), box pictures in TensorBoard, reward-hacking monitors,
validation before the first step, and progress that reads right in a terminal and in a log file.

In that order: ``PredictionWriter``, ``BoxPictures``, ``LengthDriftMonitor`` (answer length drift, the paper's
reward-hacking signal), ``ValidateAtStart``, ``RunProgress``. One step axis per run: every TensorBoard point is
written at ``log_step(trainer)``, the training batch (GRPO: rollout batch), not the optimizer step.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

from radvlm.tasks import is_box_task
from radvlm_tools.prediction_files import (
    CHECKPOINT_KEYS,
    IDENTITY_KEYS,
    PredictionFileMismatch,
    header_line,
    model_identity,
    resume_problem,
)


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


def repair_tail(path: str | Path) -> bool:
    """Cut a last line without newline (a write torn by a crash) off the file; True if something was cut."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return False
    data = p.read_bytes()
    if data.endswith(b"\n"):
        return False
    with p.open("r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)
    return True


def read_done_ids(path: str | Path) -> set[str]:
    """Ids already present in a predictions JSONL file (a torn last line from a crash is ignored)."""
    done: set[str] = set()
    p = Path(path)
    if not p.is_file():
        return done
    for line in p.read_text().splitlines():
        try:
            done.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done


def module_identity(trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
    """``model_identity`` of a predict run: the module's class path, its ``policy.name_or_path``, the checkpoint
    it was loaded from (``trainer.ckpt_path``: set only once Lightning has loaded it, after ``setup``) and its
    init arguments (``hparams``) as plain values."""
    from lightning_modules.resume import plain_value

    settings = {k: v for k, v in plain_value(dict(getattr(pl_module, "hparams", {}) or {})).items()
                if not k.startswith("_")}
    policy = getattr(pl_module, "policy_config", None)
    name = getattr(policy, "name_or_path", None)
    cls = type(pl_module)
    return model_identity(f"{cls.__module__}.{cls.__qualname__}", None if name is None else str(name),
                          getattr(trainer, "ckpt_path", None), settings)


class PredictionWriter(BasePredictionWriter):
    """Appends one JSON line per predicted sample to ``output``; with ``resume`` (default) ids already in the
    file are skipped at prediction time, so an interrupted ``main.py predict`` continues where it stopped.

    Lines are appended batch by batch; a rerun skips ids already written (also in the per-rank files
    ``<output>.rankN`` of a multi-GPU run) and first cuts off a line torn by a crash (``repair_tail``), so the
    rerun leaves no duplicates.

    Each file starts with a header line naming the model that writes it (class, ``name_or_path``, checkpoint,
    weight files' stamp, settings fingerprint: ``radvlm_tools.prediction_files.model_identity``); a resume into a
    file whose header names another model or other settings (or none) is refused with
    ``PredictionFileMismatch``, never continued. Each row: id, task, image, prompt, completion, answer (after
    ``</think>``), thinking, think_closed, reference, gt_boxes (the record's, else those of the reference text of a
    box task), gt_boxes_from (record / reference / none), completion_tokens, truncated. Per-sample metric
    values are added by ``python -m radvlm_tools.evaluate``.
    """

    def __init__(self, output: str | None = None, resume: bool = True, default_task: str | None = None) -> None:
        """
        Args:
            output: the JSONL file (its folder is created); None: ``predictions.jsonl`` in the trainer's
                ``default_root_dir``, so that the file follows the run.
            resume: skip ids already in the file (else the file is started afresh).
            default_task: task written for records that have none (RadVLM's test JSON files carry no task).
        """
        super().__init__(write_interval="batch")
        self.output = None if output is None else Path(output)
        self.resume = resume
        self.default_task = default_task
        self.skipped = 0
        self.identity: dict | None = None  # the header of this run's files (set at predict set-up)

    def _rank_files(self) -> list[Path]:
        return sorted(self.output.parent.glob(self.output.name + ".rank*"))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        if self.output is None:
            self.output = Path(trainer.default_root_dir) / "predictions.jsonl"
        self.output.parent.mkdir(parents=True, exist_ok=True)
        files = [self.output, *self._rank_files()]
        if not self.resume:
            for f in files:
                f.unlink(missing_ok=True)
        self.identity = module_identity(trainer, pl_module)
        done: set[str] = set()
        if self.resume:
            self.check_files(tuple(k for k in IDENTITY_KEYS if k not in CHECKPOINT_KEYS))
            for f in files:
                if trainer.is_global_zero:
                    repair_tail(f)
                done |= read_done_ids(f)  # a torn line never parses: the other ranks skip it too
        data = trainer.datamodule
        if done and data is not None and "predict" in getattr(data, "splits", {}):
            before = len(data.splits["predict"])
            data.splits["predict"] = [r for r in data.splits["predict"] if r.id not in done]
            self.skipped = before - len(data.splits["predict"])

    def check_files(self, keys: tuple[str, ...]) -> None:
        """Refuse (``PredictionFileMismatch``) to continue a file of this run whose header differs in ``keys``."""
        files = [self.output, *self._rank_files()]
        problems = [p for p in (resume_problem(f, self.identity, keys) for f in files) if p]
        if problems:
            raise PredictionFileMismatch(
                f"predict resume refused: {problems[0]}; write a new file with --trainer.callbacks.init_args.output "
                f"NEW.jsonl, or start this one afresh (its rows are deleted) with "
                f"--trainer.callbacks.init_args.resume false")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The checkpoint is known now (Lightning loads it after ``setup``): complete the header, and refuse
        before any generation a resume whose files another checkpoint wrote."""
        if self.identity is None:
            return
        self.identity = module_identity(trainer, pl_module)
        if self.resume:
            self.check_files(CHECKPOINT_KEYS)

    def write_on_batch_end(self, trainer, pl_module, prediction: list[dict[str, Any]], batch_indices, batch,
                           batch_idx: int, dataloader_idx: int = 0) -> None:
        if not prediction:
            return
        suffix = "" if trainer.world_size == 1 else f".rank{trainer.global_rank}"
        path = self.output.with_name(self.output.name + suffix) if suffix else self.output
        with path.open("a") as f:
            if self.identity is not None and f.tell() == 0:
                f.write(header_line(self.identity))
            for row in prediction:
                if row.get("task") is None and self.default_task is not None:
                    row = {**row, "task": self.default_task}
                f.write(json.dumps(row) + "\n")
            f.flush()


class BoxPictures(L.Callback):
    """TensorBoard image grid of grounding samples after validation and test.

    The grid shows the ground-truth boxes green, the predicted boxes red, each box labelled with the finding its
    text names (``radvlm_tools.draw.box_labels``), and the prompt phrase (labels and phrase are left out when
    the module's ``log_text_samples`` is off). The samples come through Lightning's ``on_validation_batch_end``
    / ``on_test_batch_end``: a step that returns ``{"samples": [{"image", "answer", "gt_boxes", "prompt",
    "task", "reference"}, ...]}`` (``GRPOModule`` does, for its greedy grounding outputs) has the first
    ``num_images`` box-task samples of the epoch kept by the callback; a module that returns none simply gets
    no pictures.
    """

    def __init__(self, num_images: int = 8, columns: int = 4, size: int = 256, tag: str = "pictures") -> None:
        """
        Args:
            num_images: samples per grid (the first grounding samples of the epoch, the same every time).
            columns: pictures per grid row.
            size: longer side of each picture in pixels.
            tag: TensorBoard tag, logged as ``val/<tag>`` or ``test/<tag>``.
        """
        if num_images < 1 or columns < 1 or size < 16:
            raise ValueError(f"BoxPictures needs num_images >= 1, columns >= 1, size >= 16; got "
                             f"{num_images}, {columns}, {size}")
        self.num_images = num_images
        self.columns = columns
        self.size = size
        self.tag = tag
        self.samples: list[dict[str, Any]] = []  # the epoch's first grounding samples (at most num_images)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.samples = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.samples = []

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self.keep(outputs)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self.keep(outputs)

    def keep(self, outputs: Any) -> None:
        """Add the box-task samples of a step's ``outputs["samples"]`` until ``num_images`` are kept."""
        rows = outputs.get("samples") if isinstance(outputs, dict) else None
        for row in rows or []:
            if len(self.samples) >= self.num_images:
                return
            if is_box_task(row.get("task")):
                self.samples.append(row)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.log_grid(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.log_grid(trainer, pl_module, "test")

    def grid(self, samples: list[dict[str, Any]], with_text: bool):
        """The PIL grid of ``samples`` (None when no sample has a readable image)."""
        from radvlm_tools.draw import image_grid, sample_picture

        pictures = []
        for s in samples[: self.num_images]:
            if not s.get("image") or not Path(s["image"]).is_file():
                continue
            caption = s.get("prompt", "") if with_text else None
            gt = s.get("gt_boxes") or []
            pictures.append(sample_picture(s["image"], s["answer"], gt, caption, self.size,
                                           reference=s.get("reference"), labels=with_text))
        return image_grid(pictures, self.columns) if pictures else None

    def log_grid(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.samples or not trainer.is_global_zero:
            return
        grid = self.grid(self.samples, with_text=bool(getattr(pl_module, "log_text_samples", True)))
        if grid is None:
            return
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if experiment is not None and hasattr(experiment, "add_image"):
                experiment.add_image(f"{stage}/{self.tag}", np.asarray(grid), global_step=log_step(trainer),
                                     dataformats="HWC")


class LengthDriftMonitor(L.Callback):
    """Reward-hacking monitor: answer length at each validation relative to the first one.

    The paper's RadGraph-F1-only reward was hacked by shrinking reports from 207 to 93 characters on
    average; a length ratio far from 1 is the cheapest early signal. Logs ``val/answer_chars_ratio`` and warns
    (once per validation) when it leaves ``[min_ratio, max_ratio]``. Reads ``val/answer_chars_mean``, which
    ``GRPOModule`` logs at validation. The reference length is checkpointed, so a resumed run compares with
    the same start.
    """

    def __init__(self, min_ratio: float = 0.7, max_ratio: float = 1.5) -> None:
        if not 0 < min_ratio < 1 < max_ratio:
            raise ValueError(f"need 0 < min_ratio < 1 < max_ratio, got {min_ratio}, {max_ratio}")
        self.min_ratio, self.max_ratio = min_ratio, max_ratio
        self.reference: float | None = None
        self.last_ratio: float | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get("val/answer_chars_mean")
        if value is None or trainer.sanity_checking:
            return
        chars = float(value)
        if self.reference is None:
            self.reference = chars
        self.last_ratio = chars / self.reference if self.reference > 0 else float("nan")
        for logger in trainer.loggers:
            logger.log_metrics({"val/answer_chars_ratio": self.last_ratio}, step=log_step(trainer))
        if not self.min_ratio <= self.last_ratio <= self.max_ratio:
            import warnings

            warnings.warn(f"answer length changed to {self.last_ratio:.2f}× its first validation value "
                          f"({self.reference:.0f} → {chars:.0f} characters): a possible sign of reward hacking",
                          stacklevel=1)

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference = state_dict.get("reference")


class ValidateAtStart(L.Callback):
    """Run the validation loop once before the first training batch of a fresh run (skipped after a resume and
    when there is no validation data), so every validation curve starts at step 0 with the starting model
    (GRPO: the SFT model)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if log_step(trainer) > 0 or trainer.global_step > 0:
            return
        loop = trainer.fit_loop.epoch_loop.val_loop
        first_loop_iter = trainer._logger_connector._first_loop_iter  # as Lightning's own in-epoch validation
        trainer.validating = True
        try:
            loop.run()
        finally:
            trainer.training = True
            trainer._logger_connector._first_loop_iter = first_loop_iter


def _clock(seconds: float) -> str:
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
                  f"elapsed {_clock(p['elapsed'])}", f"ETA {_clock(p['eta'])}"]
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
                        f"step {trainer.global_step}, {_clock(elapsed)} in this process")

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
        msg = f"[{self._name(pl_module)}] validation {where} ({_clock(time.monotonic() - self._eval_start)})"
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
        self._print(f"[predict] batch {done}{total_text} | {rate:.3g} it/s | elapsed {_clock(elapsed)} | "
                    f"ETA {_clock(eta)}")

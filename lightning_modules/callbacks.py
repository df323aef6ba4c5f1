"""Callbacks: prediction JSONL writer (resumable), box pictures in TensorBoard, reward-hacking monitors.

- ``PredictionWriter``: one JSON line per predicted sample, appended batch by batch; a rerun skips ids
  already written (also in the per-rank files ``<output>.rankN`` of a multi-GPU run) and first cuts off a line
  torn by a crash, so an interrupted ``main.py predict`` continues where it stopped, without duplicates.
- ``BoxPictures``: at the end of validation and test, a TensorBoard image grid of grounding samples with the
  ground-truth boxes green, the predicted boxes red and the prompt phrase (left out when the module's
  ``log_text_samples`` is off). The module collects the samples: at epoch start the callback sets
  ``pl_module._val_pictures = []`` and ``pl_module._val_pictures_cap = num_images``, and the module's
  validation step appends ``{"image", "answer", "gt_boxes", "prompt", "task"}`` of its greedy grounding
  outputs until the cap (``GRPOModule`` does; a module that does not simply gets no pictures).
- ``LengthDriftMonitor``: answer length relative to the first validation, with a warning when it drifts
  (the paper's reward-hacking signal).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter


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


class PredictionWriter(BasePredictionWriter):
    """Appends one JSON line per predicted sample to ``output``; with ``resume`` (default) ids already in the
    file are skipped at prediction time, so an interrupted ``main.py predict`` continues where it stopped.

    Each line: id, task, image, prompt, completion, answer (after ``</think>``), thinking, think_closed,
    reference, gt_boxes, completion_tokens, truncated. Per-sample metric values are added by
    ``python -m radvlm.evaluate``.
    """

    def __init__(self, output: str, resume: bool = True, default_task: str | None = None) -> None:
        """
        Args:
            output: the JSONL file (its folder is created).
            resume: skip ids already in the file (else the file is started afresh).
            default_task: task written for records that have none (RadVLM's test JSON files carry no task).
        """
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self.resume = resume
        self.default_task = default_task
        self.skipped = 0

    def _rank_files(self) -> list[Path]:
        return sorted(self.output.parent.glob(self.output.name + ".rank*"))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        self.output.parent.mkdir(parents=True, exist_ok=True)
        files = [self.output, *self._rank_files()]
        if not self.resume:
            for f in files:
                f.unlink(missing_ok=True)
        done: set[str] = set()
        if self.resume:
            for f in files:
                if trainer.is_global_zero:
                    repair_tail(f)
                done |= read_done_ids(f)  # a torn line never parses: the other ranks skip it too
        data = trainer.datamodule
        if done and data is not None and "predict" in getattr(data, "splits", {}):
            before = len(data.splits["predict"])
            data.splits["predict"] = [r for r in data.splits["predict"] if r.id not in done]
            self.skipped = before - len(data.splits["predict"])

    def write_on_batch_end(self, trainer, pl_module, prediction: list[dict[str, Any]], batch_indices, batch,
                           batch_idx: int, dataloader_idx: int = 0) -> None:
        if not prediction:
            return
        suffix = "" if trainer.world_size == 1 else f".rank{trainer.global_rank}"
        path = self.output.with_name(self.output.name + suffix) if suffix else self.output
        with path.open("a") as f:
            for row in prediction:
                if row.get("task") is None and self.default_task is not None:
                    row = {**row, "task": self.default_task}
                f.write(json.dumps(row) + "\n")
            f.flush()


class BoxPictures(L.Callback):
    """TensorBoard image grid of grounding samples after validation and test (see the module docstring)."""

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

    def _start(self, pl_module: L.LightningModule) -> None:
        pl_module._val_pictures = []
        pl_module._val_pictures_cap = self.num_images

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.log_grid(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.log_grid(trainer, pl_module, "test")

    def grid(self, samples: list[dict[str, Any]], with_text: bool):
        """The PIL grid of ``samples`` (None when no sample has a readable image)."""
        from radvlm.draw import image_grid, sample_picture

        pictures = []
        for s in samples[: self.num_images]:
            if not s.get("image") or not Path(s["image"]).is_file():
                continue
            caption = s.get("prompt", "") if with_text else None
            gt = s.get("gt_boxes") or []
            pictures.append(sample_picture(s["image"], s["answer"], gt, caption, self.size))
        return image_grid(pictures, self.columns) if pictures else None

    def log_grid(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        samples = getattr(pl_module, "_val_pictures", None) or []
        if not samples or not trainer.is_global_zero:
            return
        grid = self.grid(samples, with_text=bool(getattr(pl_module, "log_text_samples", True)))
        if grid is None:
            return
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if experiment is not None and hasattr(experiment, "add_image"):
                experiment.add_image(f"{stage}/{self.tag}", np.asarray(grid), global_step=trainer.global_step,
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
            logger.log_metrics({"val/answer_chars_ratio": self.last_ratio}, step=trainer.global_step)
        if not self.min_ratio <= self.last_ratio <= self.max_ratio:
            import warnings

            warnings.warn(f"answer length changed to {self.last_ratio:.2f}× its first validation value "
                          f"({self.reference:.0f} → {chars:.0f} characters): a possible sign of reward hacking",
                          stacklevel=1)

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reference = state_dict.get("reference")

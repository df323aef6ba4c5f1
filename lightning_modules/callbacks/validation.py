"""Callbacks around validation: box pictures in TensorBoard (``BoxPictures``, after validation and test), the
answer-length drift monitor (``LengthDriftMonitor``, the paper's reward-hacking signal) and a validation before
the first training batch (``ValidateAtStart``). Every point is written at ``log_step(trainer)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

from lightning_modules.callbacks.steps import log_step
from radvlm.tasks import is_box_task


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

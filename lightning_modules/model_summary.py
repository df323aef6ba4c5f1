"""Lightning's model summary without the FLOPs it did not count.

Lightning counts FLOPs only for a module with an ``example_input_array``; radvlm's modules have none (their
inputs are chat batches with images), so every run printed a FLOPs column of zeros and "Total FLOPs: 0", a
measured-looking number that was never measured. ``FlopsFreeSummary`` prints the same table (layers,
parameters, modes, sizes) without them, and keeps them where they were counted; ``replace_default_summary``
puts it in place of the summary Lightning adds by default (``RichModelSummary`` when rich is installed).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary
from lightning.pytorch.callbacks.model_summary import log
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table


class FlopsFreeSummary(ModelSummary):
    """``ModelSummary`` whose table leaves out the FLOPs column and total when no FLOP was counted."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        counted = bool(total_flops)
        data = summary_data if counted else [(name, col) for name, col in summary_data if name != "FLOPs"]
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *data)
        if not counted:
            table = "\n".join(line for line in table.split("\n") if not line.rstrip().endswith("Total Flops"))
        log.info("\n" + table)


def replace_default_summary(trainer: L.Trainer) -> None:
    """Swap the summary callback Lightning added by default (exactly ``ModelSummary`` or ``RichModelSummary``,
    not a user's subclass) for a ``FlopsFreeSummary`` of the same depth."""
    for i, cb in enumerate(trainer.callbacks):
        if type(cb) in (ModelSummary, RichModelSummary):
            trainer.callbacks[i] = FlopsFreeSummary(max_depth=cb._max_depth)

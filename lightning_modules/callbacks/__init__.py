"""Callbacks: prediction JSONL writer (resumable), box pictures in TensorBoard, reward-hacking monitors,
validation before the first step, and progress that reads right in a terminal and in a log file.

In that order: ``PredictionWriter`` (``prediction_writer``), ``BoxPictures``, ``LengthDriftMonitor`` (answer
length drift, the paper's reward-hacking signal), ``ValidateAtStart`` (the three in ``validation``),
``RunProgress`` (``progress``). One step axis per run: every TensorBoard point is written at
``log_step(trainer)`` (``steps``), the training batch (GRPO: rollout batch), not the optimizer step.
"""

# Re-exported so that every callback keeps its class_path ``lightning_modules.callbacks.<Name>``: the one in our
# configs and in users' configs, and the one jsonargparse writes to saved configs (``--print_config``,
# ``config.yaml``), which is the shortest path that imports the class. The helpers keep their old import path.
from lightning_modules.callbacks.prediction_writer import (
    PredictionWriter,
    module_identity,
    read_done_ids,
    repair_tail,
)
from lightning_modules.callbacks.progress import RunProgress
from lightning_modules.callbacks.steps import batches_done, log_step, training_plan
from lightning_modules.callbacks.validation import BoxPictures, LengthDriftMonitor, ValidateAtStart

__all__ = [
    "BoxPictures",
    "LengthDriftMonitor",
    "PredictionWriter",
    "RunProgress",
    "ValidateAtStart",
    "batches_done",
    "log_step",
    "module_identity",
    "read_done_ids",
    "repair_tail",
    "training_plan",
]

"""Callbacks: prediction JSONL writer (resumable), box pictures in TensorBoard, reward-hacking monitors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter


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

    def __init__(self, output: str, resume: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self.resume = resume
        self.skipped = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        self.output.parent.mkdir(parents=True, exist_ok=True)
        if not self.resume and self.output.exists():
            self.output.unlink()
        done = read_done_ids(self.output) if self.resume else set()
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
                f.write(json.dumps(row) + "\n")
            f.flush()

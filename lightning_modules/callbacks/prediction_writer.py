"""``PredictionWriter``: the predictions JSONL writer of ``main.py predict``, resumable, and its helpers: a line
torn by a crash cut off (``repair_tail``), the ids already written (``read_done_ids``) and the identity of the
model that writes the file (``module_identity``, the file's header).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from radvlm_tools.prediction_files import (
    CHECKPOINT_KEYS,
    IDENTITY_KEYS,
    PredictionFileMismatch,
    header_line,
    model_identity,
    resume_problem,
)


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

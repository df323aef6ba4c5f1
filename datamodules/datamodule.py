"""``RadVLMDataModule``: RadVLM JSON/JSONL files (or a phantom folder) → resumable train/val/test loaders.

Records without a ``task`` key take the task their RadVLM id prefix names (``radvlm.tasks``; RadVLM's released
records carry none). Not in the paper: lenient reading with a per-reason report (``bad_records``,
``max_bad_fraction``), an injected collator, and the shuffle control (``shuffle_images``). Details: the class.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
from collections import Counter
from pathlib import Path
from typing import Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from datamodules.collate import Collator, CollatorFactory, SFTCollator
from datamodules.records import (
    BadRecords,
    ImageError,
    LoadReport,
    Record,
    RecordError,
    load_image,
    load_records,
)
from datamodules.shuffle import shuffle_images
from radvlm.tasks import canonical_task, canonical_tasks

log = logging.getLogger(__name__)


class RecordDataset:
    """A list of records as a map-style dataset (items are ``Record`` objects; the collator encodes). An index
    past the end (``EvalShardSampler``'s padding) gives a copy of record ``(i − n) mod n`` marked ``padding``."""

    def __init__(self, records: list[Record]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Record:
        n = len(self.records)
        if i < n:
            return self.records[i]
        return dataclasses.replace(self.records[(i - n) % n], padding=True)


class EvalShardSampler(DistributedSampler):
    """The validation and test shards of several ranks: record order kept, rank ``r`` taking positions
    ``r, r + R, …`` of ``n`` records padded to a multiple of the ``R`` ranks, as Lightning's sampler does, but
    the padding positions are ``n, n + 1, …`` (``RecordDataset`` gives them as ``padding`` copies) instead of
    the first records again. Every rank runs as many batches (generation and the sharded forward are
    collectives), and no record is counted twice in a metric."""

    def __init__(self, dataset: RecordDataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self):
        return iter(range(self.rank, self.total_size, self.num_replicas))


def apply_task_weights(records: list[Record], weights: dict[str, float], seed: int = 0) -> list[Record]:
    """Repeat each task's records ``floor(w)`` times plus a seeded ``w − floor(w)`` fraction of them."""
    rng = random.Random(seed)
    out: list[Record] = []
    by_task: dict[str | None, list[Record]] = {}
    for r in records:
        by_task.setdefault(r.task, []).append(r)
    for task, group in by_task.items():
        w = float(weights.get(task, 1.0)) if task is not None else 1.0
        if w < 0:
            raise ValueError(f"task weight for {task!r} must be ≥ 0, got {w}")
        whole, frac = int(math.floor(w)), w - math.floor(w)
        out.extend(group * whole)
        if frac > 0:
            out.extend(rng.sample(group, int(round(frac * len(group)))))
    return out


class RadVLMDataModule(L.LightningDataModule):
    """Sources, task filter and mixing, bad records and images, loaders and the collator.

    - Sources: lists of JSON/JSONL files per split, or ``phantom_dir`` (the folder written by
      ``datamodules.phantom``: ``train.json``/``val.json``/``test.json``, ``*_thinking.json`` with ``thinking``).
    - Tasks: a record's ``task`` key, else the task its RadVLM id prefix names (``radvlm.tasks``; RadVLM's
      released records carry no task key). Records whose task is unknown are counted per split
      (``self.untasked``) and reported at setup with example ids, never dropped silently.
    - Task filter and mixing: ``tasks`` keeps only those tasks; ``task_weights`` are per-task repeat factors
      applied to the training set once at setup (RadVLM's own mixture is written this way: VinDr ×3, MS-CXR ×3 …;
      2.0 repeats every record twice, 0.5 keeps a seeded half). Both take canonical task names or aliases. A
      filter that keeps no record of a split that has records is an error naming the tasks found.
    - Bad records: with ``bad_records="error"`` (default) a malformed record (JSON line, roles, image tag, boxes,
      id ...) raises ``RecordError`` naming file, index and id (``datamodules.records``); with ``"skip"`` it is
      left out. ``normalize_conversations`` (default False, strict; recommended True for RadVLM's released data)
      first applies LLaVA's preprocessing: a leading gpt turn and a trailing human turn are dropped and counted.
    - Images: with ``check_images`` every image of the kept records is decoded at setup; a bad one (missing,
      undecodable or truncated, side < 28 px, aspect ratio > 200) raises ``RecordError`` naming file, index, id
      and path, or is skipped with ``bad_records="skip"`` or ``max_bad_fraction`` > 0 (the latter as before
      ``bad_records`` existed). Without ``check_images`` a bad image surfaces when its batch is collated, as an
      ``ImageError`` naming the path and the record.
    - One account per split (``self.load_reports[split]``, a ``LoadReport``) holds skipped records of both kinds
      with their reason and the normalisation counts; it is logged (counts per reason, first records) and written
      as JSONL, one line per skipped record with split, file, index, id, reason, message, image, to
      ``bad_records_report`` (default ``bad_records.jsonl`` in the trainer's ``default_root_dir``, which Lightning
      sets to the working directory unless given; none for a data module used without a trainer), rewritten after
      each split by rank 0 whenever ``bad_records="skip"`` or anything was skipped. ``max_bad_fraction`` is the
      one limit: once the split's lost fraction (``LoadReport.bad_fraction``: malformed of the records read,
      combined with bad images of the records checked) passes it, setup fails listing counts per reason; it is
      checked after reading (before any image is decoded) and after the image check. ``self.n_bad`` counts all.
    - Loaders are torchdata ``StatefulDataLoader``s shuffled from the global RNG (``seed_everything``), or on
      several ranks by a ``DistributedSampler`` seeded the same way (``_distributed_sampler``): Lightning
      stores their position in checkpoints, so a run resumed mid-epoch sees exactly the batches it would have.
    - ``collator`` is injected (``datamodules.collate.CollatorFactory``): ``SFTCollator`` (default: conversation +
      labels; validation batches also carry the prompts for greedy generation) or, in a config,
      ``{class_path: datamodules.collate.PromptCollator}`` (RL: left-padded prompts and references). It is called
      at setup with the processor and ``max_length``, ``overlong``, ``thinking_mode`` and kept as ``self.collator``;
      prediction batches are always prompts (``Collator.for_prediction``).
    """

    def __init__(
        self,
        processor_path: str,
        train_files: list[str] | None = None,
        val_files: list[str] | None = None,
        test_files: list[str] | None = None,
        predict_files: list[str] | None = None,
        phantom_dir: str | None = None,
        image_root: str | None = None,
        allow_outside_image_root: bool = False,
        thinking: bool = False,
        thinking_mode: Literal["on", "off", "auto"] = "auto",
        tasks: list[str] | None = None,
        task_weights: dict[str, float] | None = None,
        collator: CollatorFactory = SFTCollator,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_length: int | None = 4096,
        overlong: Literal["drop", "error"] = "drop",
        check_images: bool = True,
        max_bad_fraction: float = 0.0,
        bad_records: BadRecords = "error",
        normalize_conversations: bool = False,
        bad_records_report: str | None = None,
        max_val_samples: int | None = None,
        max_test_samples: int | None = None,
        max_predict_samples: int | None = None,
        shuffle_images: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            processor_path: checkpoint folder or hub id whose tokenizer/image processor encode the data
                (the CLI links it to the model's path).
            train_files, val_files, test_files, predict_files: RadVLM JSON or JSONL files.
            phantom_dir: a phantom dataset folder; fills the file lists that were not given.
            image_root: folder image paths are relative to (default: each file's folder). When given, every
                image path (absolute, or relative with ``..``) must lie inside it (``RecordError`` otherwise).
            allow_outside_image_root: accept image paths outside ``image_root``.
            thinking: use the ``*_thinking.json`` files of ``phantom_dir``.
            thinking_mode: which prompts are thinking prompts, i.e. have their answer after ``</think>`` scored
                (``radvlm.chat.resolve_thinking``): ``"on"`` all (a Qwen3-VL Thinking checkpoint, whose prompts
                carry no `` /think``), ``"off"`` none, ``"auto"`` those ending in `` /think``.
            tasks: keep only these tasks (``None`` = all).
            task_weights: per-task repeat factors for training.
            collator: the batch layout, called as ``collator(processor, max_length, overlong, thinking_mode)``:
                ``SFTCollator`` (default) or ``PromptCollator`` (GRPO); in a config
                ``{class_path: datamodules.collate.PromptCollator}`` (``init_args`` for further options).
            max_length: samples with more tokens are dropped and counted, or raise (``overlong``).
            check_images: open every image at setup (clear error, or skip up to ``max_bad_fraction``).
            max_bad_fraction: largest fraction of a split that may be skipped (malformed records, bad images).
            bad_records: ``"error"`` (first malformed record raises) or ``"skip"`` (left out and reported;
                set ``max_bad_fraction`` > 0 too, with 0 setup lists every bad record and then stops).
            normalize_conversations: drop a leading gpt turn and a trailing human turn as LLaVA does.
            bad_records_report: JSONL file listing the skipped records (default: ``bad_records.jsonl`` in the
                trainer's ``default_root_dir``; without a trainer, no file).
            max_val_samples: cap on validation records (first N after the task filter); logged when it cuts.
            max_test_samples, max_predict_samples: the same for ``test`` and ``predict``, which otherwise score
                every record (the validation cap never applies to them).
            shuffle_images: the shuffle control (``datamodules.shuffle``): with a seed, every test and predict
                record is answered on the image of another image group (a derangement, fixed by the seed);
                ids, prompts and references stay. Score against the own-image predictions with
                ``python -m radvlm_tools.evaluate OWN.jsonl --shuffled SHUFFLED.jsonl``.
            min_pixels, max_pixels: image pixel budget of the processor (Qwen3-VL: 1024 … 451584); under
                ``main.py`` linked to the policy's (``model.init_args.policy.min_pixels`` …), set there.
        """
        super().__init__()
        self.save_hyperparameters()
        if bad_records not in ("error", "skip"):
            raise ValueError(f"bad_records must be 'error' or 'skip', got {bad_records!r}")
        self.tasks = canonical_tasks(tasks)  # aliases → canonical names (unknown names raise here)
        self.task_weights = {canonical_task(k): float(v) for k, v in (task_weights or {}).items()}
        self.collator_factory = collator  # hparams hold its config under main.py, not the callable
        self.collator: Collator | None = None  # made at setup
        self.processor = None
        self.n_bad = 0  # records skipped in all splits (malformed or bad image)
        self.load_reports: dict[str, LoadReport] = {}  # split → what was read, skipped and normalised
        self.task_summary: dict[str, dict[str, dict[str, int]]] = {}  # split → task → read/kept/dropped
        self.untasked: dict[str, int] = {}  # split → records whose task is unknown (no key, unknown id prefix)
        self.splits: dict[str, list[Record]] = {}

    # ------------------------------------------------------------------ setup
    def _files(self, split: str) -> list[str]:
        given = getattr(self.hparams, f"{split}_files")
        if given:
            return list(given)
        if self.hparams.phantom_dir:
            name = {"predict": "test"}.get(split, split)
            suffix = "_thinking" if self.hparams.thinking else ""
            path = Path(self.hparams.phantom_dir) / f"{name}{suffix}.json"
            return [str(path)]
        return []

    def _load(self, split: str) -> list[Record]:
        hp = self.hparams
        report = self.load_reports[split] = LoadReport()
        records: list[Record] = []
        for f in self._files(split):
            records.extend(load_records(f, image_root=hp.image_root, check_images=False, bad_records=hp.bad_records,
                                        normalize_conversations=hp.normalize_conversations, report=report,
                                        allow_outside_image_root=hp.allow_outside_image_root))
        self._account(split, final=False)  # past the limit already: stop before decoding any image
        read = Counter(str(r.task) if r.task else "(no task)" for r in records)
        records = self._filter_tasks(records, split)
        if hp.check_images:
            records = self._check_images(records, split)
        self._account(split)
        cap = {"val": hp.max_val_samples, "test": hp.get("max_test_samples"),
               "predict": hp.get("max_predict_samples")}.get(split)
        capped = 0
        if cap is not None and len(records) > cap:
            capped = len(records) - cap
            records = records[:cap]
            rank_zero_info(f"{split}: the first {cap} of {cap + capped} records are used (max_{split}_samples={cap})")
        self.task_summary[split] = task_summary(read, records, report.skipped, capped)
        rank_zero_info(format_task_summary(split, self.task_summary[split]))
        if split in ("test", "predict") and hp.shuffle_images is not None:
            records = shuffle_images(records, hp.shuffle_images)
            log.info("shuffle control: the %d %s records are answered on other records' images (seed %d)",
                     len(records), split, hp.shuffle_images)
        if split == "train" and self.task_weights:
            records = apply_task_weights(records, self.task_weights, seed=hp.seed)
        return records

    def _filter_tasks(self, records: list[Record], split: str) -> list[Record]:
        """Count and report untasked records; keep the records of ``tasks`` (all when ``None``)."""
        untasked = [r for r in records if r.task is None]
        self.untasked[split] = len(untasked)
        if untasked:
            examples = ", ".join(repr(r.id) for r in untasked[:5])
            fate = "kept (untasked)" if self.tasks is None else f"not kept by tasks={self.tasks}"
            log.warning("%d of %d %s records have no task (no 'task' key and no known RadVLM id prefix, e.g. "
                        "%s): %s. radvlm.tasks.ID_SOURCES lists the prefixes.", len(untasked), len(records),
                        split, examples, fate)
        if self.tasks is None:
            return records
        kept = [r for r in records if r.task in set(self.tasks)]
        if records and not kept:
            found = dict(Counter(str(r.task) for r in records))
            raise RecordError(f"tasks={self.tasks} keeps none of the {len(records)} {split} records; their tasks: "
                              f"{found}", ", ".join(self._files(split)))
        return kept

    def _check_images(self, records: list[Record], split: str) -> list[Record]:
        """Decode every image fully (PIL's ``verify`` misses truncated JPEGs); the first bad one raises, or,
        with ``bad_records="skip"`` or ``max_bad_fraction`` > 0, bad ones go into the split's report."""
        hp, report = self.hparams, self.load_reports[split]
        skip = hp.bad_records == "skip" or hp.max_bad_fraction > 0
        good = []
        errors: dict[str, ImageError | None] = {}  # several records (tasks) share an image: decode it once
        for r in records:
            report.checked += 1
            if r.image is not None and str(r.image) not in errors:
                try:
                    load_image(r.image)
                    errors[str(r.image)] = None
                except ImageError as err:
                    errors[str(r.image)] = err
            err = errors[str(r.image)] if r.image is not None else None
            if err is None:
                good.append(r)
                continue
            error = RecordError(err.reason, r.source, r.index, r.id, r.image)
            if not skip:
                raise error from err
            report.skip(error, err.kind)
        return good

    def _account(self, split: str, final: bool = True) -> None:
        """Log the split's report and write the report file (at the end, or early when past the limit);
        fail past ``max_bad_fraction`` with the counts per reason."""
        report, limit = self.load_reports[split], self.hparams.max_bad_fraction
        if not final and not report.exceeds(limit):
            return
        self.n_bad = sum(len(r.skipped) for r in self.load_reports.values())
        path = self._write_report()
        if report.skipped or report.normalised:
            where = (f" (all listed in {path})" if path is not None else
                     " (no report file: give bad_records_report or attach a trainer)") if report.skipped else ""
            log.log(logging.WARNING if report.skipped else logging.INFO, "%s%s", report.summary(split), where)
        report.check_limit(limit, split, ", ".join(self._files(split)), path)

    def _write_report(self) -> Path | None:
        """Write the skipped records of all splits loaded so far, one JSON object per line (rank 0 only)."""
        rows = [row for split, r in self.load_reports.items() for row in r.rows(split=split)]
        trainer = self.trainer
        if not rows and self.hparams.bad_records != "skip":
            return None
        if self.hparams.bad_records_report:
            path = Path(self.hparams.bad_records_report)
        elif trainer is not None:  # Lightning's default_root_dir is the working directory unless set
            path = Path(trainer.default_root_dir) / "bad_records.jsonl"
        else:
            return None  # no run to put it beside (a data module used alone): the log and load_reports remain
        if trainer is None or trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        return path

    def setup(self, stage: str | None = None) -> None:
        from radvlm.processor import load_processor

        if self.processor is None:
            self.processor = load_processor(self.hparams.processor_path, self.hparams.min_pixels,
                                            self.hparams.max_pixels)
        if self.collator is None:
            self.collator = self._make_collator()
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        for split in wanted.get(stage, ("train", "val", "test", "predict")):
            if split not in self.splits and self._files(split):
                self.splits[split] = self._load(split)

    # ------------------------------------------------------------------ loaders
    def _make_collator(self) -> Collator:
        hp = self.hparams
        collator = self.collator_factory(self.processor, hp.max_length, hp.overlong, hp.thinking_mode)
        if not isinstance(collator, Collator):
            raise TypeError(f"collator must make a datamodules.collate.Collator (e.g. "
                            f"{{class_path: datamodules.collate.PromptCollator}}), got {collator!r}")
        return collator

    def _loader(self, split: str, train: bool) -> StatefulDataLoader:
        if split not in self.splits:
            raise RuntimeError(f"no {split} data: give {split}_files or phantom_dir")
        hp = self.hparams
        dataset = RecordDataset(self.splits[split])
        sampler = self._distributed_sampler(dataset, train)
        return StatefulDataLoader(
            dataset,
            batch_size=hp.batch_size if train else (hp.eval_batch_size or hp.batch_size),
            shuffle=train and sampler is None,
            sampler=sampler,
            num_workers=hp.num_workers,
            collate_fn=self.collator if train else self.collator.for_evaluation(),
            drop_last=False,
            persistent_workers=hp.num_workers > 0,
        )

    def _distributed_sampler(self, dataset: RecordDataset, train: bool) -> DistributedSampler | None:
        """The sampler when this process is one of several data-parallel ranks (Lightning's
        ``distributed_sampler_kwargs``), else None. Validation and test: ``EvalShardSampler`` (padding marked,
        never counted).

        Training: a ``DistributedSampler`` whose order depends only on the seed (``seed_everything``'s, as
        Lightning's own) and the epoch, which Lightning sets each epoch: the same permutation on every rank, and after a
        resume, so the loader's fast-forward past the batches already trained (its checkpointed position)
        lands on the very batches the uninterrupted run would see. Left to Lightning, the loader's stateful
        random sampler would be wrapped (``DistributedSamplerWrapper``) and drawn afresh from each process's
        global RNG at every epoch start: a resumed run would train other samples than the uninterrupted one."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1:
            return None
        kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None)  # Lightning's own data-parallel ranks
        if not kwargs or int(kwargs.get("num_replicas", 1)) <= 1:
            return None
        if not train:
            return EvalShardSampler(dataset, num_replicas=int(kwargs["num_replicas"]), rank=int(kwargs["rank"]))
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return DistributedSampler(dataset, num_replicas=int(kwargs["num_replicas"]), rank=int(kwargs["rank"]),
                                  shuffle=True, seed=seed, drop_last=False)

    def train_dataloader(self):
        return self._loader("train", train=True)

    def val_dataloader(self):
        return self._loader("val", train=False)

    def test_dataloader(self):
        return self._loader("test", train=False)

    def predict_dataloader(self):
        hp = self.hparams
        return StatefulDataLoader(RecordDataset(self.splits["predict"]),
                                  batch_size=hp.eval_batch_size or hp.batch_size, shuffle=False,
                                  num_workers=hp.num_workers,
                                  collate_fn=self.collator.for_prediction())


def task_summary(read: Counter, kept: list[Record], skipped: list, capped: int) -> dict[str, dict[str, int]]:
    """Per task: records ``read`` (well-formed, before the task filter), ``kept`` (used), ``dropped`` (read
    and not kept: the task filter, a bad image or the cap). ``skipped`` (malformed, task unknown) and
    ``capped`` are totals under ``"(all)"``."""
    used = Counter(str(r.task) if r.task else "(no task)" for r in kept)
    out = {task: {"read": n, "kept": used.get(task, 0), "dropped": n - used.get(task, 0)}
           for task, n in sorted(read.items())}
    out["(all)"] = {"read": sum(read.values()), "kept": len(kept), "dropped": sum(read.values()) - len(kept),
                    "malformed": sum(not s.is_image for s in skipped), "capped": capped}
    return out


def format_task_summary(split: str, summary: dict[str, dict[str, int]]) -> str:
    """One line per task: ``split records per task (kept / read): report_generation 70/250, ...``."""
    total = summary["(all)"]
    tasks = ", ".join(f"{t} {v['kept']}/{v['read']}" for t, v in summary.items() if t != "(all)")
    extra = "".join(f", {total[k]} {k}" for k in ("malformed", "capped") if total.get(k))
    return f"{split} records per task (kept/read): {tasks or 'none'}; {total['kept']} of {total['read']} kept{extra}"

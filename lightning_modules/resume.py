"""What a resumed fit takes from its checkpoint: state (weights, optimizer moments, counters, data position),
not choices. ``PolicyModule`` calls these from its checkpoint and fit hooks.

Configured optimizer settings win over the checkpoint's (``apply_optimizer_settings``), and so does a configured
LR schedule of another length or shape (``apply_configured_schedules``: an extended run continues on it);
changed hyper-parameters are reported (``changed_hyperparameters``); a checkpoint saved at an epoch's last batch
resumes without skipping an epoch (``normalise_epoch_end``).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import torch

RATE_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
COPIED_KEYS = ("weight_decay", "eps")


def _optimizers(trainer: Any) -> list:
    return [getattr(o, "optimizer", o) for o in trainer.optimizers]


def _base(group: dict[str, Any]) -> float:
    return float(group.get("initial_lr", group["lr"]))


def optimizer_settings(trainer: Any) -> list[list[dict[str, Any]]]:
    """The configured settings of every param group of every optimizer (before a checkpoint is restored)."""
    return [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in _optimizers(trainer)]


def apply_optimizer_settings(trainer: Any, settings: list[list[dict[str, Any]]]) -> list[str]:
    """Re-apply ``settings`` (``optimizer_settings``) to the restored optimizers and schedulers; returns what
    changed, e.g. ``["optimizer 0 group 0: lr 0.001 → 0.5"]``.

    Lightning restores each optimizer's ``param_groups`` from the checkpoint, so a run resumed with another
    learning rate or weight decay kept the old ones. ``optimizer_settings`` records the freshly configured
    groups (``on_fit_start``, before any restore) and this re-applies them after the restore
    (``on_train_start``): ``weight_decay`` and ``eps`` are the configured ones, and the learning rate keeps the
    schedule's progress at the configured scale: every rate of a group (``lr``, ``initial_lr``, ``max_lr``,
    ``min_lr``) and the scheduler's ``base_lrs`` are multiplied by configured / checkpointed initial rate (1
    when nothing changed: exact resume stays bitwise). Moments, step counts, the betas (``OneCycleLR`` cycles
    them) and the scheduler's own state (position, ``OneCycleLR``'s ``total_steps`` and phases) stay the
    checkpoint's; a ``LambdaLR`` lambda is code, so the configured one applies.
    """
    changes = []
    schedulers = {id(getattr(c.scheduler, "optimizer", None)): c.scheduler for c in trainer.lr_scheduler_configs}
    for i, (opt, configured) in enumerate(zip(_optimizers(trainer), settings)):
        if len(opt.param_groups) != len(configured):
            continue
        ratios = []
        for j, (group, fresh) in enumerate(zip(opt.param_groups, configured)):
            old = _base(group)
            ratio = _base(fresh) / old if old else None
            ratios.append(ratio)
            before = group["lr"]
            for key in RATE_KEYS:
                if key in group and ratio is not None:
                    group[key] = group[key] * ratio
            if ratio is None:  # a zero rate cannot be scaled: take the configured one
                group["lr"] = fresh["lr"]
            for key in COPIED_KEYS:
                if key in fresh and key in group and group[key] != fresh[key]:
                    changes.append(f"optimizer {i} group {j}: {key} {group[key]} → {fresh[key]}")
                    group[key] = fresh[key]
            if group["lr"] != before:
                changes.append(f"optimizer {i} group {j}: lr {before:g} → {group['lr']:g}")
        scheduler = schedulers.get(id(opt))
        if scheduler is None or all(r == 1.0 for r in ratios):
            continue
        if hasattr(scheduler, "base_lrs") and len(scheduler.base_lrs) == len(ratios):
            scheduler.base_lrs = [b * r if r is not None else b for b, r in zip(scheduler.base_lrs, ratios)]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [g["lr"] for g in opt.param_groups]
    return changes


#: entries of a scheduler's ``state_dict`` that are its progress (restored), not its configuration
PROGRESS_KEYS = ("last_epoch", "_step_count", "_last_lr", "_is_initial", "_get_lr_called_within_step", "base_lrs")


def scheduler_states(trainer: Any) -> list[dict[str, Any]]:
    """A copy of every configured LR scheduler's ``state_dict`` (recorded before a checkpoint is restored)."""
    return [copy.deepcopy(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs]


def schedule_changes(restored: dict[str, Any], configured: dict[str, Any]) -> list[str]:
    """``key: restored → configured`` for each setting (not progress: ``PROGRESS_KEYS``) of a scheduler's
    ``state_dict`` that differs, e.g. ``["total_steps: 6 → 9"]`` for a ``OneCycleLR`` extended from 6 to 9 steps
    (its phases' ``end_step`` follow ``total_steps`` and are not listed apart)."""
    restored, configured = _settings(restored), _settings(configured)
    keys = sorted(set(restored) | set(configured))
    if "_schedule_phases" in keys and restored.get("total_steps") != configured.get("total_steps"):
        keys.remove("_schedule_phases")  # derived from total_steps and pct_start
    return [f"{k}: {restored.get(k, '(absent)')!r:.60} → {configured.get(k, '(absent)')!r:.60}" for k in keys
            if restored.get(k, "(absent)") != configured.get(k, "(absent)")]


def _settings(state: Any) -> Any:
    """``state`` without its ``PROGRESS_KEYS``, also in nested schedulers (``SequentialLR``, ``ChainedScheduler``)."""
    if isinstance(state, dict):
        return {k: _settings(v) for k, v in state.items() if k not in PROGRESS_KEYS}
    if isinstance(state, (list, tuple)):
        return type(state)(_settings(v) for v in state)
    return state


def apply_configured_schedules(trainer: Any, configured: list[dict[str, Any]],
                               settings: list[list[dict[str, Any]]]) -> list[str]:
    """Put every restored LR scheduler whose settings differ from the configured one (``schedule_changes``) on
    the configured schedule, at the restored position; returns what changed, per scheduler.

    Such a scheduler is reset to its configured state (``configured``: ``scheduler_states`` before the restore),
    its optimizer's rates to the configured ones (``settings``: ``optimizer_settings``), and it is stepped as many
    times as the checkpoint's had been (its ``last_epoch``): the rate, and ``OneCycleLR``'s cycled momentum, at
    the next step are the configured schedule's at that step, as if the run had been configured so from the
    start. A ``OneCycleLR`` of 6 steps resumed with ``total_steps`` 9 takes step 7 at the 9-step cycle's rate of
    step 7 (without this, torch raised at step 7: the restored scheduler still spanned 6 steps). Schedulers
    whose settings did not change keep their restored state (exact resume stays bitwise).
    """
    changes = []
    optimizers = _optimizers(trainer)
    for i, (config, fresh) in enumerate(zip(trainer.lr_scheduler_configs, configured)):
        scheduler = config.scheduler
        restored = scheduler.state_dict()
        changed = schedule_changes(restored, fresh)
        if not changed:
            continue
        opt = getattr(scheduler, "optimizer", None)
        index = next((k for k, o in enumerate(optimizers) if o is opt), None)
        if opt is None or index is None or index >= len(settings) or len(settings[index]) != len(opt.param_groups):
            continue
        for group, wanted in zip(opt.param_groups, settings[index]):  # the configured start of the schedule
            group.update({k: copy.deepcopy(v) for k, v in wanted.items()})
        scheduler.load_state_dict(copy.deepcopy(fresh))
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": a replay, on purpose
            warnings.simplefilter("ignore")
            for _ in range(int(restored["last_epoch"]) - int(fresh["last_epoch"])):
                scheduler.step()
        changes.append(f"scheduler {i} ({type(scheduler).__name__}): {', '.join(changed)}; continues at step "
                       f"{scheduler.last_epoch} of the configured schedule (lr {opt.param_groups[0]['lr']:.4g})")
    return changes


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: value}


def changed_hyperparameters(saved: Any, configured: dict[str, Any]) -> list[str]:
    """``key: checkpoint value → configured value`` for each (nested, dotted) hyper-parameter that differs;
    both sides as plain values (``common.plain_value``). LightningCLI's bookkeeping keys are ignored.

    Logged as a warning on resume; the configured values are used."""
    if not isinstance(saved, dict):
        return []
    a, b = _flat(saved), _flat(configured)
    skip = ("_instantiator", "_class_path")
    return [f"{k}: {a.get(k, '(absent)')!r:.80} → {b.get(k, '(absent)')!r:.80}" for k in sorted(set(a) | set(b))
            if not k.startswith(skip) and a.get(k, "(absent)") != b.get(k, "(absent)")]


def log_position(trainer: Any) -> dict[str, Any] | None:
    """Where the run's first logger writes, for its checkpoints: ``{"root": absolute root_dir, "version": …}``
    (TensorBoard / CSV: ``<save_dir>/<name>`` and the ``version_N`` folder under it); ``None`` without one."""
    logger = trainer.loggers[0] if trainer is not None and trainer.loggers else None
    root = getattr(logger, "root_dir", None)
    if logger is None or root is None or not hasattr(logger, "_version"):
        return None
    version = logger.version
    return {"root": os.path.abspath(root), "version": version if isinstance(version, (int, str)) else str(version)}


def resumed_log_version(saved: Any, checkpoint_path: str | os.PathLike) -> dict[str, Any] | None:
    """The logger position a checkpoint was written at: its saved ``log_position``, or, for a checkpoint of
    Lightning's default layout without one (``<root>/version_<K>/checkpoints/<file>``), ``version_<K>``'s."""
    if isinstance(saved, dict) and isinstance(saved.get("root"), str) and isinstance(saved.get("version"), (int, str)):
        return saved
    path = Path(checkpoint_path).absolute()
    folder = path.parent.parent
    if path.parent.name == "checkpoints" and folder.name.startswith("version_") and folder.name[8:].isdigit():
        return {"root": str(folder.parent), "version": int(folder.name[8:])}
    return None


def continue_log_version(trainer: Any, position: dict[str, Any] | None) -> str | None:
    """Make a resumed fit log into the TensorBoard (or CSV) version its checkpoint was written in, so that its
    curves continue instead of starting a new ``version_N``; returns the folder, or ``None`` when it is left
    alone: no position, another logger folder (a checkpoint of another run), a version the configuration
    chose (``version: …``), a logger already writing, or a version folder that no longer exists."""
    logger = trainer.loggers[0] if trainer is not None and trainer.loggers else None
    if position is None or logger is None or getattr(logger, "_version", 0) is not None:
        return None
    if getattr(logger, "_experiment", None) is not None:
        return None
    root = getattr(logger, "root_dir", None)
    if root is None or os.path.abspath(root) != position["root"]:
        return None
    version = position["version"]
    folder = Path(root) / (version if isinstance(version, str) else f"version_{version}")
    if not folder.is_dir():
        return None
    logger._version = version  # Lightning's loggers take the version only at construction; not yet used here
    return str(folder)


#: the data module's settings that say what a run trains on (where the records come from and which of them)
TRAINING_DATA_KEYS = ("train_files", "phantom_dir", "image_root", "tasks", "task_weights", "thinking")


def changed_training_data(saved: Any, configured: dict[str, Any]) -> list[str]:
    """``key: checkpoint value → configured value`` for each of ``TRAINING_DATA_KEYS`` that differs between the
    data module settings saved in a checkpoint (``datamodule_hyper_parameters``) and this run's, values in full
    (file lists are not shortened); ``[]`` when the checkpoint holds none.

    Logged as a warning on resume: a checkpoint found by ``--ckpt_path last`` that another run trained on other
    records is named so, not passed off as this run's."""
    if not isinstance(saved, dict):
        return []
    return [f"{k}: {saved.get(k)!r} → {configured.get(k)!r}" for k in TRAINING_DATA_KEYS
            if k in saved and saved.get(k) != configured.get(k)]


def normalise_epoch_end(checkpoint: dict[str, Any]) -> bool:
    """Clear ``is_last_batch`` of a checkpoint saved in ``on_train_batch_end`` of an epoch's last batch; True
    when it did.

    Such a checkpoint (e.g. ``ModelCheckpoint(every_n_train_steps=…)`` landing there) holds
    ``is_last_batch=True``. Lightning 2.6.6's ``FitLoop.reset`` then counts that epoch as finished before its
    end hooks ran, while the restored ``StatefulDataLoader`` still resumes the finished epoch: the next, empty,
    pass over it is counted as one more epoch, so a ``max_epochs`` run skipped an epoch. Clearing the flag
    makes Lightning treat the checkpoint as any mid-epoch one: the rest of the epoch (nothing) runs, its end
    hooks run, the next epoch starts as in an uninterrupted run (same batches, epoch numbers,
    ``on_train_epoch_end`` calls).
    """
    fit = checkpoint.get("loops", {}).get("fit_loop") if isinstance(checkpoint.get("loops"), dict) else None
    batch = fit.get("epoch_loop.batch_progress") if isinstance(fit, dict) else None
    if not isinstance(batch, dict) or not batch.get("is_last_batch"):
        return False
    total = batch.get("total", {})
    if total.get("completed") != total.get("processed", 0) - 1:  # not saved in on_train_batch_end
        return False
    batch["is_last_batch"] = False
    return True


def plain_value(value: Any) -> Any:
    """``value`` with only what ``torch.load(weights_only=True)`` accepts: dataclasses become dicts of their
    fields, paths strings, functions and classes their dotted name, other objects their ``repr`` (tensors
    stay)."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    if hasattr(value, "__qualname__") and hasattr(value, "__module__"):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)

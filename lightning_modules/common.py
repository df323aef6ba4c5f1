"""Wiring shared by the SFT and GRPO LightningModules: policy construction, optimizers, guarded steps.

- The policy is built in ``configure_model`` from a ``PolicyConfig`` and, under ``FSDP2Strategy``, sharded there.
- Optimizers and schedulers are injected (``OptimizerCallable`` / ``LRSchedulerCallable``).
- Both stages use manual optimization so a step can be refused: a non-finite loss or gradient norm zeroes
  the gradients and skips ``optimizer.step()`` (counted in ``train/skipped_steps``); after
  ``max_consecutive_skips`` skips in a row the run saves a checkpoint of the last good state (the weights did
  not move since) and stops with ``NonFiniteError``. Lightning itself does not guard this: one NaN would
  otherwise reach every weight.
- ``log_text_samples=False`` keeps every piece of report text out of logs and TensorBoard (it may be PHI).
- Exact resume: every training batch seeds the global torch RNG (CPU and GPUs) from (run seed, number of
  batches trained so far, rank) before it runs, so rollout sampling and dropout of a batch do not depend on
  what drew random numbers before it (data loader iterators, validation, a restart). The run seed
  (``torch.initial_seed()`` at the first fit, i.e. ``seed_everything``'s), the batch count and the counters
  above are checkpointed; the data position is the ``StatefulDataLoader``'s, whose shuffling has its own
  generator. Hyper-parameters are stored as plain values, so every checkpoint loads with
  ``weights_only=True``.
- Resume restores state, not choices: the configured optimizer settings (learning rate, weight decay) and LR
  schedule (a longer ``OneCycleLR``) replace the checkpoint's, differing hyper-parameters are logged, and a
  checkpoint taken at an epoch's last batch resumes into the next epoch (``lightning_modules.resume``).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from datamodules.collate import Collator
from datamodules.datamodule import RadVLMDataModule
from lightning_modules.checkpoint_stage import check_checkpoint_module, module_name
from lightning_modules.prediction import PolicyPrediction
from lightning_modules.rank_agreement import RankAgreement
from lightning_modules.resume import (
    apply_configured_schedules,
    apply_optimizer_settings,
    changed_hyperparameters,
    changed_training_data,
    log_position,
    normalise_epoch_end,
    optimizer_settings,
    plain_value,  # noqa: F401  (re-exported)
    scheduler_states,
)
from radvlm.policy import Policy, PolicyConfig

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient norm."""


def default_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=0.01)


def resolve_callable(value: Any) -> Any:
    """A callable, or the import path of one: LightningCLI hands a function default (``default_optimizer``)
    over as the string ``"lightning_modules.common.default_optimizer"``."""
    if isinstance(value, str):
        module, _, name = value.rpartition(".")
        try:
            value = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as e:
            raise ValueError(f"cannot import the callable {value!r}: {e}") from e
    if not callable(value):
        raise TypeError(f"expected a callable (optimizer / scheduler factory), got {value!r}")
    return value



def batch_seed(run_seed: int, batch: int, rank: int) -> int:
    """A 63-bit seed for the ``batch``-th training batch of a run on ``rank``: a hash of the three numbers."""
    digest = hashlib.sha256(f"{run_seed}:{batch}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def set_peak_lr(optimizer: torch.optim.Optimizer, scheduler: Any, lr: float) -> None:
    """Make ``lr`` the peak of a scheduler that keeps its own (``OneCycleLR``'s ``max_lr``): the schedule's
    start, peak and end rates are scaled together. Schedulers that start from the optimizer's rate
    (``LambdaLR``, ``CosineAnnealingLR``, linear warm-up …) already follow ``lr``: nothing to do."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR):
        return
    for group in optimizer.param_groups:
        ratio = lr / group["max_lr"]
        for key in ("max_lr", "initial_lr", "min_lr", "lr"):
            group[key] *= ratio


def check_schedule_length(scheduler: Any, max_steps: int) -> None:
    """``OneCycleLR`` must span the run: with ``total_steps`` below the trainer's ``max_steps`` (optimizer steps)
    torch raises at step ``total_steps + 1``, hours into a run, so this raises at setup instead; above it, the
    rate never anneals, which is warned about. Other schedulers, and runs bounded by epochs (``max_steps`` −1),
    are not checked."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR) or max_steps is None or max_steps <= 0:
        return
    total = int(scheduler.total_steps)
    if total < max_steps:
        raise ValueError(f"OneCycleLR total_steps={total} is below trainer.max_steps={max_steps}: the scheduler "
                         f"would fail at optimizer step {total + 1}; set "
                         f"--model.init_args.lr_scheduler.init_args.total_steps {max_steps}")
    if total > max_steps:
        log.warning("OneCycleLR total_steps=%d is above trainer.max_steps=%d: the learning rate stops at %.0f%% "
                    "of its schedule and never anneals fully", total, max_steps, 100 * max_steps / total)


class PolicyModule(RankAgreement, PolicyPrediction, L.LightningModule):
    #: the batch layout the stage trains and evaluates on (``datamodules.collate``); each stage sets its own
    collator_type: type[Collator] = Collator

    def __init__(
        self,
        policy: PolicyConfig,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        grad_clip: float | None = 1.0,
        max_consecutive_skips: int = 10,
        log_text_samples: bool = True,
        export_dir: str | None = None,
        lr: float | None = None,
        overwrite_export: bool = False,
    ) -> None:
        super().__init__()
        self.policy_config = policy
        self.lr = lr
        self.overwrite_export = overwrite_export
        self.optimizer_factory = resolve_callable(optimizer)
        self.scheduler_factory = None if lr_scheduler is None else resolve_callable(lr_scheduler)
        self.grad_clip = grad_clip
        self.max_consecutive_skips = max_consecutive_skips
        self.log_text_samples = log_text_samples
        self.export_dir = export_dir
        self.policy: Policy | None = None
        self.automatic_optimization = False
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.dropped_samples = 0
        self.run_seed: int | None = None  # set at the first fit, restored from checkpoints
        self.batches_trained = 0  # training batches started, over all epochs and restarts

    def setup(self, stage: str) -> None:
        """Refuse a ``RadVLMDataModule`` whose collator makes another batch layout than ``collator_type`` (before
        fit, validate and test; prediction batches are always prompts), naming the one to configure."""
        if stage == "fit" and self._trainer is not None:
            self._keep_master_weights()
        data = self.trainer.datamodule if self._trainer is not None else None
        if stage == "predict" or not isinstance(data, RadVLMDataModule) or data.collator is None:
            return
        if not isinstance(data.collator, self.collator_type):
            expected = f"{self.collator_type.__module__}.{self.collator_type.__qualname__}"
            raise TypeError(f"{type(self).__name__} needs {self.collator_type.__name__} batches but the data "
                            f"module's collator is a {type(data.collator).__name__}: set "
                            f"data.init_args.collator to {{class_path: {expected}}}")

    def _keep_master_weights(self) -> None:
        """Fit under ``bf16-true``/``16-true`` would cast the whole module, master weights included, to 16 bits
        (Lightning's ``HalfPrecision.convert_module``) so that AdamW updates bf16 weights (one step at lr 1e-6
        moves ~2 % of them). Unless ``policy.master_dtype`` asks for that dtype itself, the run uses the mixed
        precision of the same dtype instead (float32 weights, 16-bit compute), with a warning; a run that does
        ask for 16-bit master weights is warned about what it costs."""
        from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision

        strategy = self.trainer.strategy
        master, compute = self.policy_config.dtypes(train=True)
        plugin = strategy.precision_plugin
        low = (torch.bfloat16, torch.float16)
        if isinstance(plugin, HalfPrecision) and master != plugin._desired_input_dtype:
            mixed = "bf16-mixed" if plugin._desired_input_dtype == torch.bfloat16 else "16-mixed"
            log.warning("precision=%s would train %s master weights; using precision=%s instead (master weights "
                        "%s, compute %s, docs/distributed.md). To train 16-bit weights on purpose set "
                        "--model.init_args.policy.master_dtype %s", plugin.precision,
                        str(plugin._desired_input_dtype).removeprefix("torch."), mixed,
                        str(master).removeprefix("torch."), str(compute).removeprefix("torch."),
                        str(plugin._desired_input_dtype).removeprefix("torch."))
            strategy.precision_plugin = MixedPrecision(mixed, device=strategy.root_device.type)
        elif master in low:
            log.warning("training %s master weights (policy.master_dtype): AdamW updates smaller than ~0.4%% of a "
                        "weight round away (at lr 1e-6 one step moves only a few %% of them); float32 master "
                        "weights (the default) avoid it", str(master).removeprefix("torch."))

    # ------------------------------------------------------------------ model and optimizers
    def configure_model(self) -> None:
        """Build the policy; under ``FSDP2Strategy`` (a device mesh is set) shard every ``Policy`` of this
        module (the policy, and GRPO's frozen reference copy) with ``strategies.shard_policy``."""
        if self.policy is None:
            self.policy = self.policy_config.build(train=self._fitting())
        mesh = self._data_parallel_mesh()
        if mesh is not None:
            from lightning_modules.strategies import shard_policy

            for module in [m for m in self.modules() if isinstance(m, Policy)]:
                shard_policy(module, mesh)

    def _fitting(self) -> bool:
        """Whether the trainer is fitting (the policy then keeps master weights); ``True`` without a trainer."""
        return self._trainer is None or self.trainer.state.fn == "fit"

    def _data_parallel_mesh(self):
        """The mesh FSDP2 shards over (``FSDP2Strategy.fsdp_mesh``: 1-D, or 2-D for hybrid sharding), else the
        data-parallel dimension of a ``ModelParallelStrategy`` mesh; ``None`` without a device mesh."""
        mesh = getattr(self.trainer.strategy, "fsdp_mesh", None) if self._trainer is not None else None
        if mesh is not None:
            return mesh
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None:
            return None
        return mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.lr is not None:  # the one learning-rate knob: before the scheduler reads the groups
            for group in optimizer.param_groups:
                group["lr"] = self.lr
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if self._trainer is not None:
            check_schedule_length(scheduler, self.trainer.max_steps)
        if self.lr is not None:
            set_peak_lr(optimizer, scheduler, self.lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ guarded optimizer step
    def grad_norm(self) -> torch.Tensor:
        """Clip gradients to ``grad_clip`` (if set) and return the total norm before clipping."""
        wrapped = self.trainer.strategy.model if self._trainer is not None else None
        max_norm = self.grad_clip if self.grad_clip is not None else float("inf")
        if wrapped is not None and hasattr(wrapped, "clip_grad_norm_"):  # FSDP1 shards: norm over all ranks
            return wrapped.clip_grad_norm_(max_norm)
        params = [p for p in self.parameters() if p.grad is not None]
        if not params:
            return torch.zeros(())
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        # FSDP2: the gradients are DTensor shards and so is the norm (partial sums): reduce it over the ranks
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def guarded_step(self, loss_finite: bool = True) -> tuple[bool, float]:
        """Step the optimizer (and scheduler) unless the loss or gradient norm is non-finite.

        Returns ``(stepped, grad_norm)``. Gradients are zeroed in both cases.
        """
        optimizer = self.optimizers()
        # the norm is a collective under FSDP2 (DTensor shards): every process computes it, finite loss or not,
        # and the step is taken only if it is finite on every process (one all-reduce decides for all)
        norm = float(self.grad_norm())
        if not loss_finite:
            norm = float("nan")
        stepped = self.agree_all(loss_finite and math.isfinite(norm))
        if stepped:
            optimizer.step()
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()
            self.consecutive_skips = 0
        else:
            self.skipped_steps += 1
            self.consecutive_skips += 1
        optimizer.zero_grad(set_to_none=True)
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
        self.log("train/grad_norm", norm if math.isfinite(norm) else -1.0, on_step=True, on_epoch=False)
        if self.consecutive_skips >= self.max_consecutive_skips:
            self._stop_non_finite()
        return stepped, norm

    def _stop_non_finite(self) -> None:
        path = None
        if self._trainer is not None:
            root = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            path = root / "checkpoints" / "last-good.ckpt"
            self.trainer.save_checkpoint(str(path))
        raise NonFiniteError(
            f"{self.consecutive_skips} consecutive steps had a non-finite loss or gradient norm "
            f"(max_consecutive_skips={self.max_consecutive_skips}); the last good state is saved at {path}. "
            f"Lower the learning rate or check the data of the last batches."
        )

    def log_measured(self, name: str, value: float) -> None:
        """Log an evaluation value that was measured; a NaN (the metric could not be computed: its model is
        missing, no row could be scored) is never logged as a number: ``unavailable/<name>`` is 1 instead and a
        warning names it once per run."""
        if math.isnan(value):
            self.log(f"unavailable/{name}", 1.0, sync_dist=False)
            if name not in self._unavailable_warned:
                self._unavailable_warned.add(name)
                log.warning("%s could not be computed (NaN: its model is unavailable or no sample could be "
                            "scored); it is not logged as a number (see unavailable/%s)", name, name)
            return
        self.log(name, value, sync_dist=False)

    @property
    def _unavailable_warned(self) -> set[str]:
        if not hasattr(self, "_unavailable_names"):
            self._unavailable_names: set[str] = set()
        return self._unavailable_names

    def log_lr(self) -> None:
        opt = self.optimizers()
        opt = getattr(opt, "optimizer", opt)
        self.log("train/lr", opt.param_groups[0]["lr"], on_step=True, on_epoch=False)

    @property
    def synced_generation(self) -> bool:
        """Generation must keep all processes stepping together under FSDP1 (``FSDPStrategy``), which gathers
        the weights in every forward. FSDP2 (``FSDP2Strategy``) needs none: ``Policy.generate`` gathers its
        weights once per call (``radvlm.sharding.whole_weights``) and each process decodes on its own."""
        if self._trainer is None or self.trainer.world_size <= 1:
            return False
        from lightning.pytorch.strategies import FSDPStrategy

        return isinstance(self.trainer.strategy, FSDPStrategy)

    # ------------------------------------------------------------------ checkpoints and export
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["radvlm"] = {
            "module": module_name(type(self)),
            "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
            "dropped_samples": self.dropped_samples, "run_seed": self.run_seed,
            "batches_trained": self.batches_trained,
            "log": log_position(self._trainer),  # a resumed fit continues this TensorBoard version
        }
        # checkpoints load with torch.load(weights_only=True): keep only tensors and plain values in them
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if key in checkpoint:
                checkpoint[key] = plain_value(checkpoint[key])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("radvlm", {})
        check_checkpoint_module(state.get("module"), type(self), checkpoint.get("hyper_parameters"))
        self.skipped_steps = state.get("skipped_steps", 0)
        self.consecutive_skips = state.get("consecutive_skips", 0)
        self.dropped_samples = state.get("dropped_samples", 0)
        self.run_seed = state.get("run_seed", self.run_seed)
        self.batches_trained = state.get("batches_trained", 0)
        # a checkpoint restores state, not choices (lightning_modules/resume.py)
        normalise_epoch_end(checkpoint)
        changed = changed_hyperparameters(checkpoint.get("hyper_parameters"), plain_value(dict(self.hparams)))
        if changed:
            log.warning("the checkpoint's saved settings differ from the configured ones, which are used: %s",
                        "; ".join(changed))
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "hparams"):
            saved, configured = checkpoint.get("datamodule_hyper_parameters"), plain_value(dict(datamodule.hparams))
            other = changed_training_data(saved, configured)
            if other:
                log.warning("the checkpoint was trained on other data than this run's (checkpoint → this run): %s; "
                            "its state resumes on this run's data", "; ".join(other))
            named = {o.split(":")[0] for o in other}
            rest = [c for c in changed_hyperparameters(saved, configured) if c.split(":")[0] not in named]
            if rest:
                log.warning("the checkpoint's data settings differ from the configured ones, which are used: %s",
                            "; ".join(rest))
        self._resumed = True

    def on_fit_start(self) -> None:
        """Refuse, before any training, to overwrite an existing export (another run's model, or the input).
        Record the configured optimizer and scheduler settings, before a checkpoint's are restored
        (``on_train_start``)."""
        self._configured_optimizers = optimizer_settings(self.trainer)
        self._configured_schedules = scheduler_states(self.trainer)
        folder = Path(self.export_dir) if self.export_dir else None
        if folder is not None and folder.exists() and any(folder.iterdir()) and not self.overwrite_export:
            raise FileExistsError(
                f"export_dir {str(folder)!r} already holds files (another run's model?); choose another "
                f"export_dir, delete it, or pass --model.init_args.overwrite_export true")

    def on_train_start(self) -> None:
        if getattr(self, "_resumed", False) and getattr(self, "_configured_optimizers", None):
            changed = apply_optimizer_settings(self.trainer, self._configured_optimizers)
            if changed:
                log.warning("resumed optimizer settings replaced by the configured ones: %s", "; ".join(changed))
            rescheduled = apply_configured_schedules(self.trainer, getattr(self, "_configured_schedules", []),
                                                     self._configured_optimizers)
            if rescheduled:
                log.warning("the checkpoint's LR schedule differs from the configured one, which is used: %s",
                            "; ".join(rescheduled))
        if self.run_seed is None:
            self.run_seed = torch.initial_seed()
        warn_if_nothing_logged(self.trainer, getattr(self, "optimizer_steps_per_batch", None))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning keeps no RNG state in checkpoints, and between two batches data loader iterators and
        # validation draw from the global RNG in ways a resumed run does not repeat exactly: seed each batch
        torch.manual_seed(batch_seed(self.run_seed, self.batches_trained, self.global_rank))
        self.batches_trained += 1

    def count_dropped(self, batch: dict[str, Any]) -> None:
        """Add the batch's over-long samples (dropped by the collator) to ``train/dropped_samples``."""
        self.dropped_samples += int(batch.get("n_dropped", 0))
        self.log("train/dropped_samples", float(self.dropped_samples), on_step=True, on_epoch=False)

    def on_fit_end(self) -> None:
        """Write the trained policy as a Hugging Face folder (the next stage's ``name_or_path``), whatever the
        strategy; LoRA adapters are merged, so the folder is a plain checkpoint without lora keys.

        Single process / DDP: rank 0 saves its own weights. FSDP (FSDP2 or FSDP1): every rank takes part in
        gathering the full state dict once (offloaded to CPU, kept on rank 0 only), and rank 0 saves it. Both go
        through ``Policy.save_pretrained(merge_lora=True, state_dict=...)``: ``merge_lora_state_dict`` folds the
        adapters in (``W + s·B@A``), so the live model keeps its adapters in both cases.
        """
        if not self.export_dir or self.policy is None:
            return
        state = self._full_policy_state()
        if self.trainer.is_global_zero:
            self.policy.save_pretrained(self.export_dir, merge_lora=True, state_dict=state)
        self.trainer.strategy.barrier("radvlm-export")

    def _full_policy_state(self) -> dict[str, torch.Tensor] | None:
        """The full state dict of ``self.policy.model`` (keys as its own ``state_dict()``): gathered from the
        FSDP shards, a collective every rank must enter (``{}`` on ranks other than 0); ``None`` (the live
        weights) when the model is not sharded."""
        from lightning_modules.strategies import full_state_dict, is_sharded

        if is_sharded(self.policy):  # FSDP2 (FSDP2Strategy): DTensor shards, gathered to CPU on rank 0
            return full_state_dict(self.policy.model)
        wrapped = self.trainer.strategy.model
        try:
            from torch.distributed.fsdp import FullStateDictConfig, StateDictType
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        except ImportError:  # pragma: no cover - torch without distributed
            return None
        if not isinstance(wrapped, FSDP):
            return None
        # offload to CPU (one full copy on the accelerator would not fit); on CPU itself offloading would free the
        # very storage the gathered tensors still point to (torch's FlatParamHandle.to_cpu; a segfault)
        config = FullStateDictConfig(offload_to_cpu=wrapped.compute_device.type != "cpu", rank0_only=True)
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, config):
            full = wrapped.state_dict()  # collective: all ranks; {} except on rank 0
        prefix = "policy.model."
        return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}

    def text_table(self, tag: str, rows: list[dict[str, Any]]) -> None:
        """A Markdown table of text samples in TensorBoard (nothing at all when ``log_text_samples`` is off)."""
        if not self.log_text_samples or not rows or self.logger is None:
            return
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_text"):
            return
        keys = list(rows[0])
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for row in rows:
            cells = [str(row[k]).replace("|", "\\|").replace("\n", " ") for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
        from lightning_modules.callbacks.steps import log_step  # the run's one step axis (training batches)

        experiment.add_text(tag, "\n".join(lines), global_step=log_step(self.trainer))


def warn_if_nothing_logged(trainer: Any, optimizer_steps_per_batch: float | None) -> None:
    """A run shorter than ``log_every_n_steps`` training batches logs no ``train/*`` scalars: say so."""
    every = int(getattr(trainer, "log_every_n_steps", 1) or 1)
    batches = trainer.num_training_batches
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
    limits = []
    if isinstance(batches, int) and epochs is not None:
        limits.append(batches * epochs)
    if trainer.max_steps and trainer.max_steps > 0 and optimizer_steps_per_batch:
        limits.append(math.ceil(trainer.max_steps / optimizer_steps_per_batch))
    if limits and min(limits) < every:
        log.warning("this run trains %d batch(es) but logs training scalars every %d (trainer.log_every_n_steps): "
                    "TensorBoard would show no train/* curve; pass --trainer.log_every_n_steps 1",
                    min(limits), every)

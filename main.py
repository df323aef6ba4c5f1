"""radvlm command line: ``python main.py {fit,validate,test,predict} --config configs/<stage>.yaml``.

A plain LightningCLI: the model (``SFTModule`` or ``GRPOModule``) and ``RadVLMDataModule`` come from the
config by ``class_path``; every init argument can be overridden with a flag (``--model.policy.lora.r 32``).
TensorBoard is the default logger and the full config is saved next to the logs. The DataModule's
``processor_path`` follows the model's checkpoint unless set explicitly.

Safe loading: a ``--ckpt_path`` checkpoint is loaded with ``weights_only=True`` (tensors and plain values
only; our checkpoints hold nothing else) unless ``--weights_only false`` is passed for a trusted file; Hugging
Face checkpoints never run remote code (``trust_remote_code`` is never set). Configuration is read only from
the ``--config`` files and flags given (no default config files, no environment variables).

Checkpoints: every trainer gets ``lightning_modules.checkpoint_io.AtomicCheckpointIO`` (atomic, checksummed
single-file checkpoints, verified on load) unless a ``CheckpointIO`` plugin is configured; ``--ckpt_path last``
resumes from the newest intact checkpoint of the run's checkpoint folders (``newest_intact_checkpoint``; the skipped
ones are logged). A resumed run keeps the configuration it is given: Lightning's LightningCLI would replace the
model's configuration with the hyper-parameters saved in the checkpoint (``_parse_ckpt_path``); here the
checkpoint restores state (weights, optimizer moments, counters, data position), never choices. Paths follow
the run: ``{default_root_dir}`` in any config value is the run's ``trainer.default_root_dir`` (``follow_root``).
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningCLI

# Known, harmless library warnings that would otherwise bury the training output:
# - our checkpoints are meant to hold the state after the optimizer step (manual optimization is on purpose);
# - torchdata 0.11 and Lightning 2.6 call APIs that torch 2.13 deprecates.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
# - the frozen vision tower and the GRPO reference are in eval mode on purpose (Lightning warns at every fit);
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


class _NoAdvertisement(logging.Filter):
    """Lightning 2.6 prints a cloud-logger tip at every run; it says nothing about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdvertisement())


SUBCOMMANDS = ("fit", "validate", "test", "predict")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _config_listing() -> str:
    names = sorted(p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob("*.yaml"))
    return "\n".join(f"  configs/{n}" for n in names)


DESCRIPTION = f"""radvlm: train and evaluate Qwen3-VL chest X-ray models (SFT, thinking cold start, GRPO with
clinically grounded rewards) with PyTorch Lightning.

  python main.py fit --config configs/sft.yaml          train (SFT / cold start / GRPO, by config)
  python main.py predict --config configs/eval_vindr.yaml   greedy predictions to JSONL
  python -m radvlm_tools.evaluate PRED.jsonl                   paper-style tables

Options of a model or data class (every init argument, with its default and help):
  python main.py fit --model.help GRPOModule      (or SFTModule)
  python main.py fit --data.help RadVLMDataModule

Learning rate: --model.init_args.lr 1e-6 (any optimizer; with OneCycleLR it is the peak).

Configs:
{_config_listing()}
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the description's line breaks kept."""


#: written in a config path (``"{default_root_dir}/checkpoints"``), it stands for the run's ``trainer.default_root_dir``
ROOT_PLACEHOLDER = "{default_root_dir}"


def follow_root(value, root: str):
    """``value`` (a parsed config: namespaces, dicts, lists, strings …) with ``ROOT_PLACEHOLDER`` in every string
    replaced by ``root``, e.g. ``"{default_root_dir}/hf_export"`` → ``"OUT/hf_export"``; containers are changed in
    place and returned. Lets checkpoints, logs and exports follow ``--trainer.default_root_dir``."""
    from jsonargparse import Namespace

    if isinstance(value, str):
        return value.replace(ROOT_PLACEHOLDER, root)
    if isinstance(value, Namespace):
        for key in list(vars(value)):
            setattr(value, key, follow_root(getattr(value, key), root))
    elif isinstance(value, dict):
        for key in list(value):
            value[key] = follow_root(value[key], root)
    elif isinstance(value, list):
        value[:] = [follow_root(v, root) for v in value]
    return value


def _holds_values(events: Path) -> bool:
    """Whether a TensorBoard event file holds a logged value (scalar, text, image …); ``True`` when that cannot
    be read, so nothing is deleted on a guess."""
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

        return any(event.HasField("summary") and len(event.summary.value) for event in EventFileLoader(str(events)).Load())
    except Exception:  # noqa: BLE001  (no tensorboard, a damaged file: keep it)
        return True


def remove_unused_log_dir(folder: Path) -> bool:
    """Delete the log version ``folder`` of a run that failed when nothing was logged into it: it holds only the
    saved ``config.yaml`` / ``hparams.yaml`` and TensorBoard event files without a value (no checkpoint, no other
    file); ``True`` when it was removed."""
    import shutil

    if not folder.is_dir():
        return False
    for path in folder.rglob("*"):
        if path.is_dir() or path.name in ("config.yaml", "hparams.yaml"):
            continue
        if not path.name.startswith("events.out.tfevents") or _holds_values(path):
            return False
    shutil.rmtree(folder)
    return True


class RadVLMCLI(LightningCLI):
    def before_instantiate_classes(self) -> None:
        """Every ``{default_root_dir}`` in the configuration becomes the run's ``trainer.default_root_dir`` (the
        working directory when unset, as in Lightning) before anything is built or the config is saved."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        follow_root(config, str(config.trainer.default_root_dir or "."))

    def _parse_ckpt_path(self) -> None:
        """Keep the configuration given. LightningCLI 2.6 parses the checkpoint's ``hyper_parameters`` over it
        (class path included), so a resumed run trained with the old learning rate, ``log_text_samples``,
        ``export_dir`` … whatever the config and the command line said."""

    def instantiate_trainer(self, **kwargs):
        """The trainer, with ``AtomicCheckpointIO`` among its plugins unless one is configured, and Lightning's
        default model summary without the FLOPs it did not count (``lightning_modules.model_summary``)."""
        from lightning_modules.checkpoint_io import with_atomic_checkpoint_io

        config = self._get(self.config_init, "trainer", default={})
        check_accelerator(config.get("accelerator"), kwargs.get("accelerator"))
        plugins = kwargs["plugins"] if "plugins" in kwargs else config.get("plugins")
        kwargs["plugins"] = with_atomic_checkpoint_io(plugins, kwargs.get("strategy", config.get("strategy")))
        trainer = super().instantiate_trainer(**kwargs)
        from lightning_modules.model_summary import replace_default_summary

        replace_default_summary(trainer)  # no "Total FLOPs: 0": radvlm's modules have no example input
        return trainer

    def _resolve_checkpoint(self) -> None:
        """``--ckpt_path last`` → the newest intact checkpoint (``None``: none yet, start from scratch); a file
        the strategy would load without the ``CheckpointIO`` (FSDP2Strategy) is verified here instead."""
        from lightning_modules.checkpoint_io import resolve_last, strategy_loads_with_checkpoint_io, verify_checkpoint

        sub = self.config_init[self.subcommand]
        ckpt, weights_only = sub.get("ckpt_path"), sub.get("weights_only")
        if ckpt == "last":
            resolved = resolve_last(self.trainer, weights_only)
            for config in (self.config, self.config_init):
                config[self.subcommand]["ckpt_path"] = None if resolved is None else str(resolved)
        elif ckpt and Path(ckpt).is_file() and not strategy_loads_with_checkpoint_io(self.trainer.strategy):
            verify_checkpoint(ckpt, weights_only)
        ckpt = self.config_init[self.subcommand].get("ckpt_path")
        if self.subcommand == "fit" and ckpt and Path(ckpt).exists():
            self._continue_log_version(ckpt, weights_only)

    def _continue_log_version(self, ckpt: str, weights_only: bool | None) -> None:
        """A resumed fit logs into the TensorBoard version its checkpoint was written in (its curves continue)."""
        from lightning_modules.checkpoint_io import saved_radvlm_state
        from lightning_modules.resume import continue_log_version, resumed_log_version

        position = resumed_log_version(saved_radvlm_state(ckpt, weights_only).get("log"), ckpt)
        folder = continue_log_version(self.trainer, position)
        if folder is not None and self.trainer.is_global_zero:
            logging.getLogger(__name__).info("resumed run: logging on in %s (the checkpoint's version)", folder)

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; a run that fails leaves no log version it created without writing a value into it."""
        logger = self.trainer.logger
        root = getattr(logger, "root_dir", None)
        known = {p.name for p in Path(root).iterdir()} if root is not None and Path(root).is_dir() else set()
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if root is not None and self.trainer.is_global_zero and getattr(logger, "_version", None) is not None:
                folder = Path(logger.log_dir)
                if folder.name not in known:  # this run created it: an earlier run's version is never touched
                    remove_unused_log_dir(folder)
            raise

    def _safe_checkpoint_loading(self) -> None:
        """``--ckpt_path`` is read with ``torch.load(weights_only=True)`` unless ``--weights_only false`` is
        given (Lightning's default ``None`` leaves the choice to torch: unsafe before torch 2.6)."""
        for config in (self.config, self.config_init):
            sub = config[self.subcommand]
            if sub.get("weights_only") is None:
                sub["weights_only"] = True

    def before_fit(self) -> None:
        self._safe_checkpoint_loading()
        self._resolve_checkpoint()

    before_validate = before_test = before_predict = before_fit

    def add_arguments_to_parser(self, parser) -> None:
        # the data is encoded with the policy's own processor settings: given once, on the policy
        parser.link_arguments("model.init_args.policy.name_or_path", "data.init_args.processor_path")
        parser.link_arguments("model.init_args.policy.min_pixels", "data.init_args.min_pixels")
        parser.link_arguments("model.init_args.policy.max_pixels", "data.init_args.max_pixels")
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": ROOT_PLACEHOLDER, "name": ""},
                }
            }
        )


def check_accelerator(*asked: object) -> None:
    """A config that asks for GPUs on a machine without CUDA stops with what to change (Lightning says only
    "No supported gpu backend found!")."""
    import torch

    wanted = [a for a in asked if isinstance(a, str) and a in ("gpu", "cuda")]
    if wanted and not torch.cuda.is_available():
        raise SystemExit(
            f"error: this config runs on GPUs (trainer.accelerator={wanted[0]}) and this machine has no CUDA GPU. "
            "On a GPU machine, install the CUDA torch build (README, docs/training.md); to try the pipeline on CPU use "
            "configs/demo/*.yaml, or override --trainer.accelerator cpu --trainer.devices 1 "
            "--trainer.strategy auto --trainer.precision 32-true (a real Qwen3-VL model is slow on CPU)")


#: list-valued init arguments whose items are objects: a flag that sets one field of "the" item lands on the
#: last item only (jsonargparse), e.g. ``--model.init_args.rewards.init_args.tasks``
OBJECT_LISTS = ("model.init_args.rewards", "model.init_args.val_metrics")


def refuse_list_item_fields(argv: list[str]) -> None:
    """Refuse ``--<list>.init_args.<field>`` / ``--<list>.class_path`` for the object lists above: it would
    silently change only the last item (a three-task GRPO run trained on its format reward alone)."""
    for arg in argv:
        flag = arg.split("=", 1)[0].removeprefix("--")
        for name in OBJECT_LISTS:
            if flag.startswith(name + ".") and flag[len(name) + 1:].split(".")[0] in ("init_args", "class_path"):
                raise SystemExit(f"error: {arg.split('=', 1)[0]} would change only the last item of {name} "
                                 f"(one field of a list item cannot be set from the command line): edit the list in "
                                 f"a config file, or give the whole list: --{name} '[{{class_path: ..., init_args: "
                                 f"{{...}}}}, ...]'")


def main(args=None) -> RadVLMCLI:
    import sys

    refuse_list_item_fields(list(sys.argv[1:] if args is None else args if isinstance(args, (list, tuple)) else []))
    from datamodules.datamodule import RadVLMDataModule
    from lightning_modules import grpo, sft  # noqa: F401  (imported so their classes resolve by class_path)
    from lightning_modules.common import PolicyModule

    # Refuse abbreviated flags (``--trainer.max_step`` silently meant ``max_steps``). Optimizers and schedulers
    # are init arguments of the modules (``--model.init_args.optimizer...``), so LightningCLI's own
    # ``--optimizer``/``--lr_scheduler`` flags (which would give an empty parameter list) are not offered.
    parser_kwargs = {"description": DESCRIPTION, "allow_abbrev": False, "formatter_class": HelpFormatter}
    return RadVLMCLI(
        PolicyModule,
        RadVLMDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={**parser_kwargs, **{cmd: dict(parser_kwargs) for cmd in SUBCOMMANDS}},
        auto_configure_optimizers=False,
        args=args,
    )


#: errors that mean the input or the configuration is wrong: one line, no stack (``--traceback`` or
#: ``RADVLM_TRACEBACK=1`` shows it); names of the classes, so that nothing heavy is imported for this table
USER_ERRORS = ("FileNotFoundError", "FileExistsError", "NotADirectoryError", "IsADirectoryError", "RecordError",
               "ImageError", "SampleTooLongError", "CheckpointError", "RewardFailureError", "RolloutMismatchError",
               "NonFiniteError", "ValueError", "OSError")


def is_user_error(exc: BaseException) -> bool:
    return any(cls.__name__ in USER_ERRORS for cls in type(exc).__mro__)


def run(argv: list[str] | None = None) -> int:
    """``python main.py …``: ``main`` with user errors (``USER_ERRORS``) as one line on stderr and exit status 2;
    ``--traceback`` (or ``RADVLM_TRACEBACK=1``) keeps Python's full report."""
    import os
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    show = "--traceback" in argv or os.environ.get("RADVLM_TRACEBACK", "") not in ("", "0")
    argv = [a for a in argv if a != "--traceback"]
    saved = sys.argv
    sys.argv = [saved[0] if saved else "main.py", *argv]  # LightningCLI reads these (args= beside argv warns)
    try:
        main()
    except Exception as exc:  # noqa: BLE001  (re-raised unless it is a user error)
        if show or not is_user_error(exc):
            raise
        print(f"error: {type(exc).__name__}: {exc}\n(the full stack: add --traceback or set RADVLM_TRACEBACK=1)",
              file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(run())

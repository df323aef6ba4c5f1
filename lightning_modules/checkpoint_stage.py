"""Which stage wrote a checkpoint: ``module_name`` (recorded in every checkpoint by ``PolicyModule``) and
``check_checkpoint_module``, which refuses a checkpoint of another stage (``--ckpt_path`` of an SFT run given to
GRPO would restore its step counter and train nothing).
"""

from __future__ import annotations


def module_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


#: hyper-parameters only one stage has: they name the writer of a checkpoint that predates the "module" entry
STAGE_MARKERS = {"lightning_modules.grpo.GRPOModule": "num_generations",
                 "lightning_modules.sft.SFTModule": "accumulate_grad_batches"}


def check_checkpoint_module(written_by: str | None, cls: type, hyper_parameters: dict | None) -> None:
    """Refuse a checkpoint another stage wrote (``--ckpt_path`` of an SFT run given to GRPO would restore its
    step counter and train nothing): the next stage starts from the previous one's export instead."""
    if written_by is None and isinstance(hyper_parameters, dict):
        written_by = next((name for name, key in STAGE_MARKERS.items() if key in hyper_parameters), None)
    mine = module_name(cls)
    if written_by is None or written_by == mine or issubclass_name(cls, written_by):
        return
    raise ValueError(f"--ckpt_path is a checkpoint of {written_by.rsplit('.', 1)[-1]}, this run is "
                     f"{cls.__name__}: a checkpoint resumes the run that wrote it. To start {cls.__name__} from that "
                     f"run, give its export folder (its export_dir) as --model.init_args.policy.name_or_path and no "
                     f"--ckpt_path")


def issubclass_name(cls: type, name: str) -> bool:
    return any(module_name(base) == name for base in cls.__mro__)

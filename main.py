"""radvlm command line: ``python main.py {fit,validate,test,predict} --config configs/<stage>.yaml``.

A plain LightningCLI: the model (``SFTModule`` or ``GRPOModule``) and ``RadVLMDataModule`` come from the
config by ``class_path``; every init argument can be overridden with a flag (``--model.policy.lora.r 32``).
TensorBoard is the default logger and the full config is saved next to the logs. The DataModule's
``processor_path`` follows the model's checkpoint unless set explicitly.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI


class RadVLMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.policy.name_or_path", "data.init_args.processor_path")
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "radvlm"},
                }
            }
        )


def main(args=None) -> RadVLMCLI:
    from lightning_modules.common import PolicyModule  # noqa: F401  (registers the subclasses below)
    from lightning_modules import sft  # noqa: F401
    from datamodules.datamodule import RadVLMDataModule

    try:  # the GRPO stage is optional at import time
        from lightning_modules import grpo  # noqa: F401
    except ImportError:
        pass
    return RadVLMCLI(
        PolicyModule,
        RadVLMDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()

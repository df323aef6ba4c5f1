"""The data module's collator is injected by ``class_path`` (``datamodules.collate.CollatorFactory``): the SFT and
GRPO config styles fit through ``main.py``, write checkpoints that load with ``weights_only=True`` and resume from
them; a collator of the wrong layout for the module stops at setup naming the one to configure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import main
from datamodules.collate import PromptCollator, SFTCollator

EVERY_STEP = json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"every_n_train_steps": 1, "save_top_k": -1, "save_last": True}}])


def common(root: Path, tiny_ckpt: Path, phantom_dir: Path, steps: int) -> list[str]:
    return [
        "--model.init_args.policy.name_or_path", str(tiny_ckpt), "--model.init_args.policy.dtype", "float32",
        "--data.init_args.phantom_dir", str(phantom_dir), "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "2", "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.limit_val_batches", "0", "--trainer.callbacks", EVERY_STEP, "--trainer.max_steps", str(steps),
        "--model.init_args.export_dir", "null",
    ]


def sft_args(root, tiny_ckpt, phantom_dir, steps):
    return ["fit", "--config", "configs/demo/sft.yaml", *common(root, tiny_ckpt, phantom_dir, steps),
            "--model.init_args.lr_scheduler.init_args.total_steps", "4"]


def grpo_args(root, tiny_ckpt, phantom_dir, steps):
    return ["fit", "--config", "configs/demo/grpo.yaml", *common(root, tiny_ckpt, phantom_dir, steps),
            "--model.init_args.num_generations", "2", "--model.init_args.max_new_tokens", "4",
            "--model.init_args.ppo_mini_batch_size", "2"]


STYLES = {"sft": (sft_args, SFTCollator), "grpo": (grpo_args, PromptCollator)}


@pytest.mark.parametrize("style", sorted(STYLES))
def test_a_config_collator_fits_checkpoints_and_resumes(style, tiny_ckpt, phantom_dir, tmp_path):
    args, collator_type = STYLES[style]
    cli = main.main(args=args(tmp_path / "first", tiny_ckpt, phantom_dir, steps=1))
    data = cli.datamodule
    assert type(data.collator) is collator_type and cli.trainer.global_step == 1
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)  # plain values only, the collator's config included
    collator = saved["datamodule_hyper_parameters"]["collator"]
    assert collator["class_path"] == f"datamodules.collate.{collator_type.__name__}"
    cli = main.main(args=[*args(tmp_path / "second", tiny_ckpt, phantom_dir, steps=2), "--ckpt_path", str(ckpt)])
    assert cli.trainer.global_step == 2 and cli.model.batches_trained == 2  # resumed after the first batch
    assert type(cli.datamodule.collator) is collator_type
    resumed = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["datamodule_hyper_parameters"]["collator"] == collator


@pytest.mark.parametrize("style, wrong, expected", [("grpo", "SFTCollator", "PromptCollator"),
                                                    ("sft", "PromptCollator", "SFTCollator")])
def test_the_wrong_collator_for_the_module_is_refused_naming_the_expected_one(style, wrong, expected, tiny_ckpt,
                                                                             phantom_dir, tmp_path):
    args, _ = STYLES[style]
    with pytest.raises(TypeError, match=rf"needs {expected} batches .* a {wrong}: set data.init_args.collator to "
                                        rf"\{{class_path: datamodules.collate.{expected}\}}"):
        main.main(args=[*args(tmp_path, tiny_ckpt, phantom_dir, steps=1),
                        "--data.init_args.collator", f"datamodules.collate.{wrong}"])


def test_collator_short_names_parse_and_other_classes_or_arguments_are_refused(capsys):
    import yaml

    def parse(*extra: str):
        with pytest.raises(SystemExit) as stop:
            main.main(args=["fit", "--config", "configs/demo/sft.yaml", *extra, "--print_config"])
        return stop.value.code, capsys.readouterr()

    code, out = parse()
    assert code == 0 and yaml.safe_load(out.out)["data"]["init_args"]["collator"]["class_path"] == \
        "datamodules.collate.SFTCollator"
    code, out = parse("--data.init_args.collator", "PromptCollator")
    assert code == 0 and yaml.safe_load(out.out)["data"]["init_args"]["collator"]["class_path"] == \
        "datamodules.collate.PromptCollator"
    code, out = parse("--data.init_args.collator", "lightning_modules.callbacks.BoxPictures")  # not a Collator
    assert code != 0 and "collator" in out.err
    code, out = parse("--data.init_args.collator", '{"class_path": "SFTCollator", "init_args": {"with_prompts": true}}')
    assert code != 0 and "with_prompts" in out.err  # the data module passes the four settings; nothing else exists

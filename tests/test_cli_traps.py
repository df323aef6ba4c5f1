"""Traps a new user fell into, each checked through ``main.py`` (issue: "No traps for the user")."""

from __future__ import annotations

import pytest
import torch

import main
from lightning_modules.common import set_peak_lr
from lightning_modules.grpo import check_mini_batch


def test_help_says_what_the_program_is_and_lists_the_configs(capsys):
    with pytest.raises(SystemExit):
        main.main(args=["--help"])
    out = capsys.readouterr().out
    assert "Qwen3-VL chest X-ray" in out and "configs/grpo_report.yaml" in out and "configs/demo/sft.yaml" in out


def test_abbreviated_flags_are_refused(capsys):
    with pytest.raises(SystemExit):
        main.main(args=["fit", "--config", "configs/demo/grpo.yaml", "--trainer.max_step", "3", "--print_config"])
    assert "unrecognized arguments: --trainer.max_step" in capsys.readouterr().err


def test_no_top_level_optimizer_flag_is_offered(capsys):
    with pytest.raises(SystemExit):
        main.main(args=["fit", "--help"])
    out = capsys.readouterr().out
    assert "--optimizer " not in out and "--lr_scheduler " not in out
    assert "Learning rate: --model.init_args.lr" in out  # the documented learning-rate flag (README too)


def test_lr_drives_the_one_cycle_peak():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=10, pct_start=0.5)
    set_peak_lr(opt, sched, 1e-4)
    rates = []
    for _ in range(10):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(rates) == pytest.approx(1e-4) and rates[0] == pytest.approx(1e-4 / 25)  # default div_factor


def test_mini_batch_that_does_not_divide_the_rollout_batch_warns():
    assert check_mini_batch(16, 32, 128) == 4  # the paper: 512 prompts, 128 per update
    with pytest.warns(UserWarning, match=r"ppo_mini_batch_size=128 does not divide the global rollout batch of 2 "
                                         r"prompts \(data batch_size 2 × 1 processes\)"):
        assert check_mini_batch(2, 1, 128) == 1
    with pytest.warns(UserWarning, match="of 6 prompts"):
        assert check_mini_batch(6, 1, 4) == 2


def test_an_existing_export_is_not_overwritten(tiny_ckpt, phantom_dir, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_text("another run's model")
    args = ["fit", "--config", "configs/demo/sft.yaml", "--model.init_args.policy.name_or_path", str(tiny_ckpt),
            "--data.init_args.phantom_dir", str(phantom_dir), "--trainer.logger", "false",
            "--trainer.callbacks", "null", "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path), "--model.init_args.export_dir", str(export),
            "--data.init_args.batch_size", "2", "--model.init_args.num_generation_samples", "0",
            "--trainer.limit_val_batches", "0", "--data.init_args.num_workers", "0"]
    with pytest.raises(FileExistsError, match="already holds files"):
        main.main(args=args)
    assert (export / "model.safetensors").read_text() == "another run's model"
    cli = main.main(args=[*args, "--model.init_args.overwrite_export", "true", "--model.init_args.lr", "1e-4",
                          "--model.init_args.policy.max_pixels", "9216"])
    assert cli.trainer.global_step == 1 and (export / "config.json").is_file()
    assert cli.datamodule.hparams.max_pixels == 9216  # the pixel budget is given once, on the policy
    assert cli.model.optimizers().param_groups[0]["max_lr"] == pytest.approx(1e-4)
    # the export loads with plain transformers (model) and with load_processor (no torchvision needed)
    from transformers import AutoModelForImageTextToText

    from radvlm.processor import load_processor

    assert AutoModelForImageTextToText.from_pretrained(str(export)).config.model_type == "qwen3_vl"
    assert load_processor(str(export)).tokenizer is not None


@pytest.mark.parametrize("line", [
    "fit --config configs/sft.yaml --trainer.devices 4 --trainer.num_nodes 1",
    "fit --config configs/grpo_report.yaml --trainer.num_nodes 8 --trainer.devices 4 --ckpt_path last",
    "fit --config configs/grpo_grounding.yaml --model.init_args.lr 1e-6",
])
def test_the_documented_launch_lines_parse(line, capsys):
    """The torchrun/srun lines of docs/training.md and docs/slurm_grpo.sbatch's command (arguments after main.py)."""
    with pytest.raises(SystemExit) as done:
        main.main(args=[*line.split(), "--print_config"])
    assert done.value.code in (0, None)
    assert "trainer:" in capsys.readouterr().out

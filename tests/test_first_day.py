"""A researcher's first day with their own data (issue 26): runs that would silently do the wrong thing are
refused at set-up, with a line that says what to do."""

from __future__ import annotations

import logging

import pytest
import torch

import main
from lightning_modules.checkpoint_stage import check_checkpoint_module
from lightning_modules.grpo import GRPOModule
from lightning_modules.sft import SFTModule
from radvlm.policy import PolicyConfig


def test_a_list_item_field_from_the_command_line_is_refused():
    # jsonargparse would set it on the last reward term only: three tasks trained on the format reward alone
    with pytest.raises(SystemExit, match="only the last item of model.init_args.rewards"):
        main.main(args=["fit", "--config", "configs/demo/grpo.yaml",
                        "--model.init_args.rewards.init_args.tasks", "[report_generation]"])
    with pytest.raises(SystemExit, match="val_metrics"):
        main.main(args=["fit", "--config", "configs/demo/grpo.yaml",
                        "--model.init_args.val_metrics.class_path=metrics.text.ROUGEL"])


def test_a_lightning_checkpoint_as_the_policy_gets_the_export_hint(tmp_path):
    with pytest.raises(ValueError, match="is a Lightning checkpoint.*export_dir"):
        PolicyConfig(str(tmp_path / "sft" / "last.ckpt"))
    folder = tmp_path / "last.ckpt.d"  # a distributed checkpoint folder (FSDP2)
    folder.mkdir()
    (folder / "meta.pt").write_bytes(b"")
    (folder / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(ValueError, match="Lightning checkpoint"):
        PolicyConfig(str(folder))


def test_a_checkpoint_of_another_stage_is_refused():
    with pytest.raises(ValueError, match="checkpoint of SFTModule, this run is GRPOModule.*export folder"):
        check_checkpoint_module("lightning_modules.sft.SFTModule", GRPOModule, None)
    # checkpoints written before the module was recorded: told apart by a stage's own hyper-parameter
    with pytest.raises(ValueError, match="checkpoint of SFTModule"):
        check_checkpoint_module(None, GRPOModule, {"accumulate_grad_batches": 1, "policy": {}})
    check_checkpoint_module("lightning_modules.sft.SFTModule", SFTModule, None)  # its own: resumes
    check_checkpoint_module(None, SFTModule, {"policy": {}})  # unknown writer: nothing to refuse on


def _grpo_args(tiny_ckpt, phantom_dir, tmp_path, *extra):
    return ["fit", "--config", "configs/demo/grpo.yaml", "--model.init_args.policy.name_or_path", str(tiny_ckpt),
            "--data.init_args.phantom_dir", str(phantom_dir), "--trainer.logger", "false",
            "--trainer.callbacks", "null", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path), "--model.init_args.export_dir", str(tmp_path / "export"),
            "--data.init_args.batch_size", "2", "--trainer.limit_val_batches", "0", "--data.init_args.num_workers",
            "0", "--model.init_args.num_generations", "2", "--model.init_args.max_new_tokens", "4", *extra]


def test_grpo_from_an_sft_checkpoint_is_refused_before_training(tiny_ckpt, phantom_dir, tmp_path):
    sft = ["fit", "--config", "configs/demo/sft.yaml", "--model.init_args.policy.name_or_path", str(tiny_ckpt),
           "--data.init_args.phantom_dir", str(phantom_dir), "--trainer.logger", "false",
           "--trainer.callbacks", "null", "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false",
           "--trainer.default_root_dir", str(tmp_path / "sft"), "--data.init_args.batch_size", "2",
           "--model.init_args.num_generation_samples", "0", "--trainer.limit_val_batches", "0",
           "--data.init_args.num_workers", "0", "--model.init_args.export_dir", str(tmp_path / "sft" / "export"),
           "--model.init_args.lr_scheduler", "null"]
    cli = main.main(args=sft)
    ckpt = tmp_path / "sft.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=True)["radvlm"]["module"] == "lightning_modules.sft.SFTModule"
    with pytest.raises(ValueError, match="checkpoint of SFTModule, this run is GRPOModule"):
        main.main(args=_grpo_args(tiny_ckpt, phantom_dir, tmp_path / "grpo", "--trainer.max_steps", "2",
                                  "--ckpt_path", str(ckpt)))


def test_a_task_without_a_reward_is_refused_before_the_model_loads(tiny_ckpt, phantom_dir, tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(PolicyConfig, "build", lambda self, train=True: built.append(1))
    with pytest.raises(ValueError, match=r"no reward term scores the training task\(s\) \['report_generation'\]"):
        main.main(args=_grpo_args(tiny_ckpt, phantom_dir, tmp_path, "--trainer.max_steps", "1",
                                  "--data.init_args.tasks", "[report_generation, abnormality_grounding]"))
    assert built == []  # found at set-up, before any model was loaded


def test_a_run_shorter_than_the_logging_interval_warns(tiny_ckpt, phantom_dir, tmp_path, caplog):
    args = _grpo_args(tiny_ckpt, phantom_dir, tmp_path, "--trainer.max_steps", "2",
                      "--trainer.log_every_n_steps", "50", "--model.init_args.ppo_mini_batch_size", "2")
    with caplog.at_level(logging.WARNING):
        main.main(args=args)
    assert "logs training scalars every 50" in caplog.text and "--trainer.log_every_n_steps 1" in caplog.text


def test_an_unavailable_metric_is_logged_as_unavailable_never_as_a_number(tiny_ckpt, caplog):
    # the trap: val/radcliq logged 3.0 (the short-text floor) while RadCliQ's models were missing
    from metrics.text import GLEU
    from radvlm.rewards import RewardTerm

    module = GRPOModule(PolicyConfig(str(tiny_ckpt), dtype="float32"), rewards=[RewardTerm(GLEU())])
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)
    with caplog.at_level(logging.WARNING):
        module.log_measured("val/radcliq", float("nan"))
        module.log_measured("val/radcliq", float("nan"))
        module.log_measured("val/gleu", 0.25)
    assert logged == {"unavailable/val/radcliq": 1.0, "val/gleu": 0.25}
    assert sum("val/radcliq could not be computed" in r.getMessage() for r in caplog.records) == 1


def test_known_noise_lines_are_silenced_and_real_lines_kept(monkeypatch):
    import warnings

    from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn

    # Other tests (a Trainer, a simulated rank) may leave the level or the rank changed; pin both here.
    monkeypatch.setattr(rank_zero_only, "rank", 0, raising=False)
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    monkeypatch.setattr(logger, "disabled", False)  # a library's dictConfig may have disabled it
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        rank_zero_info("💡 Tip: For seamless cloud logging, try installing [litlogger](https://pypi.org/project/litlogger/)")
        rank_zero_info("train records per task (kept/read): report_generation 3/3; 3 of 3 kept")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert seen == ["train records per task (kept/read): report_generation 3/3; 3 of 3 kept"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        import importlib

        importlib.reload(main)  # re-installs main's filters after simplefilter reset them
        rank_zero_warn("Found 76 module(s) in eval mode at the start of training. This may lead to ...")
        rank_zero_warn("a real warning")
    assert [str(w.message) for w in caught] == ["a real warning"]


def test_a_gpu_config_on_a_machine_without_cuda_says_what_to_change(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU.*configs/demo.*--trainer.accelerator cpu"):
        main.check_accelerator("gpu", None)
    main.check_accelerator("cpu", None)
    main.check_accelerator(None, "auto")


def test_a_user_error_is_one_line_without_a_traceback(tmp_path, tiny_ckpt):
    import subprocess
    import sys

    cmd = [sys.executable, "main.py", "fit", "--config", "configs/demo/sft.yaml",
           "--model.init_args.policy.name_or_path", str(tiny_ckpt), "--trainer.default_root_dir", str(tmp_path),
           "--data.init_args.train_files", f"[{tmp_path / 'absent.json'}]", "--trainer.max_steps", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=main.CONFIG_DIR.parent)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "absent.json" in out.stderr and "--traceback" in out.stderr
    assert main.is_user_error(FileNotFoundError("x")) and not main.is_user_error(RuntimeError("x"))


def test_the_command_line_prints_no_lightning_args_warning():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "main.py", "fit", "--config", "configs/demo/sft.yaml", "--print_config"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "seed_everything: 0" in done.stdout
    assert "args parameter is intended" not in done.stderr  # main.run hands argv over without the warning


def test_help_says_how_to_list_model_and_data_options_and_the_learning_rate_flag(capsys):
    with pytest.raises(SystemExit):
        main.main(args=["--help"])
    text = capsys.readouterr().out
    assert "python main.py fit --model.help GRPOModule" in text
    assert "python main.py fit --data.help RadVLMDataModule" in text
    with pytest.raises(SystemExit):  # the hint works as printed
        main.main(args=["fit", "--model.help", "GRPOModule"])
    assert "--model.rewards" in capsys.readouterr().out


def test_help_and_the_training_docs_recommend_the_same_learning_rate_flag(capsys):
    import re
    from pathlib import Path

    with pytest.raises(SystemExit):
        main.main(args=["--help"])
    helped = re.search(r"Learning rate: (--\S+)", capsys.readouterr().out).group(1)
    training = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()  # README links it
    recommended = re.search(r"\*\*Learning rate\.\*\* `(--\S+)", training).group(1)
    assert helped == recommended == "--model.init_args.lr"


def test_readme_sft_example_gives_the_required_files_and_parses(capsys):
    import shlex
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if ln.startswith("python main.py fit --config configs/sft.yaml"))
    argv = shlex.split(line.split("  #")[0])[2:]
    with pytest.raises(SystemExit) as exit_:
        main.main(args=[*argv, "--print_config"])
    assert exit_.value.code in (0, None)
    data = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    assert data["train_files"] == ["radvlm_train.json"] and data["val_files"] == ["radvlm_val.json"]


def test_the_model_summary_shows_no_uncounted_flops(tmp_path, caplog):
    import lightning as L
    from lightning.pytorch.callbacks import RichModelSummary
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lightning_modules.model_summary import FlopsFreeSummary, replace_default_summary

    model = BoringModel()
    model.example_input_array = None  # as radvlm's modules: Lightning counts no FLOP
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, default_root_dir=tmp_path, callbacks=[RichModelSummary(max_depth=2)])
    replace_default_summary(trainer)
    assert not any(type(cb) is RichModelSummary for cb in trainer.callbacks)
    assert [cb._max_depth for cb in trainer.callbacks if isinstance(cb, FlopsFreeSummary)] == [2]
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.callbacks.model_summary"):
        trainer.fit(model)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "lightning.pytorch.callbacks.model_summary")
    assert "Trainable params" in text and "Linear" in text  # the table is still there
    assert "Flops" not in text and "FLOPs" not in text


def test_the_cli_trainer_gets_the_flops_free_summary(tiny_ckpt, tmp_path):
    from datamodules.datamodule import RadVLMDataModule
    from lightning_modules.common import PolicyModule
    from lightning_modules.model_summary import FlopsFreeSummary

    cli = main.RadVLMCLI(PolicyModule, RadVLMDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         auto_configure_optimizers=False, run=False,
                         args=["--config", "configs/smoke/sft.yaml", "--model.init_args.policy.name_or_path",
                               str(tiny_ckpt), "--trainer.default_root_dir", str(tmp_path)])
    summaries = [type(cb).__name__ for cb in cli.trainer.callbacks if "Summary" in type(cb).__name__]
    assert summaries == [FlopsFreeSummary.__name__]

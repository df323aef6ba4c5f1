"""Resume obeys the user: a checkpoint restores state (weights, optimizer moments, counters, data position), never
choices. Settings given in the config or on the command line win over the hyper-parameters saved in the
checkpoint (LightningCLI 2.6 alone parsed those over the configuration, class path included: a resumed run kept
the old learning rate, generation length, ``log_text_samples=True`` and ``export_dir``); the configured learning
rate and weight decay replace the optimizer's restored ones while the schedule keeps its progress; output
locations (``export_dir``, ``default_root_dir``, the prediction file) are the configured ones.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import main as cli_main
from datamodules.datamodule import RadVLMDataModule
from lightning_modules.sft import SFTModule
from radvlm.policy import PolicyConfig
from tests.helpers import report_record, write_records

EVERY_STEP = json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"every_n_train_steps": 1, "save_top_k": -1, "save_last": True}}])


def model_args(tiny_ckpt, *extra: str) -> list[str]:
    return ["--model", "lightning_modules.sft.SFTModule", "--model.policy.name_or_path", str(tiny_ckpt),
            "--model.policy.dtype", "float32", "--data", "datamodules.datamodule.RadVLMDataModule",
            "--data.batch_size", "2", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--seed_everything", "0", *extra]


def fit_args(tiny_ckpt, data: Path, root: Path, *extra: str) -> list[str]:
    return ["fit", *model_args(tiny_ckpt, "--data.train_files", f"[{data}]", "--trainer.limit_val_batches", "0",
                               "--trainer.default_root_dir", str(root), "--trainer.callbacks", EVERY_STEP, *extra)]


@pytest.fixture(scope="module")
def first_run(tiny_ckpt, tmp_path_factory) -> tuple[Path, Path]:
    """Two steps with lr 0.001, max_new_tokens 11, log_text_samples true, no export: (data file, checkpoint)."""
    root = tmp_path_factory.mktemp("first")
    data = write_records(root / "data", [report_record(i) for i in range(4)])
    cli_main.main(fit_args(tiny_ckpt, data, root, "--trainer.max_steps", "2", "--model.lr", "0.001",
                           "--model.max_new_tokens", "11"))
    ckpt = root / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert saved["lr"] == 0.001 and saved["max_new_tokens"] == 11 and saved["log_text_samples"] is True
    return data, ckpt


def test_a_resumed_run_keeps_the_configured_settings_and_output_locations(first_run, tiny_ckpt, tmp_path, caplog):
    data, ckpt = first_run
    before = sorted(p.name for p in ckpt.parent.iterdir())
    root = tmp_path / "second"
    with caplog.at_level(logging.WARNING, logger="lightning_modules.common"):
        cli = cli_main.main(fit_args(tiny_ckpt, data, root, "--trainer.max_steps", "3", "--ckpt_path", str(ckpt),
                                     "--model.lr", "0.5", "--model.max_new_tokens", "7",
                                     "--model.log_text_samples", "false", "--model.export_dir", str(root / "export")))
    module = cli.model
    assert cli.trainer.global_step == 3 and module.batches_trained == 3  # the checkpoint's state was restored
    # choices: the configured ones, in the module, its hyper-parameters and the saved configuration
    assert (module.lr, module.max_new_tokens, module.log_text_samples) == (0.5, 7, False)
    assert module.hparams.log_text_samples is False and module.hparams.max_new_tokens == 7
    assert cli.config.fit.model.init_args.log_text_samples is False
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == 0.5  # not the restored 0.001
    assert "log_text_samples: True → False" in caplog.text and "lr: 0.001 → 0.5" in caplog.text
    # output locations: the configured ones
    assert module.export_dir == str(root / "export") and (root / "export" / "config.json").is_file()
    assert sorted(p.name for p in ckpt.parent.iterdir()) == before  # nothing written beside the old checkpoint
    new = root / "checkpoints" / "last.ckpt"
    saved = torch.load(new, weights_only=True)["hyper_parameters"]
    assert saved["log_text_samples"] is False and saved["export_dir"] == str(root / "export")


def test_predict_from_a_checkpoint_uses_the_configured_settings_and_output(first_run, tiny_ckpt, tmp_path):
    data, ckpt = first_run
    output = tmp_path / "predictions" / "p.jsonl"
    writer = json.dumps([{"class_path": "lightning_modules.callbacks.PredictionWriter",
                          "init_args": {"output": str(output)}}])
    cli_main.main(["predict", *model_args(tiny_ckpt, "--data.predict_files", f"[{data}]", "--model.max_new_tokens", "2",
                                          "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks", writer,
                                          "--ckpt_path", str(ckpt))])
    header, *rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 4 and all(r["completion_tokens"] <= 2 for r in rows)  # not the checkpoint's 11
    # the header names the checkpoint the rows come from (known only once Lightning loaded it)
    assert header["radvlm_prediction_header"]["checkpoint"] == str(Path(ckpt).resolve())


class LrRecorder(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.weight_decay: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        group = trainer.optimizers[0].param_groups[0]
        self.lrs.append(group["lr"])
        self.weight_decay.append(group["weight_decay"])


def step_lr(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


def one_cycle(optimizer):
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=4, pct_start=0.5)


@pytest.mark.parametrize("scheduler", [None, step_lr, one_cycle], ids=["constant", "steplr", "onecycle"])
def test_a_resumed_optimizer_takes_the_configured_learning_rate_and_weight_decay(tiny_ckpt, tmp_path, scheduler):
    data = write_records(tmp_path / "data", [report_record(i) for i in range(4)])

    def fit(root: Path, lr: float, weight_decay: float, max_steps: int, ckpt_path: str | None = None) -> LrRecorder:
        L.seed_everything(0)
        module = SFTModule(PolicyConfig(str(tiny_ckpt), dtype="float32"), num_generation_samples=0, lr=lr,
                           optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=weight_decay),
                           lr_scheduler=scheduler)
        recorder = LrRecorder()
        callbacks = [recorder, ModelCheckpoint(root / "ckpt", every_n_train_steps=1, save_top_k=-1)]
        trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=root, limit_val_batches=0, callbacks=callbacks)
        trainer.fit(module, RadVLMDataModule(str(tiny_ckpt), train_files=[str(data)], batch_size=2),
                    ckpt_path=ckpt_path, weights_only=True)
        return recorder

    straight = fit(tmp_path / "a", lr=0.5, weight_decay=0.1, max_steps=4)  # configured so from the start
    fit(tmp_path / "b", lr=1e-3, weight_decay=0.01, max_steps=2)
    resumed = fit(tmp_path / "c", lr=0.5, weight_decay=0.1, max_steps=4,
                  ckpt_path=str(tmp_path / "b" / "ckpt" / "epoch=0-step=2.ckpt"))
    assert resumed.lrs == pytest.approx(straight.lrs[2:], rel=1e-12)  # the configured schedule, at its step
    assert resumed.weight_decay == [0.1, 0.1]


class LrLog(Callback):
    """The learning rate of every training batch, by optimizer step (1-based), for the CLI tests."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs[trainer.global_step + 1] = trainer.optimizers[0].param_groups[0]["lr"]


def one_cycle_args(total_steps: int) -> list[str]:
    return ["--model.optimizer", "torch.optim.AdamW", "--model.optimizer.lr", "1e-3",
            "--model.lr_scheduler", "torch.optim.lr_scheduler.OneCycleLR", "--model.lr_scheduler.max_lr", "1e-3",
            "--model.lr_scheduler.total_steps", str(total_steps)]


def test_extending_a_run_by_resuming_continues_on_the_configured_schedule(tiny_ckpt, tmp_path, caplog):
    """A 6-step OneCycle run resumed with max_steps 9 (total_steps 9) runs steps 7-9 on the 9-step cycle (torch
    raised "Tried to step 7 times ... total steps is 6": the restored scheduler spanned 6 steps)."""
    data = write_records(tmp_path / "data", [report_record(i) for i in range(4)])
    root = tmp_path / "run"
    callbacks = json.dumps([{"class_path": "tests.test_reliability_resume_choices.LrLog"},
                            json.loads(EVERY_STEP)[0]])
    cli_main.main(fit_args(tiny_ckpt, data, root, "--trainer.max_steps", "6", *one_cycle_args(6)))
    with caplog.at_level(logging.WARNING, logger="lightning_modules.common"):
        cli = cli_main.main(fit_args(tiny_ckpt, data, root, "--trainer.max_steps", "9", *one_cycle_args(9),
                                     "--trainer.callbacks", callbacks, "--ckpt_path", "last"))
    assert cli.trainer.global_step == 9
    lrs = next(c for c in cli.trainer.callbacks if isinstance(c, LrLog)).lrs
    assert sorted(lrs) == [7, 8, 9]
    # OneCycleLR(max_lr 1e-3, total 9, pct_start 0.3, cos): warm-up ends at index 0.3·9−1 = 1.7, annealing from
    # 1e-3 to 1e-3/25/1e4 = 4e-9 until index 8; step 7 is index 6: pct (6−1.7)/6.3, lr 2.2872995315964808e-4
    assert lrs[7] == pytest.approx(2.2872995315964808e-4, rel=1e-9)
    assert lrs[8] == pytest.approx(6.0892969758032414e-05, rel=1e-9) and lrs[9] == pytest.approx(4e-9, rel=1e-6)
    assert "LR schedule differs" in caplog.text and "total_steps: 6 → 9" in caplog.text
    assert "continues at step 6" in caplog.text

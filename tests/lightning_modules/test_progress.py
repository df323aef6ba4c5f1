"""RunProgress: run-wide totals in training batches, epochs, resume, plain lines when stdout is not a terminal;
ValidateAtStart; one TensorBoard step axis."""

import re

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.callbacks import RunProgress, ValidateAtStart, log_step


class TwoStepsPerBatch(L.LightningModule):
    """Manual optimization with two optimizer steps per batch (as GRPO's two mini-batches per rollout batch)."""

    optimizer_steps_per_batch = 2.0

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.automatic_optimization = False
        self.val_steps_seen: list[int] = []

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        for _ in range(2):
            loss = self.layer(batch[0]).pow(2).mean()
            self.manual_backward(loss)
            opt.step()
            opt.zero_grad()
        self.log("train/loss", loss.detach(), on_step=True)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch[0]).pow(2).mean())

    def on_validation_epoch_end(self):
        self.val_steps_seen.append(log_step(self.trainer))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def loader(self, n=6):
        return DataLoader(TensorDataset(torch.randn(n, 2)), batch_size=1)

    def train_dataloader(self):
        return self.loader()

    def val_dataloader(self):
        return self.loader(2)


def trainer(tmp_path, max_steps, callbacks, **kw):
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_model_summary=False, default_root_dir=tmp_path, callbacks=callbacks,
                     num_sanity_val_steps=0, **kw)


def lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("[TwoStepsPerBatch]")]


def test_plain_lines_count_batches_of_the_whole_run(tmp_path, capsys):
    # max_steps 16 optimizer steps = 8 batches = 1⅓ epochs of 6 batches; stdout is captured: not a terminal
    t = trainer(tmp_path, 16, [RunProgress(every_n_seconds=0)], val_check_interval=4)
    t.fit(TwoStepsPerBatch())
    out = lines(capsys.readouterr().out)
    assert out[0] == "[TwoStepsPerBatch] training 8 batches"
    train = [ln for ln in out if " | step " in ln]
    assert [re.search(r"batch (\d+)/(\d+)", ln).groups() for ln in train] == [(str(i), "8") for i in range(1, 9)]
    assert "epoch 1/2" in train[5] and "epoch 2/2" in train[6]  # batch 7 is the first of epoch 2
    assert "step 16" in train[-1] and "(100%)" in train[-1] and "ETA 0:00" in train[-1]
    assert all(re.search(r"train/loss [\d.e+-]+ \| [\d.e+-]+ it/s \| elapsed", ln) for ln in train)
    assert sum("validation after 4 batches" in ln for ln in out) == 1 and "val/loss" in out[5]
    assert out[-1].startswith("[TwoStepsPerBatch] training done: 8 batches, step 16")


def test_quiet_between_intervals_and_bar_off_for_plain(tmp_path, capsys):
    t = trainer(tmp_path, 16, [RunProgress(every_n_seconds=3600)], limit_val_batches=0)
    t.fit(TwoStepsPerBatch())
    train = [ln for ln in lines(capsys.readouterr().out) if " | step " in ln]
    assert [re.search(r"batch (\d+)/", ln).group(1) for ln in train] == ["1", "8"]  # first and last only


def test_totals_and_counts_continue_after_a_resume(tmp_path, capsys):
    model = TwoStepsPerBatch()
    first = trainer(tmp_path, 6, [RunProgress(every_n_seconds=0)], limit_val_batches=0)
    first.fit(model)
    ckpt = tmp_path / "mid.ckpt"
    first.save_checkpoint(ckpt)
    capsys.readouterr()
    second = trainer(tmp_path, 16, [RunProgress(every_n_seconds=0)], limit_val_batches=0)
    second.fit(TwoStepsPerBatch(), ckpt_path=ckpt, weights_only=False)
    out = lines(capsys.readouterr().out)
    assert out[0] == "[TwoStepsPerBatch] training 8 batches, resuming after batch 3 (step 6)"
    train = [ln for ln in out if " | step " in ln]
    assert [re.search(r"batch (\d+)/(\d+)", ln).groups() for ln in train] == [(str(i), "8") for i in range(4, 9)]


def test_validate_at_start_writes_step_zero_and_skips_after_resume(tmp_path):
    model = TwoStepsPerBatch()
    t = trainer(tmp_path, 8, [ValidateAtStart()], val_check_interval=2, enable_progress_bar=False)
    t.fit(model)
    # before batch 0, then after batches 2 and 4 (0-based index 1 and 3: the step Lightning logs them at)
    assert model.val_steps_seen == [0, 1, 3]
    ckpt = tmp_path / "end.ckpt"
    t.save_checkpoint(ckpt)
    resumed = TwoStepsPerBatch()
    trainer(tmp_path, 12, [ValidateAtStart()], val_check_interval=2, enable_progress_bar=False).fit(
        resumed, ckpt_path=ckpt, weights_only=False)
    assert 0 not in resumed.val_steps_seen


def test_every_n_seconds_must_not_be_negative():
    with pytest.raises(ValueError, match="every_n_seconds"):
        RunProgress(every_n_seconds=-1)

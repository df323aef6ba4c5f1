import lightning as L
import pytest
import torch

from datamodules.datamodule import RadVLMDataModule
from lightning_modules.common import NonFiniteError
from lightning_modules.sft import SFTModule
from radvlm.policy import PolicyConfig
from tests.helpers import report_record, write_records


def adamw(lr):
    return lambda params: torch.optim.AdamW(params, lr=lr)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sftdata")
    answers = ["The heart is enlarged.", "No pleural effusion.", "Small left apical pneumothorax."]
    return write_records(folder, [report_record(i, answers[i % 3]) for i in range(12)])


def make(tiny_ckpt, data_file, tmp_path, lr=3e-3, max_steps=12, **trainer_kw):
    L.seed_everything(0)
    module = SFTModule(PolicyConfig(str(tiny_ckpt), dtype="float32"), optimizer=adamw(lr),
                       num_generation_samples=2, max_new_tokens=8)
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[str(data_file)], val_files=[str(data_file)],
                            batch_size=4, max_val_samples=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, limit_val_batches=1, **trainer_kw)
    return module, data, trainer


def test_sft_fit_changes_parameters_and_lowers_loss(tiny_ckpt, data_file, tmp_path):
    module, data, trainer = make(tiny_ckpt, data_file, tmp_path)
    trainer.validate(module, data)
    before_loss = trainer.callback_metrics["val/loss"].item()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer.fit(module, data)
    trainer.validate(module, data)
    after_loss = trainer.callback_metrics["val/loss"].item()
    changed = [n for n, p in module.named_parameters() if not torch.equal(before[n], p)]
    assert len(changed) > len(before) // 2
    assert after_loss < before_loss - 1.0


def test_non_finite_loss_skips_steps_then_stops_with_checkpoint(tiny_ckpt, data_file, tmp_path, monkeypatch):
    module, data, trainer = make(tiny_ckpt, data_file, tmp_path, max_steps=6)
    module.max_consecutive_skips = 3
    module.configure_model()
    real = module.policy.sft_loss

    def poisoned(batch, *a, **k):
        total, n = real(batch, *a, **k)
        return total * float("nan"), n

    monkeypatch.setattr(module.policy, "sft_loss", poisoned)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    with pytest.raises(NonFiniteError, match="3 consecutive"):
        trainer.fit(module, data)
    assert module.skipped_steps == 3
    for n, p in module.named_parameters():
        assert torch.isfinite(p).all() and torch.equal(before[n], p), n
    assert list(tmp_path.rglob("last-good.ckpt"))


def test_cold_start_fit_on_thinking_phantom_data_lowers_loss(tiny_ckpt, phantom_dir, tmp_path):
    L.seed_everything(0)
    module = SFTModule(PolicyConfig(str(tiny_ckpt), dtype="float32", freeze_vision=True), optimizer=adamw(3e-3),
                       num_generation_samples=1, max_new_tokens=8)
    data = RadVLMDataModule(str(tiny_ckpt), phantom_dir=str(phantom_dir), thinking=True,
                            tasks=["abnormality_grounding"], batch_size=4, max_val_samples=4, max_length=1024)
    data.setup("fit")
    assert all(r.is_thinking for r in data.splits["train"])
    trainer = L.Trainer(accelerator="cpu", max_steps=10, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, limit_val_batches=1)
    trainer.validate(module, data)
    before = trainer.callback_metrics["val/loss"].item()
    trainer.fit(module, data)
    trainer.validate(module, data)
    assert trainer.callback_metrics["val/loss"].item() < before - 1.0

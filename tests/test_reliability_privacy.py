"""Private text: with ``log_text_samples=False`` no report or prompt text reaches the logs.

Records whose reports and prompts carry a canary string go through ``fit`` (with validation) and
``validate`` of ``SFTModule`` and ``GRPOModule`` with a ``TensorBoardLogger``, a checkpoint callback and the
progress bar on. With the flag off the canary must not appear in any file under the run folder (event
files, ``hparams.yaml``, checkpoints) nor in the captured stdout/stderr or log records; with the flag on it
must appear (else the test could not fail).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from datamodules.collate import PromptCollator, SFTCollator
from datamodules.datamodule import RadVLMDataModule
from lightning_modules.grpo import GRPOModule
from lightning_modules.sft import SFTModule
from metrics.text import GLEU
from radvlm.policy import PolicyConfig
from radvlm.rewards import RewardTerm
from tests.helpers import report_record, write_records

CANARY = "CANARY-7f3a"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("phi")
    records = [report_record(i, f"Patient {CANARY} has a small left effusion. Heart size normal.")
               for i in range(4)]
    records[1]["conversations"][0]["value"] = f"<image>\nWrite a radiology report for {CANARY}."
    return write_records(folder, records)


def run(kind: str, tiny_ckpt, data_file, root: Path, log_text_samples: bool) -> None:
    L.seed_everything(0)
    policy = PolicyConfig(str(tiny_ckpt), dtype="float32")

    def optimizer(params):
        return torch.optim.AdamW(params, lr=1e-3)

    if kind == "sft":
        module = SFTModule(policy, optimizer=optimizer, num_generation_samples=2, max_new_tokens=4,
                           log_text_samples=log_text_samples)
    else:
        module = GRPOModule(policy, rewards=[RewardTerm(GLEU())], optimizer=optimizer, num_generations=2,
                            max_new_tokens=4, beta=0.0, num_logged_samples=4,
                            log_text_samples=log_text_samples)
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[str(data_file)], val_files=[str(data_file)],
                            collator=SFTCollator if kind == "sft" else PromptCollator, batch_size=2, max_val_samples=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=TensorBoardLogger(root, name="run"),
                        default_root_dir=root, log_every_n_steps=1, val_check_interval=1, limit_val_batches=1,
                        num_sanity_val_steps=1, enable_model_summary=True)
    trainer.fit(module, data)
    trainer.validate(module, data)


def files_with(root: Path, text: str) -> list[str]:
    needle = text.encode()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and needle in p.read_bytes())


@pytest.mark.parametrize("kind", ["sft", "grpo"])
def test_no_text_sample_reaches_logs_or_output_when_off(kind, tiny_ckpt, data_file, tmp_path, capfd, caplog):
    caplog.set_level("DEBUG")
    run(kind, tiny_ckpt, data_file, tmp_path, log_text_samples=False)
    out, err = capfd.readouterr()
    assert out or err  # the progress bar and Lightning's messages were captured
    assert CANARY not in out and CANARY not in err and CANARY not in caplog.text
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.rglob("*"))  # the logger did log
    assert list(tmp_path.rglob("hparams.yaml")) and list(tmp_path.rglob("*.ckpt"))
    assert files_with(tmp_path, CANARY) == []


@pytest.mark.parametrize("kind", ["sft", "grpo"])
def test_text_samples_are_logged_when_on(kind, tiny_ckpt, data_file, tmp_path):
    run(kind, tiny_ckpt, data_file, tmp_path, log_text_samples=True)
    found = files_with(tmp_path, CANARY)
    assert found and all("events.out.tfevents" in f for f in found)  # only the TensorBoard text tables

"""The training-side options of a GRPO step change how fast it runs, not what it trains: a fit with vision once
per prompt and rewards beside the log-prob passes (the defaults) logs the same losses, rewards and weights as
one with repeated vision and rewards first (float32, CPU, same seed); so does one whose log-prob passes pack
their rows without padding (``packed_logprobs``), and one whose π_old / reference passes compute each prompt once
(``shared_prefix_logprobs``)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from datamodules.collate import PromptCollator
from datamodules.datamodule import RadVLMDataModule
from lightning_modules.grpo import GRPOModule
from metrics.text import GLEU
from radvlm.policy import PolicyConfig
from radvlm.rewards import RewardTerm
from tests.helpers import report_record, write_records


class Length(GLEU):
    def score(self, preds, targets):
        return torch.tensor([len(p) / 10 for p in preds], dtype=torch.float32)


def _fit(tiny_ckpt, folder, **options):
    L.seed_everything(0)
    data_file = write_records(folder, [report_record(i) for i in range(4)])
    module = GRPOModule(PolicyConfig(str(tiny_ckpt), dtype="float32"), rewards=[RewardTerm(Length())],
                        num_generations=4, max_new_tokens=6, beta=0.1, ppo_mini_batch_size=1, micro_batch_size=3,
                        # SGD: an update linear in the gradient (Adam's normalised step turns rounding-level
                        # differences of near-zero gradients into ±lr)
                        optimizer=lambda p: torch.optim.SGD(p, lr=1e-2), **options)
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[str(data_file)], collator=PromptCollator, batch_size=2,
                            num_workers=0)
    seen = []

    class Keep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append({k: float(trainer.callback_metrics[k]) for k in ("train/loss", "train/reward_mean")})

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, default_root_dir=folder, callbacks=[Keep()])
    trainer.fit(module, data)
    return seen, {k: v.clone() for k, v in module.policy.state_dict().items()}


@pytest.mark.parametrize("options", [{"packed_logprobs": False}, {"packed_logprobs": True},
                                     {"packed_logprobs": False, "shared_prefix_logprobs": True}],
                         ids=["padded", "packed", "shared-prefix"])
def test_vision_once_and_overlapped_rewards_train_as_the_plain_step(tiny_ckpt, tmp_path, options):
    fast_log, fast_weights = _fit(tiny_ckpt, tmp_path / "fast", **options)
    plain_log, plain_weights = _fit(tiny_ckpt, tmp_path / "plain", share_vision=False, overlap_rewards=False)
    assert len(fast_log) == len(plain_log) == 2  # 2 batches × 2 updates
    for fast, plain in zip(fast_log, plain_log):
        assert fast["train/reward_mean"] == plain["train/reward_mean"]  # the same rollouts and rewards
        assert abs(fast["train/loss"] - plain["train/loss"]) < 1e-5
    from lightning_modules.grpo_passes import uses_varlen_attention

    assert not uses_varlen_attention(torch.nn.Linear(1, 1))  # sdpa / eager / unknown: padded by default
    for key in plain_weights:
        assert torch.allclose(fast_weights[key], plain_weights[key], atol=1e-5), key


def test_token_balanced_micro_batches_train_as_row_micro_batches(tiny_ckpt, tmp_path):
    """Micro-batches cut by padded tokens (rows of similar length together) change the passes, not the update:
    the loss is aggregated over the whole mini-batch whatever its micro-batches."""
    tok_log, tok_weights = _fit(tiny_ckpt, tmp_path / "tokens", micro_batch_tokens=120)
    row_log, row_weights = _fit(tiny_ckpt, tmp_path / "rows")
    for a, b in zip(tok_log, row_log):
        assert a["train/reward_mean"] == b["train/reward_mean"]
        assert abs(a["train/loss"] - b["train/loss"]) < 1e-5
    for key in row_weights:
        assert torch.allclose(tok_weights[key], row_weights[key], atol=1e-5), key

"""Exact resume: a run interrupted mid-epoch and resumed from its checkpoint equals an uninterrupted run.

For SFT and GRPO on the tiny checkpoint: train ``N`` steps straight (saving a checkpoint after every batch);
separately train and crash right after the checkpoint of step ``k`` (``ModelCheckpoint(every_n_train_steps=
k)``), then ``trainer.fit(ckpt_path=..., weights_only=True)`` with a fresh module, data module and trainer
(as a new process would) and finish. The ids seen (in order), the GRPO rollouts, the final weights and the
optimizer and scheduler state must be bitwise identical on CPU. Checkpoints of the straight run taken at the
very end of an epoch and inside a later epoch are resumed too (each resumed run crosses at least one epoch
boundary). All runs validate every 2 batches (greedy generation included), as real runs validate where they
checkpoint. Rollout sampling (GRPO) and LoRA dropout draw from the global torch RNG, which each batch seeds
from the run seed and its batch count: the RNG state after every batch must match as well.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from datamodules.collate import PromptCollator
from datamodules.datamodule import RadVLMDataModule
from lightning_modules.grpo import GRPOModule
from lightning_modules.sft import SFTModule
from metrics.text import GLEU
from radvlm.policy import LoRASettings, PolicyConfig
from radvlm.rewards import RewardTerm
from tests.helpers import report_record, write_records

ANSWERS = ["The heart is enlarged.", "No pleural effusion.", "Small left apical pneumothorax.",
           "Lungs are clear.", "Mild cardiomegaly."]


class Crash(RuntimeError):
    """The simulated failure of the interrupted run."""


class Recorder(Callback):
    """Records, for every training batch, its ids, the optimizer steps done before it, the GRPO rollouts it
    sampled and a digest of the global torch RNG after it (the random stream the batch used); raises
    ``Crash`` at the start of the first batch after ``crash_at`` optimizer steps."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.crash_at = crash_at
        self.ids: list[list[str]] = []
        self.steps: list[int] = []
        self.rollouts: list[list[str]] = []
        self.rng: list[str] = []

    def on_train_start(self, trainer, pl_module) -> None:
        real = pl_module.policy.generate

        def recorded(*args, **kwargs):
            out = real(*args, **kwargs)
            if pl_module.training:  # rollouts, not validation generations
                self.rollouts.append(out.texts)
            return out

        pl_module.policy.generate = recorded

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.crash_at is not None and trainer.global_step >= self.crash_at:
            raise Crash(f"simulated crash after step {trainer.global_step}")
        self.ids.append(list(batch["ids"]))
        self.steps.append(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rng.append(hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest())


class Run:
    """A finished fit: module, trainer, recorder and (straight runs) the folder of per-batch checkpoints."""

    def __init__(self, module, trainer, recorder, ckpt_dir: Path | None = None) -> None:
        self.module, self.trainer, self.recorder, self.ckpt_dir = module, trainer, recorder, ckpt_dir

    def checkpoint(self, step: int) -> Path:
        found = sorted(self.ckpt_dir.glob(f"*-step={step}.ckpt"))
        assert len(found) == 1, sorted(p.name for p in self.ckpt_dir.iterdir())
        return found[0]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resumedata")
    # 10 records, batch 4 → batches of 4, 4, 2: 3 batches per epoch
    return write_records(folder, [report_record(i, ANSWERS[i % 5]) for i in range(10)])


def lambda_scheduler(optimizer):
    # lr factor 1, 0.9, 0.81, … per step: the scheduler state matters for the result
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9**step)


def sft_parts(tiny_ckpt, data_file, lora: LoRASettings | None = None, accumulate: int = 1):
    L.seed_everything(0)
    module = SFTModule(PolicyConfig(str(tiny_ckpt), dtype="float32", lora=lora),
                       optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), lr_scheduler=lambda_scheduler,
                       accumulate_grad_batches=accumulate, num_generation_samples=1, max_new_tokens=4)
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[str(data_file)], val_files=[str(data_file)],
                            batch_size=4, max_val_samples=2)
    return module, data


def sft_lora_parts(tiny_ckpt, data_file):
    return sft_parts(tiny_ckpt, data_file, lora=LoRASettings(r=4, alpha=8, dropout=0.1), accumulate=2)


def grpo_parts(tiny_ckpt, data_file):
    L.seed_everything(0)
    module = GRPOModule(PolicyConfig(str(tiny_ckpt), dtype="float32"), rewards=[RewardTerm(GLEU())],
                        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), lr_scheduler=lambda_scheduler,
                        num_generations=3, max_new_tokens=6, ppo_mini_batch_size=2, micro_batch_size=6)
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[str(data_file)], val_files=[str(data_file)],
                            collator=PromptCollator, batch_size=4, max_val_samples=2)
    return module, data


def make_trainer(root: Path, max_steps: int, callbacks: list[Callback]) -> L.Trainer:
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0,
                     val_check_interval=2, limit_val_batches=1, callbacks=callbacks,
                     enable_checkpointing=checkpointing)


def straight(build, tiny_ckpt, data_file, root: Path, n_steps: int) -> Run:
    module, data = build(tiny_ckpt, data_file)
    recorder = Recorder()
    every_batch = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1)
    trainer = make_trainer(root, n_steps, [recorder, every_batch])
    trainer.fit(module, data)
    return Run(module, trainer, recorder, root / "ckpt")


def crash_after(build, tiny_ckpt, data_file, root: Path, n_steps: int, k: int) -> Run:
    module, data = build(tiny_ckpt, data_file)
    recorder = Recorder(crash_at=k)
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=k, save_top_k=-1)
    with pytest.raises(Crash):
        make_trainer(root, n_steps, [recorder, ckpt]).fit(module, data)
    return Run(module, None, recorder, root / "ckpt")


def resume(build, tiny_ckpt, data_file, root: Path, n_steps: int, ckpt_path: Path) -> Run:
    module, data = build(tiny_ckpt, data_file)  # a new process: fresh objects, same seed
    torch.manual_seed(1234)  # whatever the RNG is at restart, the checkpoint decides what follows
    recorder = Recorder()
    trainer = make_trainer(root, n_steps, [recorder])
    trainer.fit(module, data, ckpt_path=str(ckpt_path), weights_only=True)
    return Run(module, trainer, recorder)


def assert_same_state(a: Run, b: Run) -> None:
    state_a, state_b = a.module.state_dict(), b.module.state_dict()
    assert state_a.keys() == state_b.keys()
    differ = [name for name in state_a if not torch.equal(state_a[name], state_b[name])]
    assert not differ, f"{len(differ)} of {len(state_a)} tensors differ, e.g. {differ[:3]}"
    opt_a, opt_b = a.trainer.optimizers[0].state_dict(), b.trainer.optimizers[0].state_dict()
    assert opt_a["state"].keys() == opt_b["state"].keys() and opt_a["state"]
    for pid, st in opt_a["state"].items():
        for key, value in st.items():  # AdamW: step, exp_avg, exp_avg_sq
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][pid][key])), (pid, key)
    assert opt_a["param_groups"][0]["lr"] == opt_b["param_groups"][0]["lr"]
    sched_a = a.trainer.lr_scheduler_configs[0].scheduler.state_dict()
    sched_b = b.trainer.lr_scheduler_configs[0].scheduler.state_dict()
    assert sched_a["last_epoch"] == sched_b["last_epoch"] == a.trainer.global_step == b.trainer.global_step
    assert a.module.skipped_steps == b.module.skipped_steps == 0


# ---------------------------------------------------------------------------------------------------- SFT
# Full fine-tune: one optimizer step per batch, 3 batches per epoch. N = 8 steps = epochs 0, 1 and two
# batches of epoch 2. Crash after k = 2 (inside epoch 0); resume the straight run's checkpoints of step 3
# (end of epoch 0) and step 4 (inside epoch 1).
SFT_N = 8


@pytest.fixture(scope="module")
def sft_straight(tiny_ckpt, data_file, tmp_path_factory) -> Run:
    return straight(sft_parts, tiny_ckpt, data_file, tmp_path_factory.mktemp("sft_straight"), SFT_N)


def test_sft_straight_run_reshuffles_every_epoch(sft_straight):
    ids = sft_straight.recorder.ids
    assert len(ids) == SFT_N
    epochs = [sorted(i for batch in ids[e * 3 : e * 3 + 3] for i in batch) for e in range(2)]
    assert epochs[0] == epochs[1] == sorted(f"r{i}" for i in range(10))  # each epoch: every record once
    assert ids[0:3] != ids[3:6]  # reshuffled per epoch (else a resumed order would be trivially right)


def test_sft_crashed_mid_epoch_and_resumed_equals_straight_run(sft_straight, tiny_ckpt, data_file, tmp_path):
    k = 2
    crashed = crash_after(sft_parts, tiny_ckpt, data_file, tmp_path / "b", SFT_N, k)
    resumed = resume(sft_parts, tiny_ckpt, data_file, tmp_path / "c", SFT_N, crashed.checkpoint(k))
    a = sft_straight.recorder
    assert crashed.recorder.ids == a.ids[:k]  # the interrupted run saw the first k batches
    assert crashed.recorder.ids + resumed.recorder.ids == a.ids  # nothing repeated or skipped, same order
    assert_same_state(sft_straight, resumed)


@pytest.mark.parametrize("k", [3, 4])
def test_sft_resumed_at_epoch_end_or_in_later_epoch_equals_straight_run(sft_straight, tiny_ckpt, data_file,
                                                                         tmp_path, k):
    resumed = resume(sft_parts, tiny_ckpt, data_file, tmp_path, SFT_N, sft_straight.checkpoint(k))
    assert resumed.recorder.ids == sft_straight.recorder.ids[k:]
    assert_same_state(sft_straight, resumed)


# LoRA (dropout 0.1 draws from the global RNG) and 2 micro-batches per optimizer step. A window never spans
# an epoch: batches (0, 1) → step, (2) → step: 2 steps per epoch. N = 6 steps = 3 epochs = 9 batches;
# crash after k = 3 steps = inside epoch 1, after 5 batches.
def test_sft_lora_with_accumulation_crashed_and_resumed_equals_straight_run(tiny_ckpt, data_file, tmp_path):
    a = straight(sft_lora_parts, tiny_ckpt, data_file, tmp_path / "a", 6)
    crashed = crash_after(sft_lora_parts, tiny_ckpt, data_file, tmp_path / "b", 6, 3)
    resumed = resume(sft_lora_parts, tiny_ckpt, data_file, tmp_path / "c", 6, crashed.checkpoint(3))
    assert a.recorder.steps == [0, 0, 1, 2, 2, 3, 4, 4, 5]  # optimizer steps done before each batch
    assert len(crashed.recorder.ids) == 5
    assert crashed.recorder.ids + resumed.recorder.ids == a.recorder.ids
    assert crashed.recorder.rng + resumed.recorder.rng == a.recorder.rng  # the same dropout random stream
    assert_same_state(a, resumed)


# --------------------------------------------------------------------------------------------------- GRPO
# 4 prompts per batch, mini-batches of 2 prompts → 2 optimizer steps per batch; 3 batches per epoch, the
# last of 2 prompts → 1 step: 2 + 2 + 1 = 5 steps per epoch; batches start at steps 0, 2, 4 | 5, 7. N = 9.
# Crash after k = 2 (inside epoch 0); resume the straight run's checkpoints of step 5 (end of epoch 0) and
# step 7 (inside epoch 1). Validation runs after batches 2 and 4 (steps 4 and 7), so the step-7 checkpoint
# is taken right before a validation, as in real runs.
GRPO_N = 9


@pytest.fixture(scope="module")
def grpo_straight(tiny_ckpt, data_file, tmp_path_factory) -> Run:
    return straight(grpo_parts, tiny_ckpt, data_file, tmp_path_factory.mktemp("grpo_straight"), GRPO_N)


def test_grpo_crashed_mid_epoch_and_resumed_equals_straight_run(grpo_straight, tiny_ckpt, data_file,
                                                                 tmp_path):
    k = 2
    crashed = crash_after(grpo_parts, tiny_ckpt, data_file, tmp_path / "b", GRPO_N, k)
    resumed = resume(grpo_parts, tiny_ckpt, data_file, tmp_path / "c", GRPO_N, crashed.checkpoint(k))
    a, b1, b2 = grpo_straight.recorder, crashed.recorder, resumed.recorder
    assert a.steps == [0, 2, 4, 5, 7]  # optimizer steps done before each batch
    assert b1.steps + b2.steps == a.steps  # step counters
    assert b1.ids + b2.ids == a.ids  # prompt position
    assert b1.rollouts + b2.rollouts == a.rollouts and len(a.rollouts) == 5  # the same samples were drawn
    assert b1.rng + b2.rng == a.rng  # from the same random stream
    assert_same_state(grpo_straight, resumed)  # weights, optimizer, scheduler


@pytest.mark.parametrize("k, batches_done", [(5, 3), (7, 4)])
def test_grpo_resumed_at_epoch_end_or_in_later_epoch_equals_straight_run(grpo_straight, tiny_ckpt, data_file,
                                                                          tmp_path, k, batches_done):
    resumed = resume(grpo_parts, tiny_ckpt, data_file, tmp_path, GRPO_N, grpo_straight.checkpoint(k))
    a = grpo_straight.recorder
    assert resumed.recorder.ids == a.ids[batches_done:]
    assert resumed.recorder.rollouts == a.rollouts[batches_done:]
    assert resumed.recorder.rng == a.rng[batches_done:]
    assert resumed.recorder.steps == a.steps[batches_done:]
    assert_same_state(grpo_straight, resumed)


def test_checkpoints_load_with_weights_only(grpo_straight):
    # hyper-parameters are stored as plain values: no pickled PolicyConfig, function or class
    ckpt = torch.load(grpo_straight.checkpoint(2), weights_only=True, map_location="cpu")
    assert ckpt["hyper_parameters"]["policy"]["name_or_path"]
    assert ckpt["hyper_parameters"]["lr_scheduler"].endswith("lambda_scheduler")
    assert ckpt["radvlm"]["run_seed"] == 0 and ckpt["radvlm"]["batches_trained"] == 1  # step 2 = 1 batch
    assert set(ckpt["radvlm"]) >= {"skipped_steps", "consecutive_skips", "dropped_samples"}

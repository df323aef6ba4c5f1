"""Sharded training with the real manual-optimization modules: ``FSDP2Strategy`` on two CPU processes (gloo).

This file run as a script (``python test_sharded_training.py CKPT DATA OUT``) fits, one after the other,
``SFTModule`` (full fine-tune with gradient checkpointing, and LoRA) and ``GRPOModule`` (full fine-tune with
its sharded frozen reference copy, and LoRA) for two optimizer steps each; Lightning's own launcher starts the
second process, as ``python main.py fit`` does on one node. Unlike FSDP1 (``FSDPStrategy``, see
``test_export.py``), nothing here is test-only: the strategy and the modules are the ones the configs use.
Each rank writes what it saw (steps, losses, gradient norms, its shard sizes) to a JSON file; the test checks
those and loads each export with ``Policy.from_pretrained``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.collate import PromptCollator, SFTCollator
from datamodules.datamodule import RadVLMDataModule
from lightning_modules.grpo import GRPOModule
from lightning_modules.sft import SFTModule
from lightning_modules.strategies import FSDP2Strategy
from metrics.text import GLEU
from radvlm.policy import LoRASettings, Policy, PolicyConfig
from radvlm.rewards import RewardTerm

ROOT = Path(__file__).resolve().parents[2]
LORA = LoRASettings(r=4, alpha=8, dropout=0.0)
RUNS = ("sft_full", "sft_lora", "grpo_full", "grpo_lora")


class LengthReward(GLEU):
    """Answer length in characters / 10: rewards that differ within a group (GLEU of a tiny random model is
    mostly 0, which gives zero advantages and no policy gradient)."""

    def score(self, preds, targets):
        return torch.tensor([len(p) / 10 for p in preds], dtype=torch.float32)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from tests.helpers import report_record, write_records

    folder = tmp_path_factory.mktemp("shardeddata")
    answers = ["The heart is enlarged.", "No pleural effusion.", "Small left apical pneumothorax."]
    return write_records(folder, [report_record(i, answers[i % 3]) for i in range(8)])


@pytest.fixture(scope="module")
def sharded_runs(tiny_ckpt, data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), str(tiny_ckpt), str(data_file), str(out)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    return out


def _state(folder) -> dict[str, torch.Tensor]:
    return Policy.from_pretrained(folder).model.state_dict()


@pytest.mark.parametrize("name", RUNS)
def test_fsdp2_fit_on_two_cpu_processes_trains_and_exports(name, sharded_runs, tiny_ckpt):
    ranks = [json.loads((sharded_runs / name / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, info in enumerate(ranks):
        assert info == {**info, "global_rank": r, "world_size": 2, "backend": "gloo", "strategy": "FSDP2Strategy"}
        assert info["sharded"] and 0 < info["local_numel"] < info["full_numel"]  # each rank holds a shard
        assert info["global_step"] == 2
        assert len(info["losses"]) >= 1 and all(math.isfinite(x) for x in info["losses"])
        assert info["grad_norms"] and all(math.isfinite(x) and x > 0 for x in info["grad_norms"])
    assert ranks[0]["global_step"] == ranks[1]["global_step"]
    assert len(ranks[0]["losses"]) == len(ranks[1]["losses"])
    assert ranks[0]["grad_norms"] == ranks[1]["grad_norms"]  # one norm over all shards, the same on every rank

    export = sharded_runs / name / "export"
    exported, base = _state(export), _state(tiny_ckpt)
    assert sorted(exported) == sorted(base)  # a plain checkpoint: LoRA merged, no lora keys
    moved = [k for k in base if not torch.equal(base[k], exported[k])]
    assert moved, "training changed no weight"
    if name.endswith("lora"):  # only the adapted linears of the language model can move
        assert all("language_model" in k and k.endswith("_proj.weight") for k in moved), moved


def test_fsdp2_grpo_reference_copy_is_sharded_and_frozen_and_the_checkpoint_resumes(sharded_runs):
    for r in (0, 1):
        info = json.loads((sharded_runs / "grpo_full" / f"rank{r}.json").read_text())
        assert info["reference"] == {"sharded": True, "frozen": True, "unchanged": True}
        assert info["kl_logged"]
    # the distributed checkpoint of the run: one shard file per rank and Lightning's metadata; a fit resumed
    # from it continues at step 2 and with the counters saved (one more batch trained)
    ckpt = sharded_runs / "grpo_full" / "last.ckpt"
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2 and (ckpt / "meta.pt").is_file()
    for r in (0, 1):
        resumed = json.loads((sharded_runs / "grpo_full" / f"rank{r}.json").read_text())["resumed"]
        assert resumed["global_step"] == 3 and resumed["finite"]
        assert resumed["batches_trained"] == resumed["saved_batches_trained"] + 1


# ---------------------------------------------------------------------------------------------- the worker
class _Record(L.Callback):
    """Per-step loss and gradient norm as this rank logged them."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grad_norms: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        key = "train/loss_step" if "train/loss_step" in metrics else "train/loss"
        if key in metrics:
            self.losses.append(float(metrics[key]))
        if "train/grad_norm" in metrics:
            self.grad_norms.append(float(metrics["train/grad_norm"]))


def _module(name: str, ckpt: str, export: str):
    lora = LORA if name.endswith("lora") else None
    optimizer = lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0)  # noqa: E731
    if name.startswith("sft"):
        policy = PolicyConfig(ckpt, dtype="float32", lora=lora, gradient_checkpointing=lora is None)
        return SFTModule(policy, optimizer=optimizer, num_generation_samples=0, export_dir=export)
    return GRPOModule(PolicyConfig(ckpt, dtype="float32", lora=lora), rewards=[RewardTerm(LengthReward())],
                      optimizer=optimizer, num_generations=4, max_new_tokens=8, micro_batch_size=3, beta=0.1,
                      export_dir=export)


def _worker(ckpt: str, data_file: str, out: str) -> None:
    """Two-process FSDP2 fits on CPU; run as a script by the fixture above (and by Lightning for rank 1)."""
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    full_numel = {lora: sum(p.numel() for p in Policy.from_pretrained(ckpt, lora=LORA if lora else None).parameters())
                  for lora in (False, True)}
    for name in RUNS:
        folder = Path(out) / name
        L.seed_everything(0)
        module = _module(name, ckpt, str(folder / "export"))
        collator = SFTCollator if name.startswith("sft") else PromptCollator
        data = RadVLMDataModule(ckpt, train_files=[data_file], collator=collator, batch_size=2)
        record = _Record()
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=FSDP2Strategy(), max_steps=2, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=folder, limit_val_batches=0, num_sanity_val_steps=0,
                            callbacks=[record])
        ref_before = None
        if name == "grpo_full":  # the reference copy, as built in configure_model, to compare with after
            ref_before = Policy.from_pretrained(ckpt).model.state_dict()
        trainer.fit(module, data)  # on_fit_end writes the export
        params = list(module.policy.parameters())
        info = {"global_rank": trainer.global_rank, "world_size": trainer.world_size,
                "backend": torch.distributed.get_backend(), "strategy": type(trainer.strategy).__name__,
                "sharded": all(isinstance(p, DTensor) for p in params),
                "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
                "full_numel": full_numel[module.policy_config.lora is not None],
                "global_step": trainer.global_step, "losses": record.losses, "grad_norms": record.grad_norms}
        if name == "grpo_full":
            from lightning_modules.strategies import full_state_dict, is_sharded

            ref = module.reference_model
            ref_after = full_state_dict(ref.model)  # collective; {} on rank 1
            info["reference"] = {
                "sharded": is_sharded(ref), "frozen": not any(p.requires_grad for p in ref.parameters()),
                "unchanged": all(torch.equal(ref_before[k], v) for k, v in ref_after.items())}
            info["kl_logged"] = "train/kl" in trainer.callback_metrics
            trainer.save_checkpoint(folder / "last.ckpt")  # a distributed checkpoint (folder of shards)
            info["resumed"] = _resume(name, ckpt, data, folder)
        (folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(info))


def _resume(name: str, ckpt: str, data, folder: Path) -> dict:
    """One more step from the distributed checkpoint: weights, optimizer state and counters restored."""
    from lightning_modules.strategies import full_state_dict

    module = _module(name, ckpt, export="")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=FSDP2Strategy(), max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=folder, limit_val_batches=0, num_sanity_val_steps=0)
    saved = torch.load(folder / "last.ckpt" / "meta.pt", weights_only=True)["radvlm"]
    trainer.fit(module, data, ckpt_path=str(folder / "last.ckpt"))
    return {"global_step": trainer.global_step, "batches_trained": module.batches_trained,
            "saved_batches_trained": saved["batches_trained"],
            "finite": all(torch.isfinite(v).all().item() for v in full_state_dict(module.policy.model).values())}


if __name__ == "__main__":
    _worker(*sys.argv[1:4])

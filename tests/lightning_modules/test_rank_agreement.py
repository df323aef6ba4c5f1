"""No rank can hang or split the job: ``FSDP2Strategy`` fits on 2 (and 4) CPU processes (gloo) where one rank
takes another path than the others.

This file run as a script (``python test_rank_agreement.py CKPT DATA OUT DEVICES SCENARIO...``) fits the real
``SFTModule`` / ``GRPOModule`` under the real ``FSDP2Strategy``; Lightning's own launcher starts the other
processes, as ``python main.py fit`` does on one node. The scenarios, each on rank 1 only:

- ``sft_nan``: a non-finite loss at the second batch (the step is skipped on both ranks, weights unchanged);
- ``sft_empty`` / ``grpo_empty``: the first batch is empty (every sample over ``max_length``);
- ``grpo_drop``: one prompt of every batch dropped, so rank 1 has fewer mini-batches and micro-batches;
- ``grpo_reward_fail``: every reward of rank 1 unavailable (both ranks stop with the same error);
- ``precision``: one AdamW step at lr 1e-6 under the real configs' precision (float32 master weights) and
  under pure bf16 (``bf16-true`` + ``master_dtype: bfloat16``): which weights moved;
- ``hybrid_sft`` / ``hybrid_grpo`` (4 processes): hybrid sharding as a 2 × 2 mesh;
- ``hybrid_resume`` (4 processes): a 2 × 2 hybrid fit saved as a distributed checkpoint after step 1 and
  resumed to step 2 ends with the weights of the uninterrupted fit; ``grpo_resume`` the same for GRPO on 2
  processes (1-D FSDP2), after the first batch's two updates;
- ``sft_text_only`` / ``grpo_text_only``: every record of rank 1 without its image (text-only batches beside
  rank 0's image batches: the vision units must still gather and reduce on rank 1); ``sft_ddp_text_only``: the
  same SFT fit under Lightning's DDP (every parameter must get a gradient on every rank);
- ``sft_val_empty``: every validation batch of rank 1 empty (rank 1 never has a ``val/loss`` of its own);
- ``eval_padding``: ``validate`` of SFT and GRPO on 5 records (rank 1's shard padded with a copy): the metrics
  equal a single process's on the same 5 records, the copy counted nowhere.

Every process has a hard timeout (``faulthandler`` prints the stacks of a hang and exits); the test kills the
process group past its own limit. Each rank writes what it saw to ``OUT/SCENARIO/rankR.json``.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import hashlib
import json
import math
import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.collate import PromptCollator, SFTCollator

# sibling test modules by file name: run as a script, ``tests`` is not an importable package here
for _folder in (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "radvlm"):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))
from test_sharded_generation import run_with_hard_timeout  # noqa: E402
from test_sharded_training import LengthReward, _Record  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve()
HANG_S = 150  # per process: a collective that waits this long is a hang


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from tests.helpers import report_record, write_records

    folder = tmp_path_factory.mktemp("agreedata")
    answers = ["The heart is enlarged.", "No pleural effusion.", "Small left apical pneumothorax."]
    return write_records(folder, [report_record(i, answers[i % 3]) for i in range(16)])


def _launch(ckpt, data, out: Path, devices: int, scenarios: list[str], timeout: float) -> None:
    """Run the scenarios with Lightning's launcher (the script starts rank 0; Lightning the others)."""
    cmd = [sys.executable, str(SCRIPT), str(ckpt), str(data), str(out), str(devices), *scenarios]
    (out / "log.txt").write_text(run_with_hard_timeout(cmd, timeout).stdout)


def _ranks(out: Path, scenario: str, n: int = 2) -> list[dict]:
    folder = out / scenario
    missing = [r for r in range(n) if not (folder / f"rank{r}.json").is_file()]
    assert not missing, f"{scenario}: ranks {missing} wrote nothing:\n{(out / 'log.txt').read_text()[-5000:]}"
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(n)]


@pytest.fixture(scope="module")
def agreement_runs(tiny_ckpt, data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("agreement")
    _launch(tiny_ckpt, data_file, out, 2, ["sft_nan", "sft_empty", "grpo_empty", "grpo_drop", "precision"], 280)
    return out


@pytest.fixture(scope="module")
def reward_failure_run(tiny_ckpt, data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rewardfail")
    _launch(tiny_ckpt, data_file, out, 2, ["grpo_reward_fail"], 200)  # last: the error ends the processes
    return out


@pytest.fixture(scope="module")
def text_only_runs(tiny_ckpt, data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("textonly")
    _launch(tiny_ckpt, data_file, out, 2, ["sft_text_only", "grpo_text_only", "sft_ddp_text_only", "sft_val_empty",
                                 "eval_padding"], 420)
    return out


@pytest.fixture(scope="module")
def hybrid_runs(tiny_ckpt, data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hybrid")
    _launch(tiny_ckpt, data_file, out, 4, ["hybrid_sft", "hybrid_grpo", "hybrid_resume"], 400)
    return out


def _same_run(ranks: list[dict]) -> None:
    """Every rank stepped as often, saw the same gradient norms and ends with the same finite weights."""
    first = ranks[0]
    for info in ranks:
        assert info["global_step"] == first["global_step"] > 0
        assert info["grad_norms"] == first["grad_norms"] and all(math.isfinite(x) for x in info["grad_norms"])
        assert info["weights"] == first["weights"] and info["finite"]


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(agreement_runs):
    ranks = _ranks(agreement_runs, "sft_nan")
    for info in ranks:
        assert info["skipped_steps"] == 1 and info["global_step"] == 2  # 3 batches, one skipped
        assert info["skipped_batch_unchanged"]  # the skipped batch moved no weight, on any shard
        assert info["logged_grad_norms"][1] == -1.0  # logged as non-finite on both ranks
    assert ranks[0]["weights"] == ranks[1]["weights"] and all(r["finite"] for r in ranks)


@pytest.mark.parametrize("scenario", ["sft_empty", "grpo_empty"])
def test_an_empty_batch_on_one_rank_runs_a_zero_weight_filler(agreement_runs, scenario):
    ranks = _ranks(agreement_runs, scenario)
    _same_run(ranks)
    assert ranks[1]["dropped_samples"] == 2 and ranks[0]["dropped_samples"] == 0  # counted where dropped
    assert ranks[1]["batches"] == ranks[0]["batches"]


def test_a_dropped_prompt_on_one_rank_keeps_the_passes_equal(agreement_runs):
    ranks = _ranks(agreement_runs, "grpo_drop")
    _same_run(ranks)
    assert ranks[1]["dropped_samples"] == ranks[1]["batches"] and ranks[0]["dropped_samples"] == 0
    # rank 0 has 2 prompts (2 updates of 1 prompt), rank 1 one: both make 2 optimizer steps per batch
    assert ranks[0]["global_step"] == 2 * ranks[0]["batches"]


def test_failed_rewards_on_one_rank_stop_every_rank_with_the_same_error(reward_failure_run):
    ranks = _ranks(reward_failure_run, "grpo_reward_fail")
    assert ranks[0]["error"] == ranks[1]["error"]
    assert ranks[0]["error_type"] == "RewardFailureError"
    assert "100% of the rewards of batch 1 could not be computed on rank 1" in ranks[0]["error"]
    assert "'length': 8" in ranks[0]["error"]  # failures per term, summed over the ranks


def test_float32_master_weights_learn_at_lr_1e_6_where_bf16_weights_do_not(agreement_runs):
    for info in _ranks(agreement_runs, "precision"):
        master, pure = info["bf16-mixed"], info["bf16-true"]
        assert master["dtypes"] == ["torch.float32"] and pure["dtypes"] == ["torch.bfloat16"]
        # measured: 85 % of float32 weights move (the rest had no gradient in this batch, e.g. embeddings of
        # absent tokens) against 1.9 % of bf16 weights: the rest of their updates rounds away
        assert master["changed_frac"] > 0.5, master
        assert pure["changed_frac"] < 0.1, pure
        assert master["changed_frac"] > 10 * pure["changed_frac"]
        lora = info["lora"]  # float32 adapters and a bf16 base share FSDP2 units, and the adapters train
        assert lora["trainable"] == ["torch.float32"] and lora["frozen"] == ["torch.bfloat16"]
        assert lora["global_step"] == 1 and lora["lora_b_moved"]


@pytest.mark.parametrize("scenario", ["sft_text_only", "grpo_text_only", "sft_ddp_text_only"])
def test_text_only_batches_on_one_rank_beside_image_batches_train_together(text_only_runs, scenario):
    ranks = _ranks(text_only_runs, scenario)
    _same_run(ranks)
    assert ranks[0]["images_seen"] > 0 and ranks[1]["images_seen"] == 0  # rank 1 never had an image
    assert ranks[1]["batches"] == ranks[0]["batches"] == 2


def test_every_validation_batch_empty_on_one_rank_gives_one_val_loss_on_both(text_only_runs):
    ranks = _ranks(text_only_runs, "sft_val_empty")
    _same_run(ranks)
    assert ranks[0]["val_loss"] == ranks[1]["val_loss"] and math.isfinite(ranks[0]["val_loss"])
    assert ranks[1]["val_dropped"] > 0 and ranks[0]["val_dropped"] == 0  # rank 1's batches were all empty


def test_evaluation_on_two_ranks_counts_every_record_once_as_one_process_does(text_only_runs, tiny_ckpt,
                                                                              data_file):
    ranks = _ranks(text_only_runs, "eval_padding")
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    alone = _eval_padding_metrics(str(tiny_ckpt), str(data_file), Path(text_only_runs) / "alone", devices=1)
    assert set(alone) == set(ranks[0]["metrics"]) == {"sft/val/loss", "grpo/val/length"}
    for key, value in alone.items():
        assert ranks[0]["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # rank 1 ran a padding copy in each module's validation (its shard of 5 records: 2 + 1 copy)
    assert ranks[1]["padding_rows"] == 2 and ranks[0]["padding_rows"] == 0


@pytest.mark.parametrize("scenario", ["hybrid_sft", "hybrid_grpo"])
def test_hybrid_sharding_as_2x2_trains_with_identical_replicas(hybrid_runs, scenario):
    ranks = _ranks(hybrid_runs, scenario, n=4)
    _same_run(ranks)
    for info in ranks:
        assert info["mesh"] == {"shape": [2, 2], "names": ["replicate", "shard"]}
        assert 0 < info["local_numel"] < info["full_numel"]
    # ranks 0 and 2 hold the same shard, as do 1 and 3: the replicas stayed identical
    assert ranks[0]["shard"] == ranks[2]["shard"] and ranks[1]["shard"] == ranks[3]["shard"]
    assert ranks[0]["shard"] != ranks[1]["shard"]


@pytest.fixture(scope="module")
def grpo_resume_run(tiny_ckpt, data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grporesume")
    _launch(tiny_ckpt, data_file, out, 2, ["grpo_resume"], 300)
    return out


def _check_resume(ranks: list[dict]) -> None:
    for info in ranks:
        assert info["checkpoint_is_folder"] and info["interrupted_step"] == 1 and info["resumed_step"] == 2
        assert info["resumed_weights"] == info["whole_weights"]  # bitwise: every shard of every replica
        assert info["interrupted_weights"] != info["whole_weights"]  # the resumed fit did train its step
        whole, first, resumed = info["grad_norms"]
        assert first + resumed == whole  # every update of the resumed fit saw the uninterrupted one's samples
    assert len({info["whole_weights"] for info in ranks}) == 1


def test_hybrid_sharding_resumes_from_a_distributed_checkpoint_to_the_uninterrupted_weights(hybrid_runs):
    _check_resume(_ranks(hybrid_runs, "hybrid_resume", n=4))


def test_grpo_on_two_ranks_resumes_to_the_uninterrupted_rollouts_and_weights(grpo_resume_run):
    _check_resume(_ranks(grpo_resume_run, "grpo_resume"))


# ---------------------------------------------------------------------------------------------- the worker
#: what rank 1's collator does in the running scenario: None, "drop_one", "empty_first", "text_only",
#: "empty_val" (every batch of validation records, ids "v…", empty)
MISBEHAVE: dict[str, str | None] = {"mode": None}


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


class _Misbehaving:
    """A collator mixin: on rank 1, drop one record of every batch, make the first batch empty (as the real
    collator does with samples over ``max_length``), counted in ``n_dropped``, or drop every image (text-only
    records). ``images_seen`` counts the images this rank's batches carried."""

    images_seen = 0
    val_dropped = 0

    def __call__(self, records):
        mode = MISBEHAVE["mode"] if _rank() == 1 else None
        self.calls = getattr(self, "calls", 0) + 1
        if mode == "text_only":
            records = [dataclasses.replace(r, image=None) for r in records]
        if mode == "empty_val" and records and records[0].id.startswith("v"):
            _Misbehaving.val_dropped += len(records)
            return {"n_dropped": len(records), "empty": True}
        _Misbehaving.images_seen += sum(r.image is not None for r in records)
        if mode == "empty_first" and self.calls == 1:
            return {"n_dropped": len(records), "empty": True}
        if mode == "drop_one":
            batch = super().__call__(records[1:])
            batch["n_dropped"] = batch.get("n_dropped", 0) + 1
            return batch
        return super().__call__(records)


class MisbehavingPrompts(_Misbehaving, PromptCollator):
    pass


class MisbehavingSFT(_Misbehaving, SFTCollator):
    pass


class FailOnRank1(LengthReward):
    """Answer length / 10 on rank 0; unavailable (NaN) on rank 1."""

    def score(self, preds, targets):
        values = super().score(preds, targets)
        return torch.full_like(values, float("nan")) if _rank() == 1 else values


class _Watch(_Record):
    """Loss and grad norm per step (``_Record``), plus: batches run, and the weights around one batch."""

    def __init__(self, watch_batch: int | None = None) -> None:
        super().__init__()
        self.batches = 0
        self.watch_batch = watch_batch
        self.before = None
        self.unchanged = None
        self.logged_grad_norms: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.watch_batch:
            self.before = _full_weights(pl_module.policy)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.batches += 1
        if "train/grad_norm" in trainer.callback_metrics:
            self.logged_grad_norms.append(float(trainer.callback_metrics["train/grad_norm"]))
        if batch_idx == self.watch_batch:
            after = _full_weights(pl_module.policy)
            self.unchanged = all(torch.equal(self.before[k], after[k]) for k in after)


class _NaNAt(L.Callback):
    """Rank 1's SFT loss is NaN at batch ``index``."""

    def __init__(self, index: int) -> None:
        self.index = index

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        policy = pl_module.policy
        if trainer.global_rank != 1:
            return
        if batch_idx == self.index:
            original = policy.sft_loss

            def nan_loss(b, **kw):
                loss, n = original(b, **kw)
                return loss * float("nan"), n

            policy.sft_loss = nan_loss
            self._original = original
        elif hasattr(self, "_original"):
            policy.sft_loss = self._original
            del self._original


class _ErrorNote(L.Callback):
    """Writes the error this rank stops with, then waits for the other ranks (who must stop with it too)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_exception(self, trainer, pl_module, exception) -> None:
        note = {"error": str(exception), "error_type": type(exception).__name__}
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(note))
        torch.distributed.barrier()  # every rank got here: none waits in a collective of the step


def _full_weights(policy) -> dict[str, torch.Tensor]:
    """Full weights on every rank (a collective), float32 copies on CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().float().cpu().clone() for k, v in state.items()}


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _module(kind: str, ckpt: str, lr: float = 1e-2, **policy_kw):
    from lightning_modules.grpo import GRPOModule
    from lightning_modules.sft import SFTModule
    from radvlm.policy import PolicyConfig
    from radvlm.rewards import RewardTerm

    optimizer = lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0)  # noqa: E731
    policy = PolicyConfig(ckpt, **{"dtype": "float32", **policy_kw})
    if kind == "sft":
        return SFTModule(policy, optimizer=optimizer, num_generation_samples=0)
    reward = FailOnRank1() if MISBEHAVE.get("reward_fail") else LengthReward()
    return GRPOModule(policy, rewards=[RewardTerm(reward, name="length")], optimizer=optimizer, num_generations=4,
                      max_new_tokens=8, micro_batch_size=3, beta=0.1, ppo_mini_batch_size=_world(),
                      max_unavailable_fraction=0.5)


def _world() -> int:
    return int(os.environ.get("RADVLM_TEST_DEVICES", "2"))


def _fit(kind: str, ckpt: str, data_file: str, folder: Path, callbacks, max_steps: int = -1, batches: int = 2,
         collator=None, strategy=None, precision="32-true", module=None, batch_size: int = 2,
         val_file: str | None = None, ckpt_path: str | None = None):
    from datamodules.datamodule import RadVLMDataModule
    from lightning_modules.strategies import FSDP2Strategy

    L.seed_everything(0)
    module = module or _module(kind, ckpt)
    collator = collator or (MisbehavingSFT if kind == "sft" else MisbehavingPrompts)
    data = RadVLMDataModule(ckpt, train_files=[data_file], val_files=[val_file] if val_file else None,
                            collator=collator, batch_size=batch_size)
    trainer = L.Trainer(accelerator="cpu", devices=_world(), strategy=strategy or FSDP2Strategy(),
                        max_steps=max_steps, max_epochs=1, limit_train_batches=batches, logger=False,
                        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=folder, limit_val_batches=2 if val_file else 0, num_sanity_val_steps=0,
                        callbacks=callbacks,
                        precision=precision)
    trainer.fit(module, data, ckpt_path=ckpt_path, weights_only=True)
    return trainer, module


def _resume(kind: str, ckpt: str, data_file: str, folder: Path, hybrid: bool) -> dict:
    """Two batches of ``kind`` (SFT: 1 step each; GRPO: 2 updates each), once uninterrupted and once stopped
    after the first batch (a distributed checkpoint: a folder of shards) and resumed, under a 2 × 2 hybrid
    mesh or 1-D FSDP2: the digests of the full weights after each, and the batches' sample ids."""
    from lightning_modules.strategies import FSDP2Strategy

    def strategy():
        return FSDP2Strategy(hybrid_shard=hybrid, shard_size=2 if hybrid else None, save_distributed_checkpoint=True)

    def digest(module) -> str:
        weights = _full_weights(module.policy)
        return _digest(weights[k] for k in sorted(weights))

    steps = 1 if kind == "sft" else 2  # optimizer steps per batch
    watches = [_Watch(), _Watch(), _Watch()]
    _, whole = _fit(kind, ckpt, data_file, folder / "whole", [watches[0]], max_steps=2 * steps, strategy=strategy())
    saver = ModelCheckpoint(dirpath=folder / "ckpt", save_last=True, every_n_train_steps=steps)
    first, stopped = _fit(kind, ckpt, data_file, folder / "first", [watches[1], saver], max_steps=steps,
                          strategy=strategy())
    last = folder / "ckpt" / "last.ckpt"
    resumed, module = _fit(kind, ckpt, data_file, folder / "resumed", [watches[2]], max_steps=2 * steps,
                           strategy=strategy(), ckpt_path=str(last))
    return {"whole_weights": digest(whole), "interrupted_weights": digest(stopped), "resumed_weights": digest(module),
            "interrupted_step": first.global_step // steps, "resumed_step": resumed.global_step // steps,
            "checkpoint_is_folder": last.is_dir(), "grad_norms": [w.grad_norms for w in watches]}


def _summary(trainer, module, record: _Watch) -> dict:
    from torch.distributed.tensor import DTensor

    weights = _full_weights(module.policy)
    params = list(module.policy.parameters())
    local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    return {"global_step": trainer.global_step, "grad_norms": record.grad_norms, "batches": record.batches,
            "logged_grad_norms": record.logged_grad_norms, "skipped_steps": module.skipped_steps,
            "dropped_samples": module.dropped_samples, "weights": _digest(weights[k] for k in sorted(weights)),
            "finite": all(bool(torch.isfinite(v).all()) for v in weights.values()), "shard": _digest(local),
            "local_numel": sum(t.numel() for t in local), "full_numel": sum(v.numel() for v in weights.values()),
            "skipped_batch_unchanged": record.unchanged}


def _precision(ckpt: str, data_file: str, folder: Path) -> dict:
    """One AdamW step at lr 1e-6 (weight decay 0): the fraction of weights that moved, per precision."""
    out = {}
    start = _full_weights_of_checkpoint(ckpt)
    for precision, master in (("bf16-mixed", "float32"), ("bf16-true", "bfloat16")):
        module = _module("sft", ckpt, lr=1e-6, dtype="bfloat16", master_dtype=master)
        trainer, module = _fit("sft", ckpt, data_file, folder / precision, [_Watch()], max_steps=1, batches=1,
                               precision=precision, module=module)
        after = _full_weights(module.policy)
        moved = sum(int((after[k] != start[k].to(torch.bfloat16).float() if master == "bfloat16"
                         else after[k] != start[k]).sum()) for k in after)
        total = sum(v.numel() for v in after.values())
        out[precision] = {"changed_frac": moved / total, "global_step": trainer.global_step,
                          "dtypes": sorted({str(p.dtype) for p in module.policy.parameters()})}
    # LoRA: float32 adapters beside the frozen bf16 base in the same FSDP2 units
    from radvlm.lora import LoRASettings

    module = _module("sft", ckpt, lr=1e-3, dtype="bfloat16", lora=LoRASettings(r=4, alpha=8, dropout=0.0))
    trainer, module = _fit("sft", ckpt, data_file, folder / "lora", [_Watch()], max_steps=1, batches=1,
                           precision="bf16-mixed", module=module)
    after = _full_weights(module.policy)
    params = dict(module.policy.model.named_parameters())
    out["lora"] = {"global_step": trainer.global_step,
                   "trainable": sorted({str(p.dtype) for p in params.values() if p.requires_grad}),
                   "frozen": sorted({str(p.dtype) for p in params.values() if not p.requires_grad}),
                   "lora_b_moved": any(bool(after[k].abs().sum() > 0) for k in after if "lora_B" in k)}
    return out


def _full_weights_of_checkpoint(ckpt: str) -> dict[str, torch.Tensor]:
    from radvlm.policy import Policy

    return {k: v.float() for k, v in Policy.from_pretrained(ckpt).model.state_dict().items()}


def _val_file(data_file: str, folder: Path, n: int = 8) -> str:
    """This rank's copy of the first ``n`` training records as validation records (ids "v…", the same images)."""
    records = json.loads(Path(data_file).read_text())[:n]
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"val{torch.distributed.get_rank() if torch.distributed.is_initialized() else 0}.json"
    for rec in records:
        rec["id"] = "v" + rec["id"]
        rec["image"] = str(Path(data_file).parent / rec["image"])
    out.write_text(json.dumps(records))
    return str(out)


class _PaddingRows(L.Callback):
    """Counts the padding rows (``EvalShardSampler``'s copies) of this rank's validation batches."""

    def __init__(self) -> None:
        self.rows = 0

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.rows += sum(batch.get("padding") or [])


def _eval_padding_metrics(ckpt: str, data_file: str, folder: Path, devices: int) -> dict:
    """``validate`` of a fresh SFT and GRPO module on the first 5 records, on ``devices`` processes (FSDP2 when
    several): the logged metrics, and this rank's padding rows under ``"padding_rows"`` when asked."""
    from datamodules.datamodule import RadVLMDataModule
    from lightning_modules.strategies import FSDP2Strategy

    val_file = _val_file(data_file, folder, n=5)
    out, padding = {}, 0
    for kind, collator in (("sft", SFTCollator), ("grpo", PromptCollator)):
        L.seed_everything(0)
        rows = _PaddingRows()
        data = RadVLMDataModule(ckpt, train_files=[data_file], val_files=[val_file], collator=collator,
                                batch_size=2)
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=FSDP2Strategy() if devices > 1 else "auto",
                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=folder / kind, callbacks=[rows])
        (metrics,) = trainer.validate(_module(kind, ckpt), data, verbose=False)
        out.update({f"{kind}/{k}": float(v) for k, v in metrics.items() if k in ("val/loss", "val/length")})
        padding += rows.rows
    return {**out, "padding_rows": padding} if devices > 1 else out


def _worker(ckpt: str, data_file: str, out: str, devices: str, *scenarios: str) -> None:
    from lightning_modules.strategies import FSDP2Strategy

    faulthandler.dump_traceback_later(HANG_S, exit=True)
    os.environ["RADVLM_TEST_DEVICES"] = devices
    torch.set_num_threads(1)
    for scenario in scenarios:
        folder = Path(out) / scenario
        folder.mkdir(parents=True, exist_ok=True)
        MISBEHAVE.clear()
        MISBEHAVE["mode"] = {"sft_empty": "empty_first", "grpo_empty": "empty_first", "grpo_drop": "drop_one",
                             "sft_text_only": "text_only", "grpo_text_only": "text_only",
                             "sft_ddp_text_only": "text_only",
                             "sft_val_empty": "empty_val"}.get(scenario)
        _Misbehaving.images_seen = _Misbehaving.val_dropped = 0
        kind = "sft" if "sft" in scenario else "grpo"
        if scenario == "precision":
            info = _precision(ckpt, data_file, folder)
            rank = torch.distributed.get_rank()
        elif scenario == "eval_padding":
            info = _eval_padding_metrics(ckpt, data_file, folder, devices=_world())
            info = {"metrics": {k: v for k, v in info.items() if k != "padding_rows"},
                    "padding_rows": info["padding_rows"]}
            rank = torch.distributed.get_rank()
        elif scenario in ("hybrid_resume", "grpo_resume"):
            info = _resume("sft" if scenario == "hybrid_resume" else "grpo", ckpt, data_file, folder,
                           hybrid=scenario == "hybrid_resume")
            rank = torch.distributed.get_rank()
        elif scenario == "grpo_reward_fail":
            MISBEHAVE["reward_fail"] = True
            _fit(kind, ckpt, data_file, folder, [_Watch(), _ErrorNote(folder)])
            raise AssertionError("the run should have stopped with RewardFailureError")
        else:
            watch = _Watch(watch_batch=1 if scenario == "sft_nan" else None)
            callbacks = [watch] + ([_NaNAt(1)] if scenario == "sft_nan" else [])
            strategy = FSDP2Strategy(hybrid_shard=True, shard_size=2) if scenario.startswith("hybrid") else None
            strategy = "ddp" if "ddp" in scenario else strategy
            val_file = _val_file(data_file, folder) if scenario == "sft_val_empty" else None
            trainer, module = _fit(kind, ckpt, data_file, folder, callbacks, strategy=strategy,
                                   batches=3 if scenario == "sft_nan" else 2, val_file=val_file)
            info = _summary(trainer, module, watch)
            info["images_seen"], info["val_dropped"] = _Misbehaving.images_seen, _Misbehaving.val_dropped
            if val_file:
                info["val_loss"] = float(trainer.callback_metrics["val/loss"])
            mesh = getattr(trainer.strategy, "fsdp_mesh", None)  # None under DDP
            if mesh is not None:
                info["mesh"] = {"shape": list(mesh.shape), "names": list(mesh.mesh_dim_names)}
            rank = trainer.global_rank
        (folder / f"rank{rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    _worker(*sys.argv[1:])

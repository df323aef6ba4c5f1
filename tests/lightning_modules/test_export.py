"""Export of the trained policy as a Hugging Face folder: the LoRA merge by hand and against peft, a
single-process fit, and a real two-process FSDP fit on CPU (gloo).

The FSDP run is this file run as a script (``python test_export.py CKPT DATA OUT``): Lightning's own launcher
starts the second process, as in ``python main.py fit`` on one node. Two things in it are test-only:

- ``CPUFSDPStrategy``: Lightning refuses ``FSDPStrategy`` on the CPU accelerator and hands FSDP
  ``device_id=None``, for which torch then demands an accelerator; torch's FSDP itself runs on CPU with gloo
  when given ``device_id=cpu``, which is all this subclass changes.
- ``AutoOptSFTModule``: the SFT loss with Lightning's automatic optimization. The modules' manual
  optimization calls ``manual_backward`` inside the root FSDP forward (Lightning #19685), which leaves FSDP
  in ``FORWARD_BACKWARD`` so its ``clip_grad_norm_`` refuses to run; the export does not depend on how the
  step was taken.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy

from datamodules.datamodule import RadVLMDataModule
from lightning_modules.sft import SFTModule
from radvlm.policy import LoRASettings, Policy, PolicyConfig, lora_scalings, merge_lora_state_dict

ROOT = Path(__file__).resolve().parents[2]
LORA = LoRASettings(r=4, alpha=8, dropout=0.0)  # s = alpha / r = 2


class CPUFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` that wraps with ``device_id=cpu`` (see the module docstring)."""

    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(model, cpu_offload=self.cpu_offload, sharding_strategy=self.sharding_strategy,
                                         mixed_precision=self.mixed_precision_config, device_id=self.root_device,
                                         **self.kwargs)
        self.kwargs.pop("auto_wrap_policy", None)  # already applied; Lightning drops it for wrapped models too
        return super()._setup_model(model)


class AutoOptSFTModule(SFTModule):
    """The SFT loss under Lightning's automatic optimization (backward after the FSDP forward returns)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = True

    def training_step(self, batch, batch_idx):
        loss_sum, n_tokens = self.policy.sft_loss(batch)
        return loss_sum / max(n_tokens, 1)


def randomize_lora_b(policy: Policy, seed: int = 0) -> None:
    """peft starts B at zero (merge = no-op): give every B random values so the merge is visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def peft_merged_state(policy: Policy) -> dict[str, torch.Tensor]:
    """peft's own merge of a copy of ``policy``'s model, as a plain Hugging Face state dict."""
    return copy.deepcopy(policy.model).merge_and_unload().state_dict()


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)


def exported_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    keys = []
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            keys += list(f.keys())
    return keys


# ---------------------------------------------------------------------------------------------- the merge
def test_merge_lora_state_dict_matches_hand_computed_example():
    # W = [[1, 2], [3, 4]] (out=2, in=2); A = [[1, 0], [1, 1]] (r=2, in=2); B = [[1, 2], [0, 1]] (out=2, r=2)
    # B @ A = [[1·1 + 2·1, 1·0 + 2·1], [0·1 + 1·1, 0·0 + 1·1]] = [[3, 2], [1, 1]]
    # s = alpha / r = 1 / 2  →  W + s·B@A = [[1 + 1.5, 2 + 1], [3 + 0.5, 4 + 0.5]] = [[2.5, 3], [3.5, 4.5]]
    state = {
        "base_model.model.layer.q_proj.base_layer.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        "base_model.model.layer.q_proj.base_layer.bias": torch.tensor([7.0, 8.0]),
        "base_model.model.layer.q_proj.lora_A.default.weight": torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
        "base_model.model.layer.q_proj.lora_B.default.weight": torch.tensor([[1.0, 2.0], [0.0, 1.0]]),
        "base_model.model.lm_head.weight": torch.tensor([[5.0, 6.0]]),
    }
    out = merge_lora_state_dict(state, {"base_model.model.layer.q_proj": 0.5})
    assert sorted(out) == ["layer.q_proj.bias", "layer.q_proj.weight", "lm_head.weight"]
    torch.testing.assert_close(out["layer.q_proj.weight"], torch.tensor([[2.5, 3.0], [3.5, 4.5]]), rtol=0, atol=0)
    assert out["layer.q_proj.bias"] is state["base_model.model.layer.q_proj.base_layer.bias"]  # passed through
    assert out["lm_head.weight"] is state["base_model.model.lm_head.weight"]
    # one number for every layer does the same; the input is left as it was
    torch.testing.assert_close(merge_lora_state_dict(state, 0.5)["layer.q_proj.weight"], out["layer.q_proj.weight"])
    torch.testing.assert_close(state["base_model.model.layer.q_proj.base_layer.weight"],
                               torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_merge_lora_state_dict_refuses_what_it_cannot_merge():
    base = {"m.base_layer.weight": torch.eye(2), "m.lora_A.default.weight": torch.ones(1, 2)}
    with pytest.raises(ValueError, match="lacks 'm.lora_B.default.weight'"):
        merge_lora_state_dict(base, 1.0)
    full = {**base, "m.lora_B.default.weight": torch.ones(2, 1)}
    with pytest.raises(ValueError, match="no LoRA scaling"):
        merge_lora_state_dict(full, {"other": 1.0})
    with pytest.raises(ValueError, match="lora_magnitude_vector"):  # DoRA: not a plain W + s·B@A
        merge_lora_state_dict({**full, "m.lora_magnitude_vector.default.weight": torch.ones(2)}, 1.0)


def test_merge_lora_state_dict_equals_peft_merge_and_unload(tiny_ckpt):
    policy = Policy.from_pretrained(tiny_ckpt, lora=LORA)
    randomize_lora_b(policy)
    scalings = lora_scalings(policy.model)
    assert len(scalings) == 2 * 7 and set(scalings.values()) == {2.0}  # 2 text layers × 7 linears; 8 / 4
    ours = merge_lora_state_dict(policy.model.state_dict(), scalings)
    assert not [k for k in ours if "lora" in k]
    assert_same_state(ours, peft_merged_state(policy))


def test_merged_save_loads_without_lora_and_keeps_the_live_adapters(tiny_ckpt, tmp_path):
    policy = Policy.from_pretrained(tiny_ckpt, lora=LORA)
    randomize_lora_b(policy)
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    policy.save_pretrained(tmp_path / "export", merge_lora=True)
    assert not [k for k in exported_keys(tmp_path / "export") if "lora" in k]
    assert_same_state(Policy.from_pretrained(tmp_path / "export").model.state_dict(), peft_merged_state(policy))
    assert policy.is_lora and lora_scalings(policy.model)  # not unloaded
    assert_same_state(policy.model.state_dict(), before)


# ---------------------------------------------------------------------------------------------- fits
@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from tests.helpers import report_record, write_records

    folder = tmp_path_factory.mktemp("exportdata")
    answers = ["The heart is enlarged.", "No pleural effusion.", "Small left apical pneumothorax."]
    return write_records(folder, [report_record(i, answers[i % 3]) for i in range(8)])


def test_single_process_lora_fit_exports_merged_weights(tiny_ckpt, data_file, tmp_path):
    L.seed_everything(0)
    module = SFTModule(PolicyConfig(str(tiny_ckpt), dtype="float32", lora=LORA),
                       optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), num_generation_samples=0,
                       export_dir=str(tmp_path / "export"))
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[str(data_file)], batch_size=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, data)
    assert not [k for k in exported_keys(tmp_path / "export") if "lora" in k]
    exported = Policy.from_pretrained(tmp_path / "export").model.state_dict()
    assert_same_state(exported, peft_merged_state(module.policy))
    assert module.policy.is_lora and lora_scalings(module.policy.model)  # the module keeps its adapters


def test_fsdp_lora_fit_on_two_cpu_processes_exports_merged_weights(tiny_ckpt, data_file, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), str(tiny_ckpt), str(data_file), str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]

    # both processes ran FSDP over gloo, with the weights sharded
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, info in enumerate(ranks):
        assert info == {**info, "global_rank": r, "world_size": 2, "backend": "gloo", "fsdp": True}
        assert 0 < info["local_numel"] < info["full_numel"]
    assert ranks[0]["global_step"] == 2

    export = tmp_path / "export"
    assert not [k for k in exported_keys(export) if "lora" in k]
    exported = Policy.from_pretrained(export).model.state_dict()

    # reference: the trained LoRA weights (gathered with summon_full_params in the run), merged by peft
    reference = Policy.from_pretrained(tiny_ckpt, lora=LORA)
    reference.model.load_state_dict(torch.load(tmp_path / "trained_lora.pt", weights_only=True), strict=True)
    assert_same_state(exported, peft_merged_state(reference))

    # training moved the adapted linears of the language model (B started at 0) and nothing else
    base = Policy.from_pretrained(tiny_ckpt).model.state_dict()
    moved = {k for k in base if not torch.equal(base[k], exported[k])}
    assert moved and all("language_model" in k and k.endswith("_proj.weight") for k in moved), sorted(moved)


def _fsdp_worker(ckpt: str, data_file: str, out: str) -> None:
    """Two-process FSDP LoRA fit on CPU; run as a script by the test above (and by Lightning for rank 1)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextDecoderLayer

    torch.set_num_threads(1)
    L.seed_everything(0)
    module = AutoOptSFTModule(PolicyConfig(ckpt, dtype="float32", lora=LORA),
                              optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), num_generation_samples=0,
                              export_dir=str(Path(out) / "export"))
    data = RadVLMDataModule(ckpt, train_files=[data_file], batch_size=2)
    strategy = CPUFSDPStrategy(auto_wrap_policy={Qwen3VLTextDecoderLayer}, state_dict_type="full")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=out, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, data)  # on_fit_end writes the export
    wrapped = trainer.strategy.model
    local = sum(p.numel() for p in module.policy.parameters())  # this rank's shard (use_orig_params views)
    full = sum(p.numel() for p in Policy.from_pretrained(ckpt, lora=LORA).parameters())
    info = {"global_rank": trainer.global_rank, "world_size": trainer.world_size,
            "backend": torch.distributed.get_backend(), "wrapper": type(wrapped).__name__,
            "fsdp": isinstance(wrapped, FullyShardedDataParallel), "local_numel": local, "full_numel": full,
            "global_step": trainer.global_step}
    (Path(out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(info))
    # the trained (unmerged) LoRA weights for the reference, gathered apart from the state-dict path under test
    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False, rank0_only=True):
        if trainer.is_global_zero:
            params = {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                      for n, p in module.policy.model.named_parameters()}
            torch.save(params, Path(out) / "trained_lora.pt")


if __name__ == "__main__":
    _fsdp_worker(*sys.argv[1:4])

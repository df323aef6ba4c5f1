"""Weights streamed from an FSDP2-sharded policy into each rank's vLLM (the stand-in), on 2 CPU processes.

This file run as a script under ``torch.distributed.run`` (gloo) shards a LoRA policy and a full one with the
project's ``shard_policy``, builds each rank's ``VLLMEngine`` on ``tests/fake_vllm.py`` (several processes:
``external_launcher``, a seed per rank) and syncs. Each rank checks that its engine holds exactly the merged
full weights (gathered independently with ``get_model_state_dict``) and notes the largest ``load_weights`` call.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

import pytest
import torch

for _folder in (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))
from test_sharded_generation import run_distributed  # noqa: E402

BUCKET_MIB = 1


@pytest.fixture(scope="module")
def synced(tiny_ckpt, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("vllmsync")
    run = run_distributed(Path(__file__), [str(tiny_ckpt), str(out)], nproc=2, timeout=240)
    assert run.returncode == 0, run.stdout[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_streaming_sync_from_fsdp2_shards_gives_the_merged_full_weights(synced, kind):
    for rank, info in enumerate(synced):
        got = info[kind]
        assert got["sharded"] and got["backend"] == "external_launcher" and got["seed"] == 7 + rank
        assert got["missing"] == [] and got["mismatched"] == []  # every weight, equal to the merged full tensor
        assert got["max_call_bytes"] <= max(BUCKET_MIB * 2**20, got["largest_tensor_bytes"])
        assert got["max_call_bytes"] < got["model_bytes"]  # never the whole model at once


def _worker(ckpt: str, out: str) -> None:
    import fake_vllm
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_modules.strategies import shard_policy
    from radvlm.lora import lora_scalings, merge_lora_state_dict
    from radvlm.policy import LoRASettings, PolicyConfig
    from radvlm.vllm_engine import VLLMEngine

    faulthandler.dump_traceback_later(200, exit=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    sys.modules["vllm"] = fake_vllm
    info = {}
    for kind in ("lora", "full"):
        lora = LoRASettings(r=4, alpha=8, dropout=0.0) if kind == "lora" else None
        policy = PolicyConfig(ckpt, dtype="float32", lora=lora).build()
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in policy.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape) * 0.05)
        shard_policy(policy, init_device_mesh("cpu", (dist.get_world_size(),)))
        engine = VLLMEngine(sync_bucket_mib=BUCKET_MIB)
        engine.setup(policy, max_model_len=256, seed=7)
        engine.sync_weights(policy)
        full = get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True))  # every rank
        full = merge_lora_state_dict(full, lora_scalings(policy.model)) if lora else dict(full)
        model = engine.llm.model
        info[kind] = {
            "sharded": type(next(policy.parameters())).__name__ == "DTensor",
            "backend": engine.llm.kwargs.get("distributed_executor_backend"), "seed": engine.llm.kwargs["seed"],
            "missing": sorted(set(model.params) - set(model.loaded)),
            "mismatched": sorted(k for k, v in model.params.items() if not torch.equal(v, full[k].to(v.dtype))),
            "max_call_bytes": model.max_call_bytes,
            "largest_tensor_bytes": max(v.numel() * v.element_size() for v in full.values()),
            "model_bytes": sum(v.numel() * v.element_size() for v in full.values())}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(info))
    dist.destroy_process_group()
    os._exit(0)  # the stand-in's engines hold no threads, but do not wait on interpreter teardown


if __name__ == "__main__":
    _worker(*sys.argv[1:3])

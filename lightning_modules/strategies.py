"""Sharded training of the policy with FSDP2 (``torch.distributed.fsdp.fully_shard``); docs/distributed.md.

Why not Lightning's ``FSDPStrategy`` (FSDP1): it wraps the LightningModule in one root FSDP module and runs
``training_step`` inside that root's forward (Lightning #19685); our manual ``manual_backward`` inside it then
fails at the first ``clip_grad_norm_``.

``FSDP2Strategy`` is Lightning's ``ModelParallelStrategy`` with every process in the data-parallel dimension.
It wraps nothing: the module shards itself in ``configure_model`` (``shard_policy``): one FSDP2 unit per text
decoder layer and vision block, one root unit for the ``Policy`` whose entry points (``sft_loss``,
``token_logprobs``, ``generate``) are registered forward methods. Checkpoints are distributed (a folder of
per-rank shards) unless ``save_distributed_checkpoint=False``.

Precision: every unit gets ``MixedPrecisionPolicy(param_dtype=<compute dtype>, reduce_dtype=float32)``: stored
weights stay float32 master weights (``PolicyConfig.master_dtype``), FSDP gathers them in bf16 for compute,
gradients are reduced and kept in float32, as is AdamW's state. ``hybrid_shard``: a 2-D ``(replicate, shard)``
mesh, sharded inside a node and replicated across nodes, so all-gathers never cross nodes.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

# the Policy methods that enter the model (they do not call one another)
POLICY_FORWARD_METHODS = ("sft_loss", "token_logprobs", "generate")


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` as fully sharded data parallelism over all processes (FSDP2), optionally
    hybrid (shard inside a group of processes, replicate across groups).

    Args:
        save_distributed_checkpoint: checkpoints as folders of per-rank shards (``False``: one full file).
        process_group_backend, timeout: as Lightning's.
        hybrid_shard: shard within a group of ``shard_size`` processes and replicate across the groups (HSDP).
        shard_size: processes per shard group with ``hybrid_shard`` (default: the processes of one node,
            ``trainer.devices``); must divide the world size.
    """

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout, hybrid_shard: bool = False,
                 shard_size: int | None = None) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        if shard_size is not None and not hybrid_shard:
            raise ValueError("FSDP2Strategy: shard_size is only used with hybrid_shard=true")
        if shard_size is not None and shard_size < 1:
            raise ValueError(f"FSDP2Strategy: shard_size must be ≥ 1, got {shard_size}")
        self.hybrid_shard = bool(hybrid_shard)
        self.shard_size = shard_size
        self._fsdp_mesh: Any = None

    def setup_environment(self) -> None:
        # "auto" would mean one data-parallel group per node (tensor parallel inside a node): use them all
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
        self._fsdp_mesh = self._build_fsdp_mesh()

    @property
    def fsdp_mesh(self) -> Any:
        """The mesh ``fully_shard`` shards over: 1-D (all processes), or 2-D ``(replicate, shard)``."""
        return self._fsdp_mesh

    def _build_fsdp_mesh(self) -> Any:
        if not self.hybrid_shard:
            return self.device_mesh["data_parallel"]
        from torch.distributed.device_mesh import init_device_mesh

        replicas, shard = hybrid_mesh_shape(self.world_size, self.shard_size or self.num_processes)
        return init_device_mesh(self.root_device.type, (replicas, shard), mesh_dim_names=("replicate", "shard"))


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def hybrid_mesh_shape(world_size: int, shard_size: int) -> tuple[int, int]:
    """``(replicas, shard_size)`` of a hybrid mesh; e.g. 32 processes, 4 per node → (8, 4)."""
    if shard_size < 1 or world_size % shard_size:
        raise ValueError(f"FSDP2Strategy: shard_size={shard_size} does not divide the world size {world_size}")
    return world_size // shard_size, shard_size


def precision_policy(policy: nn.Module) -> Any:
    """FSDP2's ``MixedPrecisionPolicy`` for ``policy``: gather in its ``compute_dtype`` (``None``: the stored
    dtype), reduce gradients in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=getattr(policy, "compute_dtype", None), reduce_dtype=torch.float32)


def shard_policy(policy: nn.Module, mesh: Any) -> None:
    """Shard ``policy`` (a ``radvlm.policy.Policy``) in place over ``mesh`` (FSDP2): 1-D = fully sharded,
    2-D ``(replicate, shard)`` = hybrid; with ``precision_policy(policy)`` on every unit."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextDecoderLayer, Qwen3VLVisionBlock

    if is_sharded(policy):
        return
    mp = precision_policy(policy)
    for module in list(policy.modules()):
        if isinstance(module, (Qwen3VLTextDecoderLayer, Qwen3VLVisionBlock)):
            fully_shard(module, mesh=mesh, mp_policy=mp)
    fully_shard(policy, mesh=mesh, mp_policy=mp)
    for name in POLICY_FORWARD_METHODS:
        register_fsdp_forward_method(policy, name)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of ``module`` on CPU, on global rank 0 (``{}`` elsewhere); a collective
    every rank must enter. Keys as ``module.state_dict()``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

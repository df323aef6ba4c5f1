"""Sharded training of the policy with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Why not Lightning's ``FSDPStrategy`` (FSDP1): it wraps the whole LightningModule in one root FSDP module and
runs ``training_step`` inside that root's forward (Lightning #19685). Our modules use manual optimization and
call ``manual_backward`` inside ``training_step``, i.e. during the root's "forward": FSDP1's root handle stays
in ``FORWARD_BACKWARD`` and ``clip_grad_norm_`` (or the post-backward hook) fails at the first step.

``FSDP2Strategy`` is Lightning's ``ModelParallelStrategy`` with every process in the data-parallel dimension
(no tensor parallelism). That strategy wraps nothing: ``training_step`` is a plain call, and the module shards
itself in ``configure_model`` (``PolicyModule.configure_model`` → ``shard_policy``). Checkpoints are
distributed checkpoints (a folder with one shard file per rank) unless ``save_distributed_checkpoint=False``.

``shard_policy`` makes one FSDP2 unit of every text decoder layer and vision block and one root unit of the
``Policy`` itself (embeddings, final norm, ``lm_head``, vision patch embedding and mergers). The policy's
entry points (``sft_loss``, ``token_logprobs``, ``generate``, ``forward``) are the root's forward methods, so
the root parameters are gathered for exactly the duration of each call, however the call reaches into the
Hugging Face model (``hf_model.model(...)`` and ``lm_head`` separately, ``hf_model.generate``).
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
    """``ModelParallelStrategy`` as plain fully sharded data parallelism over all processes (FSDP2)."""

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)

    def setup_environment(self) -> None:
        # "auto" would mean one data-parallel group per node (tensor parallel inside a node): use them all
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard_policy(policy: nn.Module, mesh: Any) -> None:
    """Shard ``policy`` (a ``radvlm.policy.Policy``) in place over the 1-D data-parallel ``mesh`` (FSDP2)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextDecoderLayer, Qwen3VLVisionBlock

    if is_sharded(policy):
        return
    for module in list(policy.modules()):
        if isinstance(module, (Qwen3VLTextDecoderLayer, Qwen3VLVisionBlock)):
            fully_shard(module, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    for name in POLICY_FORWARD_METHODS:
        register_fsdp_forward_method(policy, name)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of ``module`` on CPU, on global rank 0 (``{}`` elsewhere); a collective
    every rank must enter. Keys as ``module.state_dict()``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

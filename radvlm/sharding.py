"""What the core needs to know about FSDP2-sharded modules: whole weights for decoding, and dtype roles.

- ``whole_weights(module)``: every FSDP2 unit inside ``module`` is all-gathered once on entry and kept whole
  until exit, so a decode loop of any length runs without a single collective (FSDP2 would otherwise gather
  and free each decoder layer for every generated token). Each process can then stop at its own length: no
  ``synced_gpus``. The gathered weights are in the unit's ``MixedPrecisionPolicy.param_dtype`` (bf16 under
  the real configs): about 2 bytes a parameter for the duration of the block (16 GiB at 8B).
- ``apply_master_dtype(model, master, compute)``: trainable parameters in the master dtype (float32: what
  the optimizer updates and keeps state for), frozen ones in the compute dtype (bf16: nothing updates them).

torch only; no Lightning here (``lightning_modules.strategies`` does the sharding itself).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def fsdp2_units(module: nn.Module) -> list[nn.Module]:
    """The FSDP2 units (``FSDPModule`` s) inside ``module``, itself included, in ``modules()`` order."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def _reshards_after_forward(unit: nn.Module) -> bool:
    groups = unit._get_fsdp_state()._fsdp_param_groups
    return any(g.post_forward_mesh_info is not None for g in groups)


@contextlib.contextmanager
def whole_weights(module: nn.Module) -> Iterator[int]:
    """Inside the block every FSDP2 unit of ``module`` holds its whole (unsharded) weights and keeps them
    across forward calls; on exit they are freed and the units shard again after each forward as before.

    A collective: every process must enter it (one all-gather per unit on entry, none inside). Re-entrant
    (a nested block does nothing). Yields the number of units gathered (0: not sharded, nothing done).
    """
    units = fsdp2_units(module)
    if not units or getattr(module, "_radvlm_whole", False):
        yield 0
        return
    if units[0] is module:  # the root's lazy init (normally in its first forward) sets up the gathers
        module._get_fsdp_state()._lazy_init()
    before = [_reshards_after_forward(u) for u in units]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    module._radvlm_whole = True
    try:
        for unit in units:
            unit.unshard()
        yield len(units)
    finally:
        module._radvlm_whole = False
        for unit, reshard in zip(units, before):
            unit.reshard()
            unit.set_reshard_after_forward(reshard, recurse=False)


def local_dtype(param: torch.Tensor) -> torch.dtype:
    """The storage dtype of a parameter (the local shard's for a DTensor)."""
    return param.to_local().dtype if hasattr(param, "to_local") else param.dtype


def apply_master_dtype(model: nn.Module, master: torch.dtype, compute: torch.dtype) -> dict[str, int]:
    """Trainable parameters → ``master`` dtype, frozen parameters → ``compute`` dtype, in place (before the
    optimizer is built and before sharding). Returns the number of elements in each role.

    Example: LoRA r=16 on a bf16 model with ``master=float32``: the adapters become float32 (optimizer state
    float32), the frozen base stays bfloat16.
    """
    counts = {"trainable": 0, "frozen": 0}
    for p in model.parameters():
        want = master if p.requires_grad else compute
        if p.dtype != want:
            p.data = p.data.to(want)
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
    return counts

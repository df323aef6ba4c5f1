"""Decisions every process takes alike (``RankAgreement``, mixed into ``lightning_modules.common.PolicyModule``;
docs/distributed.md): a per-rank decision that changes the sequence of collectives is taken on values reduced
across the ranks, and a rank with an empty batch borrows another's to run with zero weight.
"""

from __future__ import annotations

from typing import Any

import torch


class RankAgreement:
    """All-reduces and all-gathers of small values (``agree_all``, ``gather_values``, ``agreed_max``) and the
    shared batch of an empty rank (``shared_batch``); uses the module's ``trainer``, ``device`` and ``global_rank``
    (a single process without a trainer)."""

    @property
    def world(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def agree_all(self, flag: bool) -> bool:
        """``True`` on every process iff ``flag`` is ``True`` on every process (one all-reduce when
        distributed): a decision that skips or reshapes work is taken on it, never on a local value."""
        if self.world <= 1:
            return bool(flag)
        return bool(self.trainer.strategy.reduce_boolean_decision(bool(flag), all=True))

    def gather_values(self, values: list[float]) -> torch.Tensor:
        """``values`` of every process as a ``(world, len(values))`` float64 tensor, the same on every process
        (one all-gather); ``(1, n)`` in a single process. Every process must pass as many values."""
        local = torch.tensor([values], dtype=torch.float64, device=self.device)  # (1, n)
        if self.world <= 1:
            return local.cpu()
        return self.trainer.strategy.all_gather(local).reshape(self.world, len(values)).cpu()

    def agreed_max(self, counts: list[int]) -> list[int]:
        """Element-wise maximum over the processes of ``counts`` (lists may differ in length: shorter ones count
        as 0 beyond their end): two all-gathers when distributed."""
        if self.world <= 1:
            return list(counts)
        length = int(self.gather_values([float(len(counts))]).max())
        padded = list(counts) + [0] * (length - len(counts))
        return [int(v) for v in self.gather_values([float(c) for c in padded]).max(0).values] if length else []

    def shared_batch(self, batch: dict[str, Any]) -> tuple[dict[str, Any] | None, bool]:
        """``(batch to run, is_filler)``. Single process: ``(None, False)`` for an empty batch (skipped).
        Distributed: ``(None, False)`` everywhere when every process's batch is empty; otherwise a process whose
        batch is empty (every sample over ``max_length``) receives the batch of the first process that has one,
        to run with zero weight (``is_filler``), so every process makes the same passes and collectives."""
        empty = bool(batch.get("empty"))
        if self.world <= 1:
            return (None if empty else batch), False
        flags = self.gather_values([float(empty)])[:, 0]  # (world,)
        if bool(flags.all()):
            return None, False
        if not bool(flags.any()):
            return batch, False
        donor = int((flags == 0).nonzero()[0])
        sent = _to_device(batch, "cpu") if self.global_rank == donor else None
        received = self.trainer.strategy.broadcast(sent, src=donor)  # CPU tensors: no device of the donor's
        if not empty:
            return batch, False
        filler = _to_device(received, self.device)
        filler["n_dropped"] = batch.get("n_dropped", 0)
        return filler, True


def _to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """A shallow copy of ``batch`` with its tensors (also one level down, e.g. SFT's ``prompt``) on ``device``."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device)
        elif isinstance(value, dict):
            out[key] = _to_device(value, device)
        else:
            out[key] = value
    return out

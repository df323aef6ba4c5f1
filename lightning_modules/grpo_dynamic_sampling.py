"""DAPO dynamic sampling in ``GRPOModule`` (``DynamicSamplingCollection``, docs/dynamic_sampling.md): informative
groups collected over generation batches until every process holds a full training batch, the rest carried to the
next step, and the held groups saved in and restored from checkpoints.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from radvlm import grpo
from radvlm.rewards import RewardResult
from radvlm.rollout import Rollout


class DynamicSamplingCollection:
    """The dynamic-sampling buffer of ``GRPOModule`` (``_collect``) and its checkpoint entries; uses the module's
    ``dynamic_sampling`` settings and its ``_ds_groups``, ``_ds_gen_batches``, ``_ds_failed`` state."""

    def _ds_target(self) -> int:
        """Informative groups per process per training step: ``batch_groups``, else the data ``batch_size``."""
        ds = self.dynamic_sampling
        if ds.batch_groups is not None:
            return int(ds.batch_groups)
        data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        per_rank = getattr(getattr(data, "hparams", None), "batch_size", None)
        if per_rank is None:
            raise ValueError("dynamic_sampling: the data module has no batch_size; set dynamic_sampling.batch_groups")
        return int(per_rank)

    def _collect(self, rollout: Rollout, result: RewardResult, filler: bool) -> tuple[Rollout, RewardResult] | None:
        """Dynamic sampling: this rollout's informative groups (``radvlm.grpo.informative_groups`` on the outcome
        terms; none for a ``filler`` batch) join the held ones; when every process holds a full batch (one
        all-gather, ``radvlm.grpo.groups_to_take``; the cap raises on every process alike) the oldest train as one
        rollout with their rewards and the rest are carried (``radvlm.grpo.split_buffer``); otherwise ``None``."""
        ds = self.dynamic_sampling
        g = rollout.num_generations
        n_groups = len(rollout) // g
        if filler:
            kept: list[int] = []
        else:
            outcomes = torch.stack([result.values[name].float() for name in ds.names])  # (T, B*G)
            keep = grpo.informative_groups(outcomes, g, ds.min_std)  # (B,)
            kept = [i for i in range(n_groups) if bool(keep[i])]
            for name, count in result.failed.items():
                self._ds_failed[name] = self._ds_failed.get(name, 0) + int(count)
            self.log("train/dynamic_sampling/kept_frac", len(kept) / max(n_groups, 1), on_step=True, on_epoch=False)
        cpu = rollout.to("cpu")
        for i in kept:
            rows = slice(i * g, (i + 1) * g)
            self._ds_groups.append({"rollout": cpu.groups([i]), "total": result.total[rows].float().cpu(),
                                    "values": {k: v[rows].float().cpu() for k, v in result.values.items()},
                                    "closed": result.closed[rows].cpu()})
        self._ds_gen_batches += 1
        target = self._ds_target()
        held = [int(c) for c in self.gather_values([float(len(self._ds_groups))])[:, 0].tolist()]  # (world,)
        take = grpo.groups_to_take(held, target, self._ds_gen_batches, ds.max_gen_batches, ds.names)
        if not take:
            return None
        max_carried = target if ds.max_carried is None else ds.max_carried
        now, carried, dropped = grpo.split_buffer(len(self._ds_groups), take, max_carried)
        groups = [self._ds_groups[i] for i in now]
        self._ds_groups = [self._ds_groups[i] for i in carried]
        log = lambda name, value: self.log(name, float(value), on_step=True, on_epoch=False)  # noqa: E731
        log("train/dynamic_sampling/gen_batches", self._ds_gen_batches)
        log("train/dynamic_sampling/carried", len(carried))
        log("train/dynamic_sampling/dropped", dropped)
        failed, self._ds_gen_batches, self._ds_failed = self._ds_failed, 0, {}
        joined = Rollout.concat([x["rollout"] for x in groups], self.policy.pad_token_id).to(self.device)
        cat = lambda key: torch.cat([x[key] for x in groups])  # noqa: E731
        values = {k: torch.cat([x["values"][k] for x in groups]) for k in groups[0]["values"]}
        return joined, RewardResult(total=cat("total"), values=values, failed=failed, closed=cat("closed"))

    def _save_dynamic_sampling(self, checkpoint: dict[str, Any]) -> None:
        """The held dynamic-sampling groups of every process (one all-gather of objects when distributed):
        a run resumed in the middle of a refill trains on the same groups."""
        if self.dynamic_sampling is None:
            return
        state = {"gen_batches": self._ds_gen_batches, "failed": dict(self._ds_failed),
                 "groups": [{**x, "rollout": {f.name: getattr(x["rollout"], f.name)
                                              for f in dataclasses.fields(Rollout)}} for x in self._ds_groups]}
        states = [state]
        if self.world > 1:
            states = [None] * self.world
            torch.distributed.all_gather_object(states, state)
        checkpoint["radvlm"]["dynamic_sampling"] = states  # one entry per process, in rank order

    def _load_dynamic_sampling(self, checkpoint: dict[str, Any]) -> None:
        """This process's held dynamic-sampling groups back from the checkpoint (``_save_dynamic_sampling``)."""
        states = checkpoint.get("radvlm", {}).get("dynamic_sampling")
        if states and self.dynamic_sampling is None:
            held = sum(len(st["groups"]) for st in states)
            if held:
                warnings.warn(f"the checkpoint holds {held} dynamic-sampling group(s); dynamic_sampling is off in "
                              f"this run, so they are not trained", UserWarning, stacklevel=2)
        if not states or self.dynamic_sampling is None:
            return
        rank, world = (self.global_rank, self.world) if self._trainer is not None else (0, 1)
        if len(states) == world:
            mine = states[rank]
        else:  # another number of processes: the held groups dealt out in turn (not a bitwise resume)
            pooled = [x for st in states for x in st["groups"]]
            warnings.warn(f"dynamic sampling: the checkpoint holds the groups of {len(states)} processes, this run "
                          f"has {world}; its {len(pooled)} held groups are dealt out in turn", UserWarning, stacklevel=2)
            mine = {"gen_batches": max(st["gen_batches"] for st in states), "failed": {}, "groups": pooled[rank::world]}
        self._ds_gen_batches = int(mine["gen_batches"])
        self._ds_failed = dict(mine["failed"])
        self._ds_groups = [{**x, "rollout": Rollout(**x["rollout"])} for x in mine["groups"]]

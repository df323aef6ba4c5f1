"""The rewards and advantages of a GRPO step (``GRPORewards``, mixed into ``lightning_modules.grpo.GRPOModule``):
rewards computed in place or in a thread of their own, the run stopped on every process alike when too many are
unavailable, and the advantage estimator fed each term's signed value.
"""

from __future__ import annotations

import contextlib

import torch

from radvlm import grpo
from radvlm.rewards import RewardResult, RewardTerm, compute_rewards
from radvlm.rollout import Rollout


class RewardFailureError(RuntimeError):
    """Too large a fraction of rewards could not be computed."""


class GRPORewards:
    """Rewards (``_rewards``, ``_start_rewards``) and advantages (``_advantages``) of ``GRPOModule``; uses the
    module's ``rewards``, ``advantage``, ``hparams`` and rank agreement."""

    def _start_rewards(self, rollout: Rollout):
        """The rollout's rewards computed in a thread of their own (a CUDA stream of its own on GPU); the
        future's ``result()`` is ``compute_rewards``'s. Nothing in it is a collective or logs."""
        from concurrent.futures import ThreadPoolExecutor

        if self._reward_pool is None:
            self._reward_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="radvlm-rewards")
        device = self.device
        lengths = rollout.completion_mask.sum(-1).tolist()  # (B*G,) token counts (OverlongPenalty)

        def score() -> RewardResult:
            stream = torch.cuda.stream(torch.cuda.Stream(device)) if device.type == "cuda" else contextlib.nullcontext()
            with stream:
                return compute_rewards(self.rewards, rollout.texts, rollout.targets, rollout.tasks, rollout.thinking,
                                       timeout=self.hparams.reward_timeout, lengths=lengths)

        return self._reward_pool.submit(score)

    def _rewards(self, rollout: Rollout, filler: bool = False, computed=None) -> RewardResult:
        """Rewards of the rollout (none computed for a ``filler`` batch: zeros, never trained on; ``computed``:
        the future of ``_start_rewards``). Whether the run stops on unavailable rewards is decided on every
        process's fraction (one all-gather), so all stop together with the same ``RewardFailureError``."""
        hp = self.hparams
        n = len(rollout)
        if filler:
            result = RewardResult(total=torch.zeros(n), values={}, failed={}, closed=torch.ones(n, dtype=torch.bool))
        elif computed is not None:
            result = computed.result()
        else:
            result = compute_rewards(self.rewards, rollout.texts, rollout.targets, rollout.tasks, rollout.thinking,
                                     timeout=hp.reward_timeout, lengths=rollout.completion_mask.sum(-1).tolist())
        unavailable = float(result.unavailable.float().mean()) if n else 0.0
        if not filler:
            self.log("train/reward_unavailable_frac", unavailable, on_step=True, on_epoch=False)
        names = list(dict.fromkeys(t.name for t in self.rewards))
        shared = self.gather_values([unavailable] + [float(result.failed.get(k, 0)) for k in names])  # (world, 1+T)
        fractions = shared[:, 0]  # (world,)
        if bool((fractions > hp.max_unavailable_fraction).any()):
            worst = int(fractions.argmax())
            where = f" on rank {worst} (per rank: {[round(float(f), 3) for f in fractions]})" if self.world > 1 else ""
            failed = {k: int(v) for k, v in zip(names, shared[:, 1:].sum(0).tolist())}
            raise RewardFailureError(
                f"{float(fractions[worst]):.0%} of the rewards of batch {self.batches_trained} could not be computed"
                f"{where} (training batches counted from 1 as the progress line counts them; "
                f"{self.global_step} optimizer steps done; limit max_unavailable_fraction="
                f"{hp.max_unavailable_fraction}); failures per term"
                f"{' over all ranks' if self.world > 1 else ''}: {failed}"
            )
        return result

    def _advantages(self, rollout: Rollout, rewards: torch.Tensor, result: RewardResult | None = None):
        """Advantages (B*G,) of the ``advantage`` estimator, group reward std (B,), the loss mask (B*G, C) and
        the rows that train. The estimator sees each term's signed value (B*G, K) and weight (K,) too."""
        hp = self.hparams
        g = rollout.num_generations
        values, weights = term_matrix(self.rewards, result, rewards)  # (B*G, K), (K,)
        advantages = self.advantage(rewards, g, values, weights).to(rewards.device)  # (B*G,)
        group_std = grpo.group_reward_std(rewards, g)  # (B,)
        mask = rollout.completion_mask  # (B*G, C)
        if hp.mask_truncated_completions:
            mask = mask * (~rollout.truncated).unsqueeze(1).to(mask.dtype)
        keep_groups = group_std > 0  # (B,) groups with signal (NaN std → False)
        rows = list(range(rewards.numel()))
        # Several processes must run the same number of forward/backward passes (gradient all-reduce, FSDP
        # all-gathers): there, filtered or fully masked rows stay in the micro-batches with a zero mask (no
        # loss, not counted by the aggregation); a single process skips them.
        distributed = self._is_distributed()
        if hp.filter_zero_std_groups:
            if distributed:
                mask = mask * keep_groups.repeat_interleave(g).unsqueeze(1).to(mask.dtype)  # (B*G, C)
            else:
                rows = [r for r in rows if bool(keep_groups[r // g])]
        self._keep_empty_rows = distributed
        return advantages, group_std, mask, rows


def term_matrix(terms: list[RewardTerm], result: RewardResult | None,
                rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each reward term's signed value ``sign · value`` as ``(B*G, K)`` (NaN where the term does not score the
    row or failed) and the terms' weights ``(K,)``, float32 on the device of ``rewards``; without per-term
    values (a filler batch) the total as one term of weight 1. Terms of one name share a column
    (``compute_rewards`` keys its values by name)."""
    if result is None or not result.values:
        return rewards.float().unsqueeze(1), torch.ones(1, device=rewards.device)
    names = list(dict.fromkeys(t.name for t in terms))
    by_name = {t.name: t for t in terms}
    values = torch.stack([by_name[k].sign * result.values[k].to(rewards.device, torch.float32) for k in names], 1)
    weights = torch.tensor([by_name[k].weight for k in names], dtype=torch.float32, device=rewards.device)
    return values, weights

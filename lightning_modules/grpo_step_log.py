"""The logged scalars and sample table of one GRPO training step (``GRPOStepLog``, mixed into
``lightning_modules.grpo.GRPOModule``): rewards per term and task, advantages, lengths, timings, memory.
"""

from __future__ import annotations

import torch

from radvlm.chat import split_thinking


class GRPOStepLog:
    """``_log_step``: what ``GRPOModule.training_step`` logs (``train/*``, ``time/*``, ``memory/*``)."""

    def _log_step(self, batch, gen, result, rewards, advantages, group_std, mask, stats, times) -> None:
        g = self.hparams.num_generations
        log = lambda name, value: self.log(name, float(value), on_step=True, on_epoch=False)  # noqa: E731
        valid = rewards[~torch.isnan(rewards)]
        if valid.numel():
            log("train/reward_mean", valid.mean())
            log("train/reward_std", valid.std() if valid.numel() > 1 else 0.0)
        for name, values in result.values.items():
            v = values[~torch.isnan(values)]
            if v.numel():
                log(f"train/reward/{name}", v.mean())
            log(f"train/reward_failed/{name}", result.failed.get(name, 0))
        tasks = [t for t in batch["tasks"] for _ in range(g)]
        for task in sorted(set(tasks)):
            idx = torch.tensor([t == task for t in tasks], device=rewards.device)
            v = rewards[idx & ~torch.isnan(rewards)]
            if v.numel():
                log(f"train/reward_task/{task}", v.mean())
        log("train/zero_std_group_frac", (~(group_std > 0)).float().mean())
        log("train/advantage_mean", advantages.mean())
        log("train/advantage_abs_mean", advantages.abs().mean())
        lengths = gen.completion_mask.sum(-1).float()  # (B*G,)
        log("train/completion_len_mean", lengths.mean())
        log("train/completion_len_min", lengths.min())
        log("train/completion_len_max", lengths.max())
        log("train/truncated_frac", gen.truncated.float().mean())
        if any(batch["thinking"]):
            log("train/think_closed_frac", result.closed.float().mean())
            parts = [split_thinking(t) for t in gen.texts]
            log("train/think_chars_mean", sum(len(p[0]) for p in parts) / len(parts))
            log("train/answer_chars_mean", sum(len(p[1]) for p in parts) / len(parts))
        for k, v in stats.items():
            log(f"train/{k}", v)
        for k, v in times.items():
            log(f"time/{k}_s", v)
        total = sum(times.values())
        log("time/step_s", total)
        log("train/tokens_per_s", float(mask.sum()) / max(total, 1e-9))
        if self.device.type == "cuda":  # peak of this step (reset for the next one)
            log("memory/peak_gib", torch.cuda.max_memory_allocated(self.device) / 2**30)
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.log_text_samples and self.hparams.num_logged_samples > 0:
            n = min(self.hparams.num_logged_samples, len(gen.texts))
            rows = [{"id": batch["ids"][i // g], "completion": gen.texts[i], "reward": f"{float(rewards[i]):.3f}"}
                    for i in range(n)]
            self.text_table("train/samples", rows)

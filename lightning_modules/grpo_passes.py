"""The log-prob passes and optimizer updates of a GRPO step (``GRPOPasses``, mixed into
``lightning_modules.grpo.GRPOModule``): π_old and reference log-probs without gradient, micro-batching by rows and
tokens, and the ``ppo_epochs`` × mini-batch updates, each process making as many passes as the one with the most.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from radvlm import grpo
from radvlm.batch import select_rows


class GRPOPasses:
    """The forward/backward passes of ``GRPOModule`` over a rollout batch (``_rollout_logprobs``, ``_update``);
    uses the module's ``policy``, ``reference_model``, ``hparams``, ``loss_fn`` and rank agreement."""

    @property
    def packed(self) -> bool:
        """Whether the log-prob passes pack their rows (``packed_logprobs``; ``None``: under a varlen kernel)."""
        if self.packed_logprobs is not None:
            return bool(self.packed_logprobs)
        return uses_varlen_attention(self.policy.hf_model)

    @property
    def shared_prefix(self) -> bool:
        """Whether the passes without gradient (π_old, reference) compute each prompt once (a KV cache)."""
        return self.shared_prefix_logprobs and not self.packed and not torch.is_grad_enabled()

    def _logprobs(self, batch: dict[str, Any], mask: torch.Tensor, entropy: bool = False, entropy_grad: bool = False):
        return self.policy.token_logprobs(batch, mask, temperature=self.hparams.temperature,
                                          return_entropy=entropy, entropy_grad=entropy_grad, packed=self.packed,
                                          shared_prefix=self.shared_prefix)

    @torch.no_grad()
    def _reference_logprobs(self, batch: dict[str, Any], mask: torch.Tensor) -> torch.Tensor:
        if self.policy.is_lora:
            with self.policy.reference():
                return self._logprobs(batch, mask)
        return self.reference_model.token_logprobs(batch, mask, temperature=self.hparams.temperature,
                                                   packed=self.packed, shared_prefix=self.shared_prefix)

    def _is_distributed(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1

    def _micro_batches(self, rows: list[int], lengths: torch.Tensor | None = None) -> list[list[int]]:
        """``rows`` in micro-batches of at most ``micro_batch_size`` rows and, with ``micro_batch_tokens``
        and ``lengths`` (B*G,) (each row's real tokens), at most that many padded tokens, rows of similar
        length together (``radvlm.grpo.token_micro_batches``)."""
        budget = self.hparams.get("micro_batch_tokens")
        lens = [int(lengths[r]) for r in rows] if lengths is not None and budget else [0] * len(rows)
        return grpo.token_micro_batches(rows, lens, self.hparams.micro_batch_size, budget if lengths is not None else None)

    @torch.no_grad()
    def _no_grad_logprobs(self, batch: dict[str, Any], mask: torch.Tensor, rows: list[int], reference: bool):
        """π_old or reference log-probs (N, C), in eval mode (no dropout: on-policy ratios are exactly 1), in
        as many forward passes as the process with the most micro-batches makes (the others repeat a row of
        theirs and discard it: every pass gathers weights under FSDP)."""
        out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)  # (N, C)
        fn = self._reference_logprobs if reference else self._logprobs
        micro = self._micro_batches(rows, batch["attention_mask"].sum(-1))
        passes = self.agreed_max([len(micro)])[0] if self._is_distributed() else len(micro)
        with eval_mode(self.policy, self.reference_model):
            for k in range(passes):
                mb = micro[k] if k < len(micro) else None
                value = fn(select_rows(batch, mb or [0]), mask[mb or [0]])
                if mb is not None:
                    out[mb] = value.float()
        return out

    def _mini_batches(self, num_prompts: int) -> list[list[int]]:
        g = self.hparams.num_generations
        world = max(1, self.trainer.world_size if self._trainer is not None else 1)
        per_update = self.hparams.ppo_mini_batch_size
        per_update = num_prompts if per_update is None else max(1, per_update // world)
        prompts = list(range(num_prompts))
        return [[p * g + j for p in prompts[i : i + per_update] for j in range(g)]
                for i in range(0, num_prompts, per_update)]

    def _rollout_logprobs(self, model_batch: dict[str, Any], mask: torch.Tensor, rows: list[int],
                          updates: list[list[int]], need_old: bool = False,
                          ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """π_old log-probs (``None`` with a single update per rollout batch, unless ``need_old``: π_old = π_θ,
        detached current log-probs are used) and reference log-probs (``None`` when ``beta`` is 0), each
        (B*G, C)."""
        n_updates = self.agreed_max([len(updates)])[0] if self._is_distributed() else len(updates)
        single_update = n_updates == 1 and self.hparams.ppo_epochs == 1 and not need_old
        old = None if single_update else self._no_grad_logprobs(model_batch, mask, rows, reference=False)
        ref = self._no_grad_logprobs(model_batch, mask, rows, reference=True) if self.hparams.beta > 0 else None
        return old, ref

    def _update(self, rollout, mask, advantages, old_logp, ref_logp, updates, allowed: set[int],
                weights: torch.Tensor | None = None) -> dict:
        hp = self.hparams
        loss_fn = self.loss_fn
        agg_kw = {"agg": loss_fn.agg, "max_len": hp.max_new_tokens}
        sums: dict[str, float] = {}
        count = 0
        plan = self._update_plan(updates, allowed, mask, rollout["attention_mask"].sum(-1))
        for _ in range(hp.ppo_epochs):
            for micro in plan:
                if not micro:
                    continue
                rows = [r for mb in micro if mb is not None for r in mb]
                den = grpo.aggregation_denominator(mask[rows], loss_fn.agg) if rows else None
                finite = True
                for mb in micro:
                    if mb is None:  # a pass another process makes: the same graph, zero loss
                        logp = self._logprobs(select_rows(rollout, [0]), mask[[0]])  # (1, C)
                        self.manual_backward(logp.sum() * 0.0)
                        continue
                    sub = select_rows(rollout, mb)
                    # the entropy carries its gradient only for an entropy bonus (loss.entropy_coeff ≠ 0)
                    logp, entropy = self._logprobs(sub, mask[mb], entropy=True,
                                                   entropy_grad=loss_fn.needs_entropy)  # (n, C), (n, C)
                    old = logp.detach() if old_logp is None else old_logp[mb]
                    loss, st = loss_fn(logp, old, advantages[mb], mask[mb], max_len=hp.max_new_tokens,
                                       denominator=den, token_weights=None if weights is None else weights[mb],
                                       entropy=entropy)
                    if ref_logp is not None:
                        kl = grpo.kl_k3(logp, ref_logp[mb], mask[mb])  # (n, C)
                        kl_term = grpo.aggregate(kl, mask[mb], denominator=den, **agg_kw)
                        loss = loss + hp.beta * kl_term
                        st["kl"] = grpo.masked_mean(kl.detach(), mask[mb])
                    st["entropy"] = grpo.masked_mean(entropy.detach(), mask[mb])
                    # backward even when non-finite: every process must join the gradient all-reduce; the
                    # non-finite gradient norm then makes all of them skip the step together
                    finite = finite and bool(torch.isfinite(loss))
                    self.manual_backward(loss)
                    for k, v in st.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                    count += 1
                self.log_lr()
                self.guarded_step(loss_finite=finite)
        return {k: v / max(count, 1) for k, v in sums.items()}

    def _update_plan(self, updates: list[list[int]], allowed: set[int], mask: torch.Tensor,
                     lengths: torch.Tensor | None = None) -> list[list[Any]]:
        """The micro-batches (row lists) of each optimizer update. A single process drops rows that cannot
        train. Distributed, every process makes as many updates and, in each, as many forward/backward passes
        as the process with the most (one agreement): missing passes are ``None`` (run on a row of this
        process with zero loss), so FSDP's gathers and reductions match on every process."""
        plan = []
        for rows in updates:
            rows = [r for r in rows if r in allowed and (self._keep_empty_rows or bool(mask[r].any()))]
            plan.append(self._micro_batches(rows, lengths) if rows else [])
        if not self._is_distributed():
            return plan
        counts = self.agreed_max([len(p) for p in plan])  # (updates,) the most passes of any process
        plan += [[] for _ in range(len(counts) - len(plan))]
        return [p + [None] * (c - len(p)) for p, c in zip(plan, counts)]


def uses_varlen_attention(hf_model: nn.Module) -> bool:
    """Whether the model's attention runs packed rows without a dense mask (Flash Attention's varlen kernels)."""
    impl = str(getattr(getattr(hf_model, "config", None), "_attn_implementation", "") or "")
    return "flash" in impl


@contextlib.contextmanager
def eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """``modules`` in eval mode inside the block (dropout off, LoRA dropout included), their own modes after."""
    present = [m for m in modules if m is not None]
    modes = [[(sub, sub.training) for sub in m.modules()] for m in present]
    for m in present:
        m.eval()
    try:
        yield
    finally:
        for saved in modes:
            for sub, training in saved:
                sub.train(training)

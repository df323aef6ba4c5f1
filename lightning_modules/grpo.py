"""``GRPOModule``: GRPO with clinically grounded rewards (RadVLM-GRPO, docs/paper.md §2), manual optimization.

One training step (``GRPOModule.training_step``): rollouts, rewards, group advantages, π_old and reference
log-probs, then ``ppo_epochs`` × mini-batch optimizer updates.

Paper settings (configs/grpo_report.yaml): G = 8, 512 prompts per step, mini-batch 128 prompts (4 updates),
lr 1e-6 constant, β = 0.01 k3 as a loss, ε 0.20/0.28, dual clip 3, token-mean, temperature 1.

Deviations (data-parallel runs; details in ``GRPOModule``): ``ppo_mini_batch_size`` is divided by the world
size and each rank aggregates over its own tokens; filtered rows and non-finite losses still run forward and
backward, so every rank makes the same passes. With ``dynamic_sampling`` (DAPO) a data batch may only generate:
informative groups are collected until every rank holds a full batch (docs/dynamic_sampling.md).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
import warnings
from typing import Any, Iterator

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from datamodules.collate import PromptCollator
from lightning_modules.common import PolicyModule, default_optimizer, log
from radvlm import grpo
from radvlm.batch import select_rows
from radvlm.chat import answer_of, split_thinking
from radvlm.objectives import AdvantageEstimator, GroupNormalization, GRPOLoss, PolicyLoss
from radvlm.policy import Policy, PolicyConfig
from radvlm.rewards import RewardResult, RewardTerm, compute_rewards
from radvlm.rollout import HFEngine, Rollout, RolloutEngine, Sampling
from radvlm.rollout_correction import RolloutCorrection, logprob_agreement
from radvlm.tasks import is_box_task, task_think_split


class RewardFailureError(RuntimeError):
    """Too large a fraction of rewards could not be computed."""


class RolloutMismatchError(RuntimeError):
    """At the first step, the rollout engine's log-probs differ from the trainer's by more than allowed."""


class GRPOModule(PolicyModule):
    """GRPO on a ``PolicyModule`` (manual optimization); one training step: ``training_step``.

    Deviations: in data-parallel runs ``ppo_mini_batch_size`` is divided by the world size and each rank
    aggregates over its own tokens (gradients are then averaged across ranks, as verl does per rank). With
    several processes, rows removed by ``filter_zero_std_groups`` (or fully masked) still run with a zero mask
    so every rank makes the same number of forward/backward passes, and a rank with fewer micro-batches (dropped
    prompts) or none (an empty batch) makes zero-loss passes to match (``_update_plan``, ``shared_batch``);
    generation gathers the FSDP2 weights once per rollout; a non-finite loss is still back-propagated and all
    ranks skip the step together; π_old and reference log-probs are computed in eval mode (no dropout).
    An optimizer step happens only when a mini-batch has a trainable row, so a batch of only zero-variance
    groups under ``filter_zero_std_groups`` does not advance ``global_step``. With ``dynamic_sampling`` a batch
    whose informative groups do not yet fill a training batch on every process only generates (``_collect``).
    """

    collator_type = PromptCollator  # checked at setup against the data module's collator

    def __init__(
        self,
        policy: PolicyConfig,
        rewards: list[RewardTerm],
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        num_generations: int = 8,
        max_new_tokens: int = 1024,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        beta: float = 0.01,
        loss: PolicyLoss | None = None,
        advantage: AdvantageEstimator | None = None,
        ppo_mini_batch_size: int | None = None,
        ppo_epochs: int = 1,
        micro_batch_size: int = 8,
        micro_batch_tokens: int | None = None,
        mask_truncated_completions: bool = False,
        filter_zero_std_groups: bool = False,
        reward_timeout: float | None = None,
        max_unavailable_fraction: float = 0.5,
        grad_clip: float | None = 1.0,
        max_consecutive_skips: int = 10,
        val_metrics: list[RewardTerm] | None = None,
        val_max_new_tokens: int | None = None,
        num_logged_samples: int = 4,
        log_text_samples: bool = True,
        export_dir: str | None = None,
        shared_prefill: bool = False,
        lr: float | None = None,
        overwrite_export: bool = False,
        engine: RolloutEngine | None = None,
        rollout_correction: RolloutCorrection | bool | None = None,
        max_rollout_logprob_diff: float | None = 0.5,
        share_vision: bool = True,
        overlap_rewards: bool = True,
        packed_logprobs: bool | None = None,
        shared_prefix_logprobs: bool = False,
        dynamic_sampling: grpo.DynamicSampling | None = None,
    ) -> None:
        """
        Args:
            policy: the starting checkpoint (the SFT export) and how to load it.
            rewards: reward terms (metric, weight, tasks); see ``radvlm.rewards``.
            num_generations: rollouts per prompt (G).
            max_new_tokens, temperature, top_p, top_k: rollout sampling (log-probs use the same temperature);
                with ``num_generations`` grouped as ``self.sampling`` (a ``radvlm.rollout.Sampling``).
            beta: k3 KL coefficient (0: no reference policy is loaded).
            loss: the policy loss (``class_path`` in the config, docs/objectives.md): ``radvlm.objectives.GRPOLoss``
                (default: the paper's clip 0.2/0.28, dual clip 3, token-mean), ``GSPOLoss``, ``CISPOLoss``,
                ``SAPOLoss``; its ``agg`` also aggregates the KL term, its ``entropy_coeff`` is the entropy bonus.
            advantage: the advantage estimator: ``radvlm.objectives.GroupNormalization`` (default, ``scale:
                group``; ``none`` = Dr. GRPO) or ``PerTermNormalization`` (each reward term z-scored in its group).
            ppo_mini_batch_size: prompts per optimizer update (``None``: the whole batch, one update).
            ppo_epochs: passes over each rollout batch.
            micro_batch_size: rollouts per forward/backward (gradient accumulation inside a mini-batch).
            micro_batch_tokens: also at most this many padded tokens (rows × longest row) per forward/backward,
                rows of similar length together (``radvlm.grpo.token_micro_batches``); ``None``: rows only.
            mask_truncated_completions: truncated rollouts get no loss.
            filter_zero_std_groups: drop groups whose rewards are all equal (they carry no signal).
            reward_timeout: seconds a reward term may take per step before its rows become NaN.
            max_unavailable_fraction: stop the run when a step has more unavailable rewards than this.
            val_metrics: extra metrics for validation only (e.g. ``GroundingMAP`` on grounding tasks); the
                reward terms are always evaluated too.
            val_max_new_tokens: generation budget at validation (default ``max_new_tokens``).
            num_logged_samples: rollouts shown in the TensorBoard sample table per step.
            log_text_samples: ``False`` keeps all text out of the logs.
            export_dir: Hugging Face export of the policy when fit ends (an existing, non-empty folder is
                refused at the start of fit unless ``overwrite_export``).
            lr: the learning rate (replaces the optimizer's; for ``OneCycleLR`` also its peak ``max_lr``).
            shared_prefill: shorthand for ``engine=HFEngine(shared_prefill=True)`` (the default engine): rollouts
                encode each image and prefill each prompt once, then decode the G completions from copies of
                its KV cache: the same samples for the same seed, without G-fold vision and prefill compute.
            engine: what generates the rollouts (``class_path`` in the config): ``radvlm.rollout.HFEngine``
                (default), ``radvlm.fast_engine.FastHFEngine``, ``radvlm.vllm_engine.VLLMEngine``.
            rollout_correction: importance weights / rejection for an engine that reports its own log-probs
                (``radvlm.rollout_correction.RolloutCorrection``); ``None``: the engine's default (vLLM:
                token-level weights capped at 2; HF engines sample from the trainer itself and report none);
                ``false``: off; ``true``: the default settings.
            max_rollout_logprob_diff: at the first step of a run, the mean |log π_old − log π_rollout| over
                the sampled tokens above which the run stops (a prompt, image or weight mismatch between
                trainer and engine); ``None``: never. Logged every step as ``train/rollout_logprob_diff``.
            share_vision: log-prob passes run the vision tower once per prompt's image, not once per rollout
                (``radvlm.batch.share_images``: the same values and gradients); ``False``: repeated (benchmarks).
            overlap_rewards: compute the rewards in a thread of their own while the π_old and reference
                log-probs run (the same rewards; not with ``filter_zero_std_groups`` in a single process, whose
                log-prob passes skip the filtered rows, nor with ``dynamic_sampling``, whose rewards decide which
                groups train).
            packed_logprobs: every log-prob pass packs its rows' real tokens into one sequence without padding
                (``Policy.token_logprobs(packed=True)``: the same values and gradients); ``None`` (default):
                packed where the attention is a varlen kernel (``flash_attention_2`` / ``_3``), padded (with
                the all-padding columns trimmed) under ``sdpa`` / ``eager``, whose packed mask is quadratic in
                the packed length (benchmarks/RESULTS.md).
            shared_prefix_logprobs: the π_old and reference passes (no gradient) compute each distinct prompt and
                its image once into a KV cache and run only the completions against it
                (``Policy.token_logprobs(shared_prefix=True)``: the same values up to float rounding); not with
                packed passes, which already spend nothing on padding. The update pass is unchanged.
            dynamic_sampling: DAPO dynamic sampling (``radvlm.grpo.DynamicSampling``: ``{outcome: soft_f1,
                min_std: 0.0, max_gen_batches: 10}``): groups whose outcome term does not vary are dropped and
                batches generate until every process holds a full batch of informative groups; the extra ones
                are carried to the next step and checkpointed (docs/dynamic_sampling.md). ``None``: off.
        """
        super().__init__(policy, optimizer, lr_scheduler, grad_clip, max_consecutive_skips, log_text_samples,
                         export_dir, lr=lr, overwrite_export=overwrite_export)
        if num_generations < 2:
            raise ValueError(f"num_generations must be ≥ 2 for group advantages, got {num_generations}")
        if not rewards:
            raise ValueError("GRPOModule needs at least one reward term")
        if engine is None:
            engine = HFEngine(shared_prefill=shared_prefill)
        elif shared_prefill:
            raise ValueError("shared_prefill=True with an explicit engine: set it on the engine instead "
                             "(engine: {class_path: radvlm.rollout.HFEngine, init_args: {shared_prefill: true}})")
        lora = getattr(policy, "lora", None)
        if lora is not None and getattr(lora, "dropout", 0.0) > 0:
            warnings.warn(f"GRPO with LoRA dropout {lora.dropout}: the update pass runs in train mode, so its "
                          f"log-probs are not those of the rollout policy (ratios ≠ 1 on-policy, clip fractions "
                          f"inflated); the GRPO configs use dropout 0.0", UserWarning, stacklevel=2)
        if isinstance(dynamic_sampling, dict):  # from a checkpoint's plain hyper-parameters
            dynamic_sampling = grpo.DynamicSampling(**dynamic_sampling)
        if dynamic_sampling is not None:
            names = [t.name for t in rewards]
            unknown = [n for n in dynamic_sampling.names if n not in names]
            if unknown:
                raise ValueError(f"dynamic_sampling.outcome names {unknown}, which are not reward terms (the terms: "
                                 f"{names}); name the outcome term(s), e.g. soft_f1, not the shaped total")
            if filter_zero_std_groups:
                raise ValueError("dynamic_sampling and filter_zero_std_groups together: dynamic sampling already "
                                 "keeps only groups whose outcome varies; set filter_zero_std_groups: false")
        # checkpoints hold plain values
        self.save_hyperparameters(ignore=["rewards", "val_metrics", "engine", "rollout_correction", "loss",
                                          "advantage"])
        self.loss_fn = GRPOLoss() if loss is None else loss
        self.advantage = GroupNormalization() if advantage is None else advantage
        for name, value, kind in (("loss", self.loss_fn, PolicyLoss), ("advantage", self.advantage, AdvantageEstimator)):
            if not isinstance(value, kind):
                raise TypeError(f"GRPOModule: {name} must be a radvlm.objectives.{kind.__name__} (class_path in the "
                                f"config), got {type(value).__name__}")
        names = [t.name for t in rewards]
        if self.advantage.uses_terms and len(set(names)) < len(names):
            raise ValueError(f"GRPOModule: {type(self.advantage).__name__} normalises each reward term by its name, "
                             f"and these names repeat: {sorted({n for n in names if names.count(n) > 1})}; give the "
                             f"terms distinct names (RewardTerm name=...)")
        self.engine = engine
        self.rewards = list(rewards)
        self.val_terms = list(rewards) + list(val_metrics or [])
        # validation state lives in torchmetrics objects (tensor states: synced across processes)
        self.val_metric_modules = nn.ModuleDict(
            {term.name: copy.deepcopy(term.metric) for term in self.val_terms if isinstance(term.metric, nn.Module)}
        )
        self.reference_model: nn.Module | None = None
        self._keep_empty_rows = False
        self.rollout_correction = RolloutCorrection() if rollout_correction is True else rollout_correction
        self._agreement_checked = False
        self.share_vision = bool(share_vision)
        self.overlap_rewards = bool(overlap_rewards)
        self.packed_logprobs = packed_logprobs
        self.shared_prefix_logprobs = bool(shared_prefix_logprobs)
        self._reward_pool = None
        self.dynamic_sampling = dynamic_sampling
        self._ds_groups: list[dict[str, Any]] = []  # informative groups held (oldest first), on CPU
        self._ds_gen_batches = 0  # generation batches toward the next training batch
        self._ds_failed: dict[str, int] = {}  # failed rewards of those batches, per term (logged at the step)
        self.register_load_state_dict_post_hook(self._not_checkpointed_are_not_missing)

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        """The checks of ``PolicyModule.setup``, and before any model is loaded: every task of the training
        data has a reward term (a run would otherwise stop at its first rollout, minutes in at 8B)."""
        super().setup(stage)
        data = self.trainer.datamodule if self._trainer is not None else None
        if stage != "fit" or data is None:
            return
        tasks = sorted({str(r.task) for r in getattr(data, "splits", {}).get("train", [])})
        missing = [t for t in tasks if not any(term.applies(t) for term in self.rewards)]
        if missing:
            have = {term.name: sorted(term.tasks) if term.tasks is not None else "all" for term in self.rewards}
            raise ValueError(f"no reward term scores the training task(s) {missing} (reward terms and their tasks: "
                             f"{have}); add a RewardTerm for them or filter the data with data.init_args.tasks")

    def configure_model(self) -> None:
        if self.policy is None:
            self.policy = self.policy_config.build(train=self._fitting())
        if self.hparams.beta > 0 and not self.policy.is_lora and self.reference_model is None:
            # a frozen Policy of its own, copied before sharding and kept in the compute dtype (nothing updates
            # it: no float32 master copy); PolicyModule.configure_model then shards it like the policy
            # (FSDP2Strategy), so it is never a full copy per process
            compute = self.policy.compute_dtype or next(self.policy.parameters()).dtype
            ref = Policy(copy.deepcopy(self.policy.hf_model).to(compute), self.policy.processor,
                         compute_dtype=compute)
            ref.requires_grad_(False)
            ref.eval()
            self.reference_model = ref
        super().configure_model()

    def on_fit_start(self) -> None:
        super().on_fit_start()
        data = getattr(self.trainer, "datamodule", None)
        per_rank = getattr(getattr(data, "hparams", None), "batch_size", None)
        if self.dynamic_sampling is not None:  # a training batch is batch_groups prompts, not a data batch
            per_rank = self._ds_target()
        if per_rank is not None:
            check_mini_batch(int(per_rank), self.trainer.world_size, self.hparams.ppo_mini_batch_size)
        if hasattr(self.engine, "setup"):  # an engine of its own (vLLM): built now, before training memory is taken
            max_length = getattr(getattr(data, "hparams", None), "max_length", None)
            if max_length is None:
                raise ValueError(f"{type(self.engine).__name__} needs data.init_args.max_length (its max_model_len "
                                 f"is max_length + max_new_tokens)")
            self.engine.setup(self.policy, max_model_len=int(max_length) + int(self.hparams.max_new_tokens),
                              seed=int(torch.initial_seed()) % 2**31)

    @property
    def optimizer_steps_per_batch(self) -> float | None:
        """Optimizer updates per rollout batch (``ppo_epochs`` × mini-batches): turns ``max_steps`` into rollout
        batches for ``callbacks.RunProgress`` (with ``dynamic_sampling``: training batches of ``batch_groups``
        prompts; the generation-only batches between them are not counted); ``None`` before a data module is
        attached."""
        data = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        per_rank = getattr(getattr(data, "hparams", None), "batch_size", None)
        if self.dynamic_sampling is not None and self.dynamic_sampling.batch_groups is not None:
            per_rank = self.dynamic_sampling.batch_groups
        if per_rank is None:
            return None
        return float(len(self._mini_batches(int(per_rank))) * self.hparams.ppo_epochs)

    @property
    def predict_max_new_tokens(self) -> int:
        """``main.py predict`` generates as validation does: ``val_max_new_tokens``, else ``max_new_tokens``."""
        return int(self.hparams.val_max_new_tokens or self.hparams.max_new_tokens)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """``PolicyModule``'s entries, the held dynamic-sampling groups, and the loss and advantage estimator
        as plain text (``repr``: their class and settings), which are not hyper-parameters (objects): a resume
        compares them (``on_load_checkpoint``)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["radvlm"]["objectives"] = self._objectives()
        self._save_dynamic_sampling(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """``PolicyModule``'s restore; a loss or estimator other than the checkpoint's is logged (the configured
        one is used: a checkpoint restores state, not choices)."""
        super().on_load_checkpoint(checkpoint)
        self._load_dynamic_sampling(checkpoint)
        saved = checkpoint.get("radvlm", {}).get("objectives")
        now = self._objectives()
        changed = [f"{k}: {saved[k]} → {now[k]}" for k in now if isinstance(saved, dict) and saved.get(k, now[k]) != now[k]]
        if changed:
            log.warning("the checkpoint's loss or advantage estimator differs from the configured one, which is "
                        "used: %s", "; ".join(changed))

    def _objectives(self) -> dict[str, str]:
        return {"loss": repr(self.loss_fn), "advantage": repr(self.advantage)}

    #: rebuilt at setup (the frozen reference copy, the metric modules): never checkpointed
    NOT_CHECKPOINTED = ("reference_model.", "val_metric_modules.")

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        return {k: v for k, v in state.items() if not k.startswith(self.NOT_CHECKPOINTED)}

    @classmethod
    def _not_checkpointed_are_not_missing(cls, module: nn.Module, incompatible_keys) -> None:
        """``load_state_dict`` post-hook: the keys ``state_dict`` leaves out on purpose (``NOT_CHECKPOINTED``)
        are dropped from the missing keys; everything else is checked as the caller's ``strict`` says (torch
        applies ``strict`` after its post-hooks)."""
        missing = incompatible_keys.missing_keys
        missing[:] = [k for k in missing if not k.startswith(cls.NOT_CHECKPOINTED)]

    # ------------------------------------------------------------------ pieces of a step
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

    # ------------------------------------------------------------------ training step
    @property
    def sampling(self) -> Sampling:
        """The rollout sampling settings, from the flat init arguments (``hparams``, so checkpoints hold them)."""
        hp = self.hparams
        return Sampling(num_generations=hp.num_generations, max_new_tokens=hp.max_new_tokens,
                        temperature=hp.temperature, top_p=hp.top_p, top_k=hp.top_k)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One GRPO step on a batch of ``B`` prompts.

        1. rollout: ``G`` sampled completions per prompt from the current policy through the configured
           ``engine`` (``radvlm.rollout.RolloutEngine``: Hugging Face by default, ``FastHFEngine``, vLLM), with
           the ``Sampling`` built from the flat arguments (temperature ``temperature``, stop at ``<|im_end|>``,
           at most ``max_new_tokens``; vision special tokens suppressed);
        2. reward: ``radvlm.rewards.compute_rewards`` with the configured ``RewardTerm`` s (each prompt by the
           terms of its task; thinking prompts score the text after ``</think>``); NaN = unavailable, masked;
           with ``dynamic_sampling``, only groups whose outcome term varies are kept (``_collect``) and the
           steps below run on a full batch of them, once every process holds one (else this batch only generates);
        3. advantages from the ``advantage`` estimator (``radvlm.objectives``); optional zero-variance group filter
           and masking of truncated completions;
        4. log-probs of the rollouts under π_old (skipped when there is a single update per rollout batch: then
           π_old = π_θ and the detached current log-probs are used) and, with ``beta > 0``, under the reference
           (LoRA: adapters disabled; full fine-tune: a frozen copy of the policy made at setup, sharded alike);
        5. ``ppo_epochs`` × (B / ``ppo_mini_batch_size``) optimizer updates, each accumulating micro-batches of
           ``micro_batch_size`` rollouts: ``loss + beta · k3`` aggregated over the whole mini-batch,
           gradient clipping, and a skipped step on a non-finite loss or gradient norm.
        """
        self.count_dropped(batch)
        # every process runs a batch, or none does: one whose prompts were all over max_length runs another
        # process's prompts with zero weight (shared_batch), so all make the same passes and collectives
        batch, filler = self.shared_batch(batch)
        if batch is None:
            return None
        times: dict[str, float] = {}
        with _timed(times, "generate"):
            rollout = self._rollout(batch)  # B·G rows
        dynamic = self.dynamic_sampling is not None
        if dynamic:  # rewards first: they decide which groups train, and when
            with _timed(times, "reward"):
                collected = self._collect(rollout, self._rewards(rollout, filler=filler), filler)
            if collected is None:
                return None  # generation only: not every process holds a full batch of informative groups yet
            rollout, result = collected
            g = rollout.num_generations
            batch = {"ids": rollout.ids[::g], "tasks": rollout.tasks[::g], "thinking": rollout.thinking[::g]}
            filler = False  # every process trains its own groups
        if not self.share_vision:
            rollout = rollout.repeated_images()
        model_batch = rollout.model_batch()  # (B*G, P+C)
        updates = self._mini_batches(len(batch["ids"]))
        engine_logp = rollout.logprobs  # (B*G, C) or None: the same on every process (one engine class)
        # rewards beside the π_old / reference passes: those need every row's log-probs whatever the rewards
        # are (several processes keep every row; one process skips only zero-variance groups when filtering)
        # the order of the passes and of the rewards' all-gather is the same on every process whatever its batch
        # (a filler process computes no rewards but makes the same collectives in the same order)
        overlap = not dynamic and self.overlap_rewards and (self._is_distributed()
                                                            or not self.hparams.filter_zero_std_groups)
        pending = self._start_rewards(rollout) if overlap and not filler else None
        if overlap:
            all_rows = list(range(len(rollout)))
            with _timed(times, "logprobs"):
                old_logp, ref_logp = self._rollout_logprobs(model_batch, rollout.completion_mask, all_rows,
                                                            updates, need_old=engine_logp is not None)
        if not dynamic:
            with _timed(times, "reward"):  # with the overlap: the wait for the rewards after the log-prob passes
                result = self._rewards(rollout, filler=filler, computed=pending)
        rewards = result.total.to(self.device, torch.float32)  # (B*G,) float32 under any precision
        advantages, group_std, mask, rows = self._advantages(rollout, rewards, result)
        if filler:  # borrowed prompts: no loss, no statistics
            mask, advantages = torch.zeros_like(mask), torch.zeros_like(advantages)
        if not overlap:
            with _timed(times, "logprobs"):
                old_logp, ref_logp = self._rollout_logprobs(model_batch, mask, rows, updates,
                                                            need_old=engine_logp is not None)
        weights, corrected = None, {}
        if engine_logp is not None:
            weights, mask, corrected = self._correct(old_logp, engine_logp, mask)
        with _timed(times, "update"):
            stats = self._update(model_batch, mask, advantages, old_logp, ref_logp, updates, set(rows), weights)
        if not filler:
            self._log_step(batch, rollout, result, rewards, advantages, group_std, mask, {**stats, **corrected},
                           times)

    # ------------------------------------------------------------------ dynamic sampling (DAPO)
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

    def _rollout(self, batch: dict[str, Any]) -> Rollout:
        self.engine.sync_weights(self.policy)
        rollout = self.engine.generate(self.policy, batch, self.sampling, synced_gpus=self.synced_generation)
        return rollout.to(self.device)

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

    def _correct(self, old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor):
        """Trainer against engine log-probs: ``(token weights (B*G, C) or None, mask, stats)``. Logs their
        agreement; at the first step of the run stops every process (one all-gather) when any process's mean
        difference passes ``max_rollout_logprob_diff``."""
        known = torch.isfinite(engine_logp)  # (B*G, C) NaN: the engine did not report it (ratio 1)
        engine_logp = torch.where(known, engine_logp, old_logp)
        mean, top = logprob_agreement(old_logp, engine_logp, mask * known.to(mask.dtype))
        limit = self.hparams.max_rollout_logprob_diff
        if not self._agreement_checked and limit is not None:
            self._agreement_checked = True
            diffs = self.gather_values([mean])[:, 0]  # (world,)
            if bool((diffs > limit).any()):
                raise RolloutMismatchError(
                    f"the rollout engine's log-probs differ from the trainer's by {float(diffs.max()):.3f} nats per "
                    f"token on average (per rank: {[round(float(d), 3) for d in diffs]}; limit "
                    f"max_rollout_logprob_diff={limit}) at the first step: the engine sees other prompts, images "
                    f"or weights than the trainer (chat template, pixel budget, weight sync)")
        stats = {"rollout_logprob_diff": mean, "rollout_logprob_diff_max": top}
        correction = self.rollout_correction
        if correction is None:
            correction = getattr(self.engine, "default_correction", None)
        if not correction:  # None or False: agreement logged, no correction
            return None, mask, stats
        weights, mask, more = correction.apply(old_logp, engine_logp, mask)
        return weights, mask, {**stats, **more}

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

    # ------------------------------------------------------------------ logging
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

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        for metric in self.val_metric_modules.values():
            metric.reset()
        self._val_rows: list[dict[str, Any]] = []
        self._val_chars: list[int] = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, list[dict[str, Any]]] | None:
        """Greedy generation, scored by the validation metrics. Returns the batch's grounding samples
        ``{"samples": [{"image", "answer", "gt_boxes", "prompt", "task", "reference"}, ...]}`` for callbacks
        (``on_validation_batch_end``'s ``outputs``; ``callbacks.BoxPictures`` draws them)."""
        batch, filler = self.shared_batch(batch)  # generation gathers the weights: a collective under FSDP2
        if batch is None:
            return None
        budget = self.hparams.val_max_new_tokens or self.hparams.max_new_tokens
        gen = self.policy.generate(batch, max_new_tokens=budget, synced_gpus=self.synced_generation)  # greedy
        if filler:
            return None
        # the answer of a thinking completion is cut where each metric's reward cuts it (RewardTerm.think_split);
        # pictures, lengths and logged rows use the split of the sample's task (task_think_split)
        by_split = {split: [answer_of(t, th, split)[0] for t, th in zip(gen.texts, batch["thinking"])]
                    for split in ("first", "last")}
        answers = [by_split[task_think_split(task)][i] for i, task in enumerate(batch["tasks"])]
        self._val_chars.extend(len(a) for a in answers)
        for term in self.val_terms:
            metric = self.val_metric_modules[term.name] if term.name in self.val_metric_modules else None
            rows = [i for i, task in enumerate(batch["tasks"]) if term.applies(task)]
            if metric is None or not rows:
                continue
            preds, targets = [by_split[term.think_split][i] for i in rows], [batch["targets"][i] for i in rows]
            if takes_gt_boxes(metric):  # box metrics score against the record's unrounded boxes, as evaluation
                metric.update(preds, targets, gt_boxes=[batch["gt_boxes"][i] for i in rows])
            else:
                metric.update(preds, targets)
        if len(self._val_rows) < self.hparams.num_logged_samples:
            for i in range(min(len(answers), self.hparams.num_logged_samples - len(self._val_rows))):
                self._val_rows.append({"id": batch["ids"][i], "task": batch["tasks"][i], "generated": answers[i],
                                       "reference": batch["targets"][i]})
        return {"samples": [{"image": batch["images"][i], "answer": answers[i], "gt_boxes": batch["gt_boxes"][i],
                             "prompt": batch["prompts"][i], "task": task, "reference": batch["targets"][i]}
                            for i, task in enumerate(batch["tasks"]) if is_box_task(task)]}

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    # ``main.py test``: the same greedy generation and metrics, logged under ``test/``
    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, list[dict[str, Any]]] | None:
        return self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, prefix: str) -> None:
        for name, metric in self.val_metric_modules.items():
            # no row of its tasks in this evaluation, on any process (compute() syncs: all or none call it)
            if self.agree_all(not metric.update_called):
                continue
            value = metric.compute()  # synced across processes by torchmetrics
            values = {f"{name}/{k}": v for k, v in value.items()} if isinstance(value, dict) else {name: value}
            for key, v in values.items():
                self.log_measured(f"{prefix}/{key}", float(v))
        if self._val_chars:
            self.log(f"{prefix}/answer_chars_mean", sum(self._val_chars) / len(self._val_chars))
        self.text_table(f"{prefix}/generations", self._val_rows)


def uses_varlen_attention(hf_model: nn.Module) -> bool:
    """Whether the model's attention runs packed rows without a dense mask (Flash Attention's varlen kernels)."""
    impl = str(getattr(getattr(hf_model, "config", None), "_attn_implementation", "") or "")
    return "flash" in impl


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


def takes_gt_boxes(metric: Any) -> bool:
    """Whether ``metric.update`` accepts the records' ground-truth boxes (``gt_boxes=``)."""
    import inspect

    return "gt_boxes" in inspect.signature(metric.update).parameters


def check_mini_batch(per_rank: int, world_size: int, ppo_mini_batch_size: int | None) -> int:
    """Optimizer updates per rollout batch; warns when ``ppo_mini_batch_size`` does not divide the global
    rollout batch (prompts per step over all processes), naming the numbers: a config scaled down from the
    paper's 512 prompts / 128 per update would otherwise silently do one update per step."""
    global_prompts = per_rank * world_size
    if ppo_mini_batch_size is None:
        return 1
    if ppo_mini_batch_size > global_prompts or global_prompts % ppo_mini_batch_size:
        updates = math.ceil(global_prompts / min(ppo_mini_batch_size, global_prompts))
        warnings.warn(
            f"ppo_mini_batch_size={ppo_mini_batch_size} does not divide the global rollout batch of "
            f"{global_prompts} prompts (data batch_size {per_rank} × {world_size} processes): each step "
            f"makes {updates} optimizer update(s) of unequal or clipped size instead of "
            f"{global_prompts / ppo_mini_batch_size:g}. Set ppo_mini_batch_size to a divisor of {global_prompts} "
            f"(the paper: 512 prompts, 128 per update, 4 updates).", UserWarning, stacklevel=2)
        return updates
    return global_prompts // ppo_mini_batch_size


@contextlib.contextmanager
def _timed(times: dict[str, float], name: str) -> Iterator[None]:
    """Adds the wall time of the block to ``times[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - start


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

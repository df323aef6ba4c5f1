"""``GRPOModule``: GRPO with clinically grounded rewards (RadVLM-GRPO, docs/paper.md §2), manual optimization.

One training step (``GRPOModule.training_step``): rollouts, rewards, group advantages, π_old and reference
log-probs, then ``ppo_epochs`` × mini-batch optimizer updates.

Paper settings (configs/grpo_report.yaml): G = 8, 512 prompts per step, mini-batch 128 prompts (4 updates),
lr 1e-6 constant, β = 0.01 k3 as a loss, ε 0.20/0.28, dual clip 3, token-mean, temperature 1.

Deviations (data-parallel runs; details in ``GRPOModule``): ``ppo_mini_batch_size`` is divided by the world
size and each rank aggregates over its own tokens; filtered rows and non-finite losses still run forward and
backward, so every rank makes the same passes. With ``dynamic_sampling`` (DAPO) a data batch may only generate:
informative groups are collected until every rank holds a full batch (docs/dynamic_sampling.md).

The pieces of a step live in mixins of their own: the log-prob passes and updates (``lightning_modules.grpo_passes``),
rewards and advantages (``grpo_rewards``), dynamic sampling (``grpo_dynamic_sampling``), the step's logged values
(``grpo_step_log``) and validation / test (``grpo_eval``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from typing import Any, Iterator

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from datamodules.collate import PromptCollator
from lightning_modules.common import PolicyModule, default_optimizer, log
from lightning_modules.grpo_dynamic_sampling import DynamicSamplingCollection
from lightning_modules.grpo_eval import GRPOEvaluation
from lightning_modules.grpo_passes import GRPOPasses
from lightning_modules.grpo_rewards import GRPORewards
from lightning_modules.grpo_step_log import GRPOStepLog
from radvlm import grpo
from radvlm.objectives import AdvantageEstimator, GroupNormalization, GRPOLoss, PolicyLoss
from radvlm.policy import Policy, PolicyConfig
from radvlm.rewards import RewardTerm
from radvlm.rollout import HFEngine, Rollout, RolloutEngine, Sampling
from radvlm.rollout_correction import RolloutCorrection, logprob_agreement


class RolloutMismatchError(RuntimeError):
    """At the first step, the rollout engine's log-probs differ from the trainer's by more than allowed."""


class GRPOModule(GRPOPasses, GRPORewards, DynamicSamplingCollection, GRPOStepLog, GRPOEvaluation,
                 PolicyModule):
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

    def _rollout(self, batch: dict[str, Any]) -> Rollout:
        self.engine.sync_weights(self.policy)
        rollout = self.engine.generate(self.policy, batch, self.sampling, synced_gpus=self.synced_generation)
        return rollout.to(self.device)

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

"""``SFTModule``: supervised fine-tuning of the Qwen3-VL policy (stage 1) and thinking cold start (stage 2).

Both stages are the same loss on different data: next-token cross-entropy on assistant tokens only
(``radvlm.chat`` sets the labels), averaged over the labelled tokens of each micro-batch (token-mean); with
``accumulate_grad_batches`` > 1 the micro-batch means are averaged. The cold start simply points the
DataModule at thinking data.

Logged: ``train/loss``, ``train/lr``, ``train/tokens_per_s``, ``train/grad_norm``, ``train/skipped_steps``,
``train/dropped_samples`` (over-long), ``val/loss``; at validation a few greedy generations go to a
TensorBoard text table (unless ``log_text_samples`` is off).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from datamodules.collate import SFTCollator
from lightning_modules.common import PolicyModule, default_optimizer
from radvlm.chat import answer_of
from radvlm.policy import PolicyConfig


class SFTModule(PolicyModule):
    collator_type = SFTCollator  # checked at setup against the data module's collator

    def __init__(
        self,
        policy: PolicyConfig,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        grad_clip: float | None = 1.0,
        accumulate_grad_batches: int = 1,
        max_consecutive_skips: int = 10,
        num_generation_samples: int = 4,
        max_new_tokens: int = 256,
        log_text_samples: bool = True,
        export_dir: str | None = None,
        lr: float | None = None,
        overwrite_export: bool = False,
    ) -> None:
        """
        Args:
            policy: what to load (checkpoint, dtype, LoRA, gradient checkpointing).
            optimizer: e.g. AdamW; lr_scheduler: stepped once per optimizer step.
            grad_clip: max gradient norm (``None``: no clipping, norm still checked for finiteness).
            accumulate_grad_batches: micro-batches per optimizer step.
            max_consecutive_skips: consecutive non-finite steps before the run stops.
            num_generation_samples: validation prompts generated greedily and shown per validation run.
            max_new_tokens: generation budget of those samples.
            log_text_samples: ``False`` keeps all text out of the logs.
            export_dir: write the trained policy here as a Hugging Face folder when fit ends.
            lr: the learning rate: replaces the optimizer's ``lr`` and, for ``OneCycleLR``, its ``max_lr``
                (the peak); ``None`` keeps the optimizer's and scheduler's own settings.
            overwrite_export: an existing, non-empty ``export_dir`` is refused at the start of fit unless set.
        """
        super().__init__(policy, optimizer, lr_scheduler, grad_clip, max_consecutive_skips, log_text_samples,
                         export_dir, lr=lr, overwrite_export=overwrite_export)
        self.save_hyperparameters()
        self.accumulate = max(1, int(accumulate_grad_batches))
        self.num_generation_samples = num_generation_samples
        self.max_new_tokens = max_new_tokens
        self._t_last = None
        self._shown = 0
        self._gen_rows: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        self.count_dropped(batch)
        # every process runs a batch, or none does: one whose samples were all over max_length runs another
        # process's batch with zero weight (shared_batch), so all make the same forward/backward collectives
        batch, filler = self.shared_batch(batch)
        if batch is None:
            return None
        start = self._t_last or time.perf_counter()
        loss_sum, n_tokens = self.policy.sft_loss(batch)
        loss = loss_sum / max(n_tokens, 1)
        finite = filler or bool(torch.isfinite(loss))
        # backward even when non-finite: every process must join the gradient all-reduce (the step is skipped
        # on every process together, guarded_step)
        self.manual_backward((loss * 0.0 if filler else loss) / self.accumulate)
        self._loss_finite = getattr(self, "_loss_finite", True) and finite
        # an accumulation window never spans an epoch boundary (so checkpoints fall between windows)
        last_micro = (batch_idx + 1) % self.accumulate == 0 or self.trainer.is_last_batch
        if last_micro:
            self.log_lr()
            self.guarded_step(loss_finite=self._loss_finite)
            self._loss_finite = True
        if filler:
            return None
        now = time.perf_counter()
        tokens = int(batch["attention_mask"].sum())
        self.log("train/tokens_per_s", tokens / max(now - start, 1e-9), on_step=True, on_epoch=False)
        self._t_last = now
        self.log("train/loss", loss.detach() if finite else float("nan"), on_step=True, on_epoch=True,
                 prog_bar=True, batch_size=len(batch["ids"]))
        return loss.detach()

    def on_train_epoch_start(self) -> None:
        self._t_last = None

    @property
    def predict_max_new_tokens(self) -> int:
        """``main.py predict`` generates up to ``max_new_tokens``, as validation does."""
        return int(self.hparams.max_new_tokens)

    @property
    def optimizer_steps_per_batch(self) -> float:
        """Optimizer steps per training batch (``callbacks.RunProgress`` turns ``max_steps`` into batches)."""
        return 1.0 / self.accumulate

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._shown = 0
        self._gen_rows = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Validation loss, and greedy generations for the first ``num_generation_samples`` prompts. Which
        batches generate is decided on counts agreed across processes (generation gathers the weights: a
        collective under FSDP2), and an empty batch runs another process's batch unlogged (``shared_batch``)."""
        batch, filler = self.shared_batch(batch)
        if batch is None:
            return
        loss_sum, n_tokens = self.policy.sft_loss(batch)  # padding rows have no labelled token
        # a filler (or a batch of padding only) is logged with weight 0, so that every process holds val/loss
        # and joins its epoch-end reduction (a process whose every batch was empty would otherwise leave the
        # others waiting in it); the value is the token-weighted mean over the real rows of every process
        weight = 0 if filler else n_tokens
        value = loss_sum / n_tokens if weight else loss_sum.new_zeros(())
        self.log("val/loss", value, on_epoch=True, prog_bar=True, batch_size=weight, sync_dist=True)
        want = self.num_generation_samples - self._shown  # the same on every process
        if want > 0 and "prompt" in batch and not batch["prompt"].get("empty"):
            prompt = _take(batch["prompt"], want)
            out = self.policy.generate(prompt, max_new_tokens=self.max_new_tokens,
                                       synced_gpus=self.synced_generation)
            for i, text in enumerate(out.texts if not filler else []):
                if prompt.get("padding") and prompt["padding"][i]:
                    continue  # a copy that evens out the ranks' shards
                answer, _ = answer_of(text, prompt["thinking"][i])
                self._gen_rows.append({"id": prompt["ids"][i], "task": prompt["tasks"][i],
                                       "generated": answer, "reference": prompt["targets"][i]})
            self._shown += self.agreed_max([len(out.texts)])[0]

    def on_validation_epoch_end(self) -> None:
        self.text_table("val/generations", self._gen_rows)


def _take(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` samples of a collated prompt batch (one image per sample)."""
    size = len(batch["ids"])
    if n >= size:
        return batch
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key == "pixel_values":
            grid = batch["image_grid_thw"]
            out[key] = value[: int(grid[:n].prod(-1).sum())]
        elif key == "image_grid_thw":
            out[key] = value[:n]
        elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
            out[key] = value[:n]
        elif isinstance(value, list) and len(value) == size:
            out[key] = value[:n]
        else:
            out[key] = value
    # left-padded prompts: drop columns that are padding for every kept row
    width = int(out["attention_mask"].sum(-1).max())
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        out[key] = out[key][:, -width:]
    return out



"""Validation and test of ``GRPOModule`` (``GRPOEvaluation``): greedy generation scored by the reward terms and
the validation metrics (torchmetrics state, synced across processes), logged under ``val/`` or ``test/``.
"""

from __future__ import annotations

from typing import Any

from radvlm.chat import answer_of
from radvlm.tasks import is_box_task, task_think_split


class GRPOEvaluation:
    """The validation and test hooks of ``GRPOModule``; uses the module's ``val_terms``, ``val_metric_modules``,
    ``policy`` and rank agreement."""

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
        # copies that only even out the ranks' shards (EvalShardSampler) are generated and never counted
        counted = [i for i, pad in enumerate(batch.get("padding") or [False] * len(answers)) if not pad]
        self._val_chars.extend(len(answers[i]) for i in counted)
        for term in self.val_terms:
            metric = self.val_metric_modules[term.name] if term.name in self.val_metric_modules else None
            rows = [i for i in counted if term.applies(batch["tasks"][i])]
            if metric is None or not rows:
                continue
            preds, targets = [by_split[term.think_split][i] for i in rows], [batch["targets"][i] for i in rows]
            if takes_gt_boxes(metric):  # box metrics score against the record's unrounded boxes, as evaluation
                metric.update(preds, targets, gt_boxes=[batch["gt_boxes"][i] for i in rows])
            else:
                metric.update(preds, targets)
        for i in counted[: max(0, self.hparams.num_logged_samples - len(self._val_rows))]:
            self._val_rows.append({"id": batch["ids"][i], "task": batch["tasks"][i], "generated": answers[i],
                                   "reference": batch["targets"][i]})
        return {"samples": [{"image": batch["images"][i], "answer": answers[i], "gt_boxes": batch["gt_boxes"][i],
                             "prompt": batch["prompts"][i], "task": batch["tasks"][i],
                             "reference": batch["targets"][i]}
                            for i in counted if is_box_task(batch["tasks"][i])]}

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


def takes_gt_boxes(metric: Any) -> bool:
    """Whether ``metric.update`` accepts the records' ground-truth boxes (``gt_boxes=``)."""
    import inspect

    return "gt_boxes" in inspect.signature(metric.update).parameters

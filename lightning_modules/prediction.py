"""``main.py predict`` for both stages (``PolicyPrediction``, mixed into ``lightning_modules.common.PolicyModule``):
greedy generation on a prompt batch, one row per sample with its answer, thinking and ground-truth boxes.
"""

from __future__ import annotations

from typing import Any


class PolicyPrediction:
    """``predict_step`` (rows written by ``PredictionWriter``); each stage defines ``predict_max_new_tokens``."""

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Greedy generation on a prompt batch → one row per sample (written by ``PredictionWriter``)."""
        from radvlm.chat import split_thinking
        from radvlm.tasks import task_think_split

        batch, filler = self.shared_batch(batch)  # generation is a collective under FSDP2
        if batch is None:
            return []
        gen = self.policy.generate(batch, max_new_tokens=self.predict_max_new_tokens,
                                   synced_gpus=self.synced_generation)
        if filler:
            return []
        rows = []
        # the record's classification truth and label set (PromptCollator; None where a batch has none)
        extra = {k: batch[k] if isinstance(batch.get(k), list) else [None] * len(gen.texts)
                 for k in ("labels", "pathologies")}
        for i, text in enumerate(gen.texts):
            thinking = bool(batch["thinking"][i])
            # a thinking completion's answer is cut where the rewards of its task cut it (first </think> for
            # box tasks, last otherwise; radvlm_tools.evaluate re-cuts ``completion`` the same way)
            split = task_think_split(batch["tasks"][i])
            thoughts, answer, closed = split_thinking(text, split) if thinking else ("", text.strip(), True)
            rows.append({
                "id": batch["ids"][i], "task": batch["tasks"][i], "image": batch["images"][i],
                "prompt": batch["prompts"][i], "completion": text, "answer": answer, "thinking": thinking,
                "think_closed": closed, "reference": batch["targets"][i],
                **row_boxes(batch["tasks"][i], batch["gt_boxes"][i], batch["targets"][i]),
                "labels": extra["labels"][i], "pathologies": extra["pathologies"][i],  # classification scoring
                "completion_tokens": int(gen.completion_mask[i].sum()), "truncated": bool(gen.truncated[i]),
            })
        return rows

    @property
    def predict_max_new_tokens(self) -> int:
        """The generation budget of ``predict_step``: each stage defines it from its own settings (SFT:
        ``max_new_tokens``; GRPO: ``val_max_new_tokens``, else ``max_new_tokens``)."""
        raise NotImplementedError(f"{type(self).__name__} does not define predict_max_new_tokens")


def row_boxes(task: str | None, boxes: list | None, reference: str) -> dict[str, Any]:
    """A prediction row's ground-truth boxes: ``{"gt_boxes": the record's boxes, "gt_boxes_from": "record"}``;
    for a box task whose record has none, the boxes of the reference text (``metrics.boxes.parse_boxes``) with
    ``gt_boxes_from: "reference"`` (the evaluation then lets each metric parse the text with its own style); else
    ``[]`` from ``"none"``."""
    from metrics.boxes import parse_boxes
    from radvlm.tasks import is_box_task

    if boxes:
        return {"gt_boxes": boxes, "gt_boxes_from": "record"}
    parsed = [list(b) for b in parse_boxes(reference)] if is_box_task(task) else []
    return {"gt_boxes": parsed, "gt_boxes_from": "reference" if parsed else "none"}

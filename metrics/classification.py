"""Abnormality classification as RadVLM evaluates it: labels found in the answer text, micro and macro P/R/F1.

RadVLM's definition (docs/paper.md §8b; its ``evaluate_classification``): predicted labels ``predicted_labels``,
truth ``true_labels``, scores ``precision_recall_f1``; the metric class is ``AbnormalityClassification``.
Deviation: its per-sample ``score`` (label-set F1, for rewards) is our addition; RadVLM reports no per-sample
value.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Literal

import torch

from metrics.base import PerSampleMetric, check_pairs

#: RadVLM's CheXpert label set (``CheXpert_Dataset_MM.pathologies``): the 13 observations, sorted
CHEXPERT_PATHOLOGIES: tuple[str, ...] = tuple(sorted((
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
    "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
)))


def predicted_labels(texts: Sequence[str], labels: Sequence[str]) -> torch.Tensor:  # (N, L) bool
    """RadVLM's rule: label j is predicted for text i when ``labels[j].lower()`` occurs in ``texts[i].lower()``.

    A plain substring test: "No cardiomegaly." predicts Cardiomegaly; nothing else is parsed. The label set is
    the dataset's pathology list (a RadVLM record's ``pathologies``; CheXpert's 13, sorted, is
    ``CHEXPERT_PATHOLOGIES``).
    """
    names = [label.lower() for label in labels]
    rows = [[name in text.lower() for name in names] for text in texts]
    return torch.tensor(rows, dtype=torch.bool).reshape(len(texts), len(names))


def true_labels(label_lists: Sequence[Sequence[str]], labels: Sequence[str]) -> torch.Tensor:  # (N, L) bool
    """Indicator of each sample's ground-truth names (case-insensitive) over ``labels``; others are ignored.

    RadVLM's truth is the record's ``labels`` (lower-cased; names outside the label set are ignored).
    """
    names = [label.lower() for label in labels]
    sets = [{x.lower() for x in row} for row in label_lists]
    return torch.tensor([[name in s for name in names] for s in sets], dtype=torch.bool).reshape(len(sets), len(names))


def parse_label_list(target: str) -> list[str]:
    """A target of ``target_format="labels"``: a JSON list of names, or names joined by commas (``""``: none)."""
    text = target.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"label target {target!r:.120} is not a JSON list: {exc}") from None
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise ValueError(f"label target {target!r:.120} must be a JSON list of strings")
        return value
    return [x.strip() for x in text.split(",") if x.strip()]


def record_indicators(preds: Sequence[str], references: Sequence[str],
                      labels: Sequence[Sequence[str] | str | None], pathologies: Sequence[Sequence[str] | str | None]
                      ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The label set and the (N, L) bool predicted and true labels of records (``radvlm_tools.evaluate``).

    Label set: the union of the records' ``pathologies`` (case-insensitive, first spelling and first-seen
    order kept; ``CHEXPERT_PATHOLOGIES`` when no record has one). Truth: a record's ``labels``, else the labels
    named in its reference answer (the prediction rule). A label outside a record's own ``pathologies`` is
    neither predicted nor true for it, so a file of one dataset is scored exactly as RadVLM scores it and a
    file mixing datasets does not count one dataset's labels against the other's records. ``labels`` and
    ``pathologies`` entries are lists of names or ``parse_label_list`` strings; ``None`` when absent."""
    def names(value: Sequence[str] | str | None) -> list[str] | None:
        return None if value is None else parse_label_list(value) if isinstance(value, str) else [str(x) for x in value]

    if not len(preds) == len(references) == len(labels) == len(pathologies):
        raise ValueError(f"got {len(preds)} predictions, {len(references)} references, {len(labels)} label lists "
                         f"and {len(pathologies)} pathology lists")
    own = [names(p) for p in pathologies]
    known: dict[str, str] = {}
    for label in (x for row in own if row for x in row):
        known.setdefault(label.lower(), label)
    label_set = list(known.values()) or list(CHEXPERT_PATHOLOGIES)
    pred = predicted_labels(preds, label_set)  # (N, L)
    true = predicted_labels(references, label_set)  # (N, L) the reference answer's labels ...
    for i, value in enumerate(labels):
        if (given := names(value)) is not None:  # ... unless the record has its labels
            true[i] = true_labels([given], label_set)[0]
    allowed = torch.tensor([[x.lower() in {y.lower() for y in row} if row else True for x in label_set]
                            for row in own], dtype=torch.bool).reshape(len(own), len(label_set))  # (N, L)
    return label_set, pred & allowed, true & allowed


def counts(pred: torch.Tensor, true: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-label TP, FP, FN of (N, L) bool indicators: three (L,) long tensors."""
    tp = (pred & true).sum(0)
    fp = (pred & ~true).sum(0)
    fn = (~pred & true).sum(0)
    return tp, fp, fn


def _divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:  # zero_division=0
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))  # counts: den >= 1


def precision_recall_f1(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> dict[str, torch.Tensor]:
    """scikit-learn's ``precision_recall_fscore_support`` (``zero_division=0``) from per-label counts (L,):
    ``precision``, ``recall``, ``f1`` (L,) and ``micro_*``, ``macro_*`` scalars, float64.

    As scikit-learn on the (N, L) indicator matrices with ``zero_division=0``: per label P = TP/(TP+FP),
    R = TP/(TP+FN), F1 = 2TP/(2TP+FP+FN), each 0 when its denominator is 0; micro = the same on TP, FP, FN
    summed over labels; macro = the unweighted mean of the per-label values (labels without any positive
    count, with 0), so macro F1 is not the F1 of macro P and macro R.
    """
    out = {"precision": _divide(tp, tp + fp), "recall": _divide(tp, tp + fn), "f1": _divide(2 * tp, 2 * tp + fp + fn)}
    t, p, n = tp.sum(), fp.sum(), fn.sum()
    micro = {"precision": _divide(t, t + p), "recall": _divide(t, t + n), "f1": _divide(2 * t, 2 * t + p + n)}
    for name in ("precision", "recall", "f1"):
        out[f"micro_{name}"] = micro[name]
        per_label = out[name]
        out[f"macro_{name}"] = per_label.mean() if per_label.numel() else torch.zeros((), dtype=torch.float64)
    return out


def sample_f1(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:  # (N, L) bool x2 -> (N,)
    """Per-sample 2TP / (2TP + FP + FN) over the labels; 1.0 when neither side has a label."""
    tp = (pred & true).sum(1).double()
    wrong = (pred ^ true).sum(1).double()  # FP + FN
    denom = 2 * tp + wrong
    return torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.ones_like(tp))


class AbnormalityClassification(PerSampleMetric):
    """RadVLM's abnormality classification: per-sample label-set F1 from ``score``; ``compute`` gives
    micro/macro precision, recall, F1 and per-label F1.

    The torchmetrics class (validation, ``radvlm_tools.evaluate``): ``labels`` (the label set) is fixed at
    construction; a target is either the reference answer text (``target_format="text"``, the default: truth =
    labels found in it by the same rule, which is what a validation loop has) or the record's label list
    (``"labels"``: a JSON list ``'["Cardiomegaly", "Edema"]'`` or names joined by ``", "``; ``""`` for none).
    ``score`` gives a per-sample F1 of the label sets (2TP/(2TP+FP+FN), 1.0 when neither side has a label, as
    ``metrics.chexbert.sample_f1``; our addition: RadVLM reports no per-sample value). State: per-label TP, FP,
    FN counts (``(L,)`` long tensors, summed across processes) and the per-sample values; ``compute`` gives
    ``micro_*``, ``macro_*`` precision/recall/F1 and ``f1/<label>`` per label. ``record_indicators`` is the
    evaluation's view of whole records (truth from their ``labels``, label set from their ``pathologies``).
    """

    higher_is_better = True
    worst_value = 0.0

    def __init__(self, labels: Sequence[str] = CHEXPERT_PATHOLOGIES,
                 target_format: Literal["text", "labels"] = "text", **kwargs) -> None:
        super().__init__(**kwargs)
        labels = [str(x) for x in labels]
        if not labels:
            raise ValueError("AbnormalityClassification needs at least one label")
        lowered = [x.lower() for x in labels]
        if len(set(lowered)) != len(lowered):
            raise ValueError(f"labels must be distinct up to case, got {labels}")
        if target_format not in ("text", "labels"):
            raise ValueError(f"target_format must be 'text' or 'labels', got {target_format!r}")
        self.labels = labels
        self.target_format = target_format
        for name in ("tp", "fp", "fn"):
            self.add_state(name, default=torch.zeros(len(labels), dtype=torch.long), dist_reduce_fx="sum")

    def indicators(self, preds: Sequence[str], targets: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, L) bool predicted and true labels of each sample."""
        check_pairs(preds, targets)
        pred = predicted_labels(preds, self.labels)
        if self.target_format == "text":
            true = predicted_labels(targets, self.labels)
        else:
            true = true_labels([parse_label_list(t) for t in targets], self.labels)
        return pred, true

    def score(self, preds: Sequence[str], targets: Sequence[str]) -> torch.Tensor:  # (N,)
        return sample_f1(*self.indicators(preds, targets)).float()

    def update(self, preds: Sequence[str], targets: Sequence[str]) -> None:
        pred, true = self.indicators(list(preds), list(targets))  # (N, L) each
        tp, fp, fn = counts(pred, true)
        self.tp += tp.to(self.device)
        self.fp += fp.to(self.device)
        self.fn += fn.to(self.device)
        self.values.append(sample_f1(pred, true).float().to(self.device))

    def compute(self) -> dict[str, torch.Tensor]:
        stats = precision_recall_f1(self.tp, self.fp, self.fn)
        out = {f"{avg}_{name}": stats[f"{avg}_{name}"].float()
               for avg in ("micro", "macro") for name in ("precision", "recall", "f1")}
        out.update({f"f1/{label}": stats["f1"][j].float() for j, label in enumerate(self.labels)})
        return out

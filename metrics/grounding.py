"""Grounding metrics: the authors' Hungarian soft-F1 reward, RadVLM's per-sample mAP@0.5, a box-format reward.

Inputs are answer texts (the part after ``</think>`` for thinking models: splitting it off is the caller's
job, and a completion without ``</think>`` receives ``worst_value``); boxes are parsed with the metric's
``box_style`` and compared with the target text's boxes or the record's (``ground_truth``).

soft-F1: docs/paper.md §4 (``soft_f1``, ``SoftF1``); mAP: docs/paper.md §5 (``average_precision``,
``GroundingMAP``); what a perfect answer set scores under those rules: ``perfect_scores``. Deviations:
``mean_iou`` is 0, not NaN, when samples were seen but none has both a predicted and a ground-truth box
(``GroundingMAP``); ``BoxFormat`` is our own reward, not in the paper.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from metrics.base import PerSampleMetric, check_pairs
from metrics.boxes import Box, BoxStyle, box_spans, check_box_style, pairwise_iou, parse_boxes

#: per sample, the ground-truth boxes to use instead of the target text's (``None`` / ``[]``: the text's)
GtBoxes = Sequence[Sequence[Sequence[float]] | None]

#: the RadVLM answer of a grounding / detection sample without findings (docs/paper.md §8)
NEGATIVE_ANSWER = "No abnormalities or lesions are detected on this Chest X-ray."
_NEGATIVE_LOOSE = re.compile(r"\s*no\s+abnormalities\s+or\s+lesions\s+are\s+detected\s+on\s+this\s+chest\s+"
                             r"x-ray\s*\.?\s*", re.IGNORECASE)
_NEGATIVE_START = re.compile(r"no\s+abnormalities\s+or\s+lesions", re.IGNORECASE)
# a coordinate in RadVLM style: 0 or 1 with at most two decimals (0, 0.3, 0.12, 1.0); range checked apart
_STYLE_NUMBER = re.compile(r"[01](?:\.[0-9]{1,2})?")  # ASCII digits only
_STYLE_GROUP = re.compile(r"\[(.*?), (.*?), (.*?), (.*?)\]")


def soft_f1(pred_boxes: Sequence[Sequence[float]] | np.ndarray,
            gt_boxes: Sequence[Sequence[float]] | np.ndarray, min_iou: float = 0.0) -> float:
    """The authors' Hungarian soft-F1 between two box lists; in [0, 1].

    docs/paper.md §4, the authors' released reward: Hungarian matching of predicted to ground-truth boxes with
    cost ``1 - IoU`` (``scipy.optimize.linear_sum_assignment``); matched pairs with IoU > ``min_iou`` are
    valid; ``TP_mass`` = sum of their IoU, ``FP`` = n_pred - n_valid, recall = TP_mass / n_gt, precision =
    TP_mass / (TP_mass + FP), soft-F1 = 2PR / (P + R), 0 when P + R = 0. No box on either side gives 0, also
    when both sides are empty (the authors' choice: a correct "no finding" answer earns nothing, so negative
    samples give no learning signal). One box each side gives 2·IoU / (1 + IoU).
    """
    iou = pairwise_iou(pred_boxes, gt_boxes)  # (P, G), finite
    n_pred, n_gt = iou.shape
    if n_pred == 0 or n_gt == 0:
        return 0.0
    rows, cols = linear_sum_assignment(1.0 - iou)  # min(P, G) pairs maximising total IoU
    matched = iou[rows, cols]  # (min(P, G),)
    valid = matched > min_iou
    tp_mass = float(matched[valid].sum())
    fp = n_pred - int(valid.sum())
    recall = tp_mass / n_gt
    precision = tp_mass / (tp_mass + fp) if tp_mass + fp > 0 else 0.0
    if precision + recall <= 0:
        return 0.0
    return min(max(2.0 * precision * recall / (precision + recall), 0.0), 1.0)


def average_precision(pred_boxes: Sequence[Sequence[float]] | np.ndarray,
                      gt_boxes: Sequence[Sequence[float]] | np.ndarray, iou_threshold: float = 0.5) -> float:
    """RadVLM's per-sample AP: predictions in output order, greedy best-IoU assignment, VOC all-point area.

    docs/paper.md §5, RadVLM's evaluation: predictions in output order (no confidences) each take the
    ground-truth box of highest IoU (first one on ties); a TP when IoU >= threshold and that box is not yet
    taken, else an FP. AP is the VOC all-point interpolated area under the precision/recall curve
    (``voc_area``), 0 when either side has no box.
    """
    iou = pairwise_iou(pred_boxes, gt_boxes)  # (P, G)
    n_pred, n_gt = iou.shape
    if n_pred == 0 or n_gt == 0:
        return 0.0
    taken = np.zeros(n_gt, dtype=bool)
    tp = np.zeros(n_pred)
    for i in range(n_pred):
        j = int(np.argmax(iou[i]))
        if iou[i, j] >= iou_threshold and not taken[j]:
            tp[i] = 1.0
            taken[j] = True
    cum_tp = np.cumsum(tp)  # (P,)
    cum_fp = np.cumsum(1.0 - tp)  # (P,)
    recall = cum_tp / n_gt
    precision = cum_tp / (cum_tp + cum_fp)  # denominator = 1, 2, ..., P
    return voc_area(recall, precision)


def voc_area(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC all-point area: sentinels, precision made monotone from the right, summed over recall steps."""
    mrec = np.concatenate(([0.0], recall, [1.0]))  # (P + 2,)
    mpre = np.concatenate(([0.0], precision, [0.0]))  # (P + 2,)
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]  # indices i where recall changes between i and i + 1
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def perfect_scores(truth: Sequence[Sequence[Sequence[float]]], iou_threshold: float = 0.5,
                   min_iou: float = 0.0) -> dict[str, float]:
    """The ceiling of each grounding score on these records: what a perfect answer set (every record answered
    with exactly its ground-truth boxes, a record without boxes with the negative sentence) scores.

    ``truth``: per record its ground-truth boxes (``ground_truth``). ``map`` = mean of ``average_precision(g, g)``
    (1 per record with boxes, 0 per record without, as RadVLM counts it; below 1 where a record lists one box
    twice: the second copy is an FP); ``soft_f1`` = mean of ``soft_f1(g, g)`` (1 with boxes, 0 without);
    ``mean_iou`` = Σ IoU(g, g) over all pairs of a record's boxes / Σ n_gt² (RadVLM's all-pairs average: a
    record with several boxes pairs each box with the others too), 0 without any box; ``no_finding`` = number of
    records without boxes. All NaN for no records.
    """
    if not truth:
        return {"map": float("nan"), "soft_f1": float("nan"), "mean_iou": float("nan"), "no_finding": 0}
    iou_sum, pairs = 0.0, 0
    for g in truth:
        iou = pairwise_iou(g, g)  # (G, G)
        iou_sum, pairs = iou_sum + float(iou.sum()), pairs + iou.size
    return {"map": float(np.mean([average_precision(g, g, iou_threshold) for g in truth])),
            "soft_f1": float(np.mean([soft_f1(g, g, min_iou) for g in truth])),
            "mean_iou": iou_sum / pairs if pairs else 0.0,
            "no_finding": sum(1 for g in truth if len(g) == 0)}


def box_format_score(text: str) -> float:
    """The BoxFormat reward of one answer; in [0, 1] (our own, not in the paper).

    - No parsable box: 1.0 for exactly the RadVLM negative sentence ``NEGATIVE_ANSWER`` (after stripping outer
      whitespace), 0.5 for the same sentence up to case, whitespace and the final period, else 0.0.
    - With boxes: 0.5 · (fraction of boxes with 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1)
      + 0.25 · style (every coordinate written as ``0``/``1`` or ``0.d``/``0.dd``/``1.0``-like with at most two
      decimals, no sign or exponent, and boxes joined exactly as ``format_boxes`` joins them)
      + 0.25 · clean (once the box groups are cut out, no ``[`` or ``]`` is left, so no unbalanced bracket, no
      malformed or non-finite group, and no negative sentence beside the boxes).
    """
    spans = box_spans(text)
    boxes = parse_boxes(text)
    if not boxes:
        if text.strip() == NEGATIVE_ANSWER:
            return 1.0
        return 0.5 if _NEGATIVE_LOOSE.fullmatch(text) else 0.0
    arr = np.asarray(boxes, dtype=np.float64)  # (K, 4)
    in_range = (arr >= 0.0).all(axis=1) & (arr <= 1.0).all(axis=1)
    ordered = (arr[:, 0] < arr[:, 2]) & (arr[:, 1] < arr[:, 3])
    valid = float(np.mean(in_range & ordered))

    finite_spans = [(s, e) for s, e, ok in spans if ok]  # one per parsed box, same order
    groups = [text[s:e] for s, e in finite_spans]
    separators = [text[e1:s2] for (_, e1), (s2, _) in itertools.pairwise(finite_spans)]
    expected = [", "] * (len(groups) - 2) + [" and "] if len(groups) > 1 else []
    style = float(all(_style_group_ok(g) for g in groups) and separators == expected)

    remainder = _cut(text, finite_spans)  # a skipped (non-finite) group stays in and counts as garbage
    clean = float("[" not in remainder and "]" not in remainder
                  and not _NEGATIVE_START.search(remainder))
    return 0.5 * valid + 0.25 * style + 0.25 * clean


def _cut(text: str, spans: Sequence[tuple[int, int]]) -> str:
    """``text`` without the character ranges ``spans`` (sorted, disjoint)."""
    pieces, start = [], 0
    for s, e in spans:
        pieces.append(text[start:s])
        start = e
    pieces.append(text[start:])
    return "".join(pieces)


def _style_group_ok(group: str) -> bool:
    match = _STYLE_GROUP.fullmatch(group)
    return match is not None and all(_STYLE_NUMBER.fullmatch(n) for n in match.groups())


def ground_truth(targets: Sequence[str], gt_boxes: GtBoxes | None, style: BoxStyle) -> list[list[Box]]:
    """Per sample the given ``gt_boxes`` entry when non-empty, else the boxes parsed from the target text.

    ``gt_boxes``, passed to ``score`` / ``update``, holds per sample the record's unrounded ``boxes`` (RadVLM's
    evaluation compares with the dataset's boxes, not with the two-decimal text); an empty or ``None`` entry
    falls back to the target text. Box styles (``parse_boxes``): ``"reward"`` (sign and exponent allowed) for
    ``SoftF1`` and ``BoxFormat``, ``"radvlm_eval"`` (RadVLM's evaluation regex: a negative coordinate makes no
    box) for ``GroundingMAP``.
    """
    if gt_boxes is None:
        return [parse_boxes(t, style) for t in targets]
    if len(gt_boxes) != len(targets):
        raise ValueError(f"got {len(gt_boxes)} gt_boxes entries for {len(targets)} targets")
    return [[tuple(float(v) for v in b) for b in g] if g else parse_boxes(t, style)  # type: ignore[misc]
            for t, g in zip(targets, gt_boxes)]


class SoftF1(PerSampleMetric):
    """Hungarian IoU soft-F1 between the boxes of each prediction and of its target text (the GRPO reward), or
    of its ``gt_boxes`` entry when one is given."""

    higher_is_better = True
    worst_value = 0.0
    think_split = "first"  # thinking completions: the authors' grounding reward scores the text after the FIRST </think>

    def __init__(self, min_iou: float = 0.0, box_style: BoxStyle = "reward", **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= min_iou < 1.0:
            raise ValueError(f"min_iou must lie in [0, 1), got {min_iou}")
        self.min_iou = float(min_iou)
        self.box_style = check_box_style(box_style)

    def score(self, preds: Sequence[str], targets: Sequence[str],
              gt_boxes: GtBoxes | None = None) -> torch.Tensor:  # (N,)
        check_pairs(preds, targets)
        truth = ground_truth(targets, gt_boxes, self.box_style)
        values = [soft_f1(parse_boxes(p, self.box_style), g, self.min_iou) for p, g in zip(preds, truth)]
        return torch.tensor(values, dtype=torch.float32)

    def update(self, preds: Sequence[str], targets: Sequence[str], gt_boxes: GtBoxes | None = None) -> None:
        values = self.score(list(preds), list(targets), gt_boxes)  # (N,)
        self.values.append(values.to(self.device))


class GroundingMAP(PerSampleMetric):
    """RadVLM mAP: per-sample AP (``score``); ``compute`` gives ``{"map": ..., "mean_iou": ...}``.

    ``box_style="radvlm_eval"`` (default) parses boxes as RadVLM's evaluation does; ``"reward"`` as the reward.
    ``gt_boxes`` (optional, per sample) replaces the boxes of the target text by the record's unrounded boxes.

    mAP is the mean of per-sample AP (``average_precision``). ``mean_iou`` is RadVLM's "average IoU": the sum
    of IoU over all predicted x ground-truth pairs of all samples divided by the number of such pairs
    (Σ IoU / Σ n_pred·n_gt). Our decision where that is 0 / 0 (samples were seen but none has a predicted and a
    ground-truth box, e.g. a model that writes no box at all): 0, the value of a model that localises nothing,
    not NaN (which tables show as "undefined" and averages skip); NaN only before any sample.
    """

    higher_is_better = True
    worst_value = 0.0
    think_split = "first"  # thinking completions: the authors' grounding reward scores the text after the FIRST </think>

    def __init__(self, iou_threshold: float = 0.5, box_style: BoxStyle = "radvlm_eval", **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must lie in (0, 1], got {iou_threshold}")
        self.iou_threshold = float(iou_threshold)
        self.box_style = check_box_style(box_style)
        self.add_state("iou_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pair_count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def score(self, preds: Sequence[str], targets: Sequence[str],
              gt_boxes: GtBoxes | None = None) -> torch.Tensor:  # (N,)
        check_pairs(preds, targets)
        truth = ground_truth(targets, gt_boxes, self.box_style)
        values = [average_precision(parse_boxes(p, self.box_style), g, self.iou_threshold)
                  for p, g in zip(preds, truth)]
        return torch.tensor(values, dtype=torch.float32)

    def iou_pairs(self, preds: Sequence[str], targets: Sequence[str],
                  gt_boxes: GtBoxes | None = None) -> list[tuple[float, int]]:
        """Per sample (sum of IoU over its predicted x ground-truth pairs, number of pairs): ``mean_iou``."""
        check_pairs(preds, targets)
        truth = ground_truth(targets, gt_boxes, self.box_style)
        out = []
        for p, g in zip(preds, truth):
            iou = pairwise_iou(parse_boxes(p, self.box_style), g)  # (P, G)
            out.append((float(iou.sum()), int(iou.size)))
        return out

    def update(self, preds: Sequence[str], targets: Sequence[str], gt_boxes: GtBoxes | None = None) -> None:
        check_pairs(preds, targets)
        truth = ground_truth(targets, gt_boxes, self.box_style)
        values, iou_sum, pairs = [], 0.0, 0
        for p, gt in zip(preds, truth):
            pred_boxes = parse_boxes(p, self.box_style)
            values.append(average_precision(pred_boxes, gt, self.iou_threshold))
            iou = pairwise_iou(pred_boxes, gt)  # (P, G)
            iou_sum += float(iou.sum())
            pairs += iou.size
        self.values.append(torch.tensor(values, dtype=torch.float32, device=self.device))
        self.iou_sum += iou_sum
        self.pair_count += pairs

    def compute(self) -> dict[str, torch.Tensor]:
        vals = self.per_sample()
        finite = vals[~torch.isnan(vals)]
        nan = torch.tensor(float("nan"), dtype=torch.float32, device=self.device)
        mean_ap = finite.mean() if finite.numel() else nan
        if self.pair_count > 0:
            mean_iou = (self.iou_sum / self.pair_count).float()
        else:  # samples but no predicted x ground-truth pair: 0 (class docstring); no sample: NaN
            mean_iou = torch.zeros((), dtype=torch.float32, device=self.device) if vals.numel() else nan
        return {"map": mean_ap, "mean_iou": mean_iou}


class BoxFormat(PerSampleMetric):
    """Format reward for grounding answers in [0, 1] (definition: ``box_format_score``); ignores targets."""

    higher_is_better = True
    worst_value = 0.0
    think_split = "first"  # thinking completions: the authors' grounding reward scores the text after the FIRST </think>

    def score(self, preds: Sequence[str], targets: Sequence[str]) -> torch.Tensor:  # (N,)
        check_pairs(preds, targets)
        return torch.tensor([box_format_score(p) for p in preds], dtype=torch.float32)

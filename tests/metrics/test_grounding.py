"""Hungarian soft-F1, RadVLM per-sample AP / mean IoU and the box-format reward (metrics/grounding.py)."""

import itertools
import math
import random

import numpy as np
import pytest
import torch

from metrics.boxes import format_boxes, pairwise_iou
from metrics.grounding import (
    NEGATIVE_ANSWER,
    BoxFormat,
    GroundingMAP,
    SoftF1,
    average_precision,
    box_format_score,
    soft_f1,
)

# Full-height boxes make IoU a 1-D interval IoU: [x1, 0, x2, 1] vs [u1, 0, u2, 1] -> overlap / span.
A = [0.0, 0.0, 0.5, 0.5]
B = [0.25, 0.0, 0.75, 0.5]  # IoU(A, B) = .125 / .375 = 1/3 (see test_boxes)
FAR = [0.8, 0.8, 0.9, 0.9]  # disjoint from A and B


def answer(boxes):
    if not boxes:
        return NEGATIVE_ANSWER
    return f"The nodule is located at the coordinates {format_boxes(boxes)} on the image."


# ------------------------------------------------------------------------------------------------ soft-F1
def test_soft_f1_perfect_prediction_is_one():
    assert soft_f1([A, FAR], [A, FAR]) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("w", [0.1, 0.25, 0.5, 0.9, 1.0])
def test_soft_f1_one_box_each_is_2iou_over_1_plus_iou(w):
    # pred [0, 0, w, 1] inside gt [0, 0, 1, 1]: IoU = w; TP = w, FP = 0 -> P = 1, R = w -> F1 = 2w / (1 + w)
    assert soft_f1([[0, 0, w, 1]], [[0, 0, 1, 1]]) == pytest.approx(2 * w / (1 + w), abs=1e-12)


def test_soft_f1_partial_overlap_and_missing_box():
    # pred [B] vs gt [A, FAR]: match B-A with IoU 1/3; TP = 1/3, FP = 0 -> P = 1, R = (1/3) / 2 = 1/6;
    # F1 = 2 * 1 * (1/6) / (1 + 1/6) = (1/3) / (7/6) = 2/7
    assert soft_f1([B], [A, FAR]) == pytest.approx(2 / 7, abs=1e-12)


def test_soft_f1_penalises_extra_boxes():
    # pred [A, FAR] vs gt [A]: TP = 1, FP = 1 (FAR unmatched) -> P = 1/2, R = 1 -> F1 = 2 * .5 / 1.5 = 2/3
    assert soft_f1([A, FAR], [A]) == pytest.approx(2 / 3, abs=1e-12)


def test_soft_f1_penalises_missing_boxes():
    # pred [A] vs gt [A, FAR]: TP = 1, FP = 0 -> P = 1, R = 1/2 -> F1 = 2/3
    assert soft_f1([A], [A, FAR]) == pytest.approx(2 / 3, abs=1e-12)


def test_soft_f1_zero_iou_match_counts_as_false_positive():
    # pred [FAR] vs gt [A]: the only match has IoU 0, not > min_iou = 0 -> TP = 0, FP = 1 -> F1 = 0
    assert soft_f1([FAR], [A]) == 0.0


def test_soft_f1_uses_optimal_not_greedy_matching():
    g1, g2 = [0.0, 0, 0.4, 1], [0.3, 0, 0.7, 1]
    p1, p2 = [0.1, 0, 0.5, 1], [0.0, 0, 0.3, 1]
    # IoU(p1, g1) = .3/.5 = .6, IoU(p1, g2) = .2/.6 = 1/3, IoU(p2, g1) = .3/.4 = .75, IoU(p2, g2) = 0.
    # Greedy p1->g1 would total .6; Hungarian takes p1->g2, p2->g1: TP = 1/3 + 3/4 = 13/12, FP = 0,
    # P = 1, R = 13/24 -> F1 = 2 * (13/24) / (1 + 13/24) = 26/37
    assert soft_f1([p1, p2], [g1, g2]) == pytest.approx(26 / 37, abs=1e-12)


def test_soft_f1_matches_brute_force_over_assignments():
    rng = np.random.default_rng(0)
    for _ in range(30):
        pred, gt = rng.uniform(0, 1, (rng.integers(1, 5), 4)), rng.uniform(0, 1, (rng.integers(1, 5), 4))
        pred[:, 2:] = pred[:, :2] + 0.5 * pred[:, 2:]  # mostly overlapping, well-formed boxes
        gt[:, 2:] = gt[:, :2] + 0.5 * gt[:, 2:]
        iou = pairwise_iou(pred, gt)
        n_pred, n_gt = iou.shape
        if n_pred <= n_gt:  # every injective assignment of min(P, G) pairs
            options = [(tuple(range(n_pred)), cols) for cols in itertools.permutations(range(n_gt), n_pred)]
        else:
            options = [(rows, tuple(range(n_gt))) for rows in itertools.permutations(range(n_pred), n_gt)]
        best = max((sum(iou[r, c] for r, c in zip(rows, cols)), rows, cols) for rows, cols in options)
        matched = [iou[r, c] for r, c in zip(best[1], best[2])]
        tp, fp = sum(v for v in matched if v > 0), len(pred) - sum(v > 0 for v in matched)
        p, r = (tp / (tp + fp) if tp + fp else 0), tp / len(gt)
        expected = 2 * p * r / (p + r) if p + r else 0.0
        assert soft_f1(pred, gt) == pytest.approx(expected, abs=1e-9)


def test_soft_f1_is_permutation_invariant():
    rng = np.random.default_rng(1)
    pred, gt = rng.uniform(0, 0.5, (6, 4)), rng.uniform(0, 0.5, (4, 4))
    pred[:, 2:] += 0.5
    gt[:, 2:] += 0.5
    value = soft_f1(pred, gt)
    assert 0 < value < 1
    assert soft_f1(pred[rng.permutation(6)], gt[rng.permutation(4)]) == pytest.approx(value, abs=1e-12)


def test_soft_f1_empty_sides_give_zero():
    assert soft_f1([], []) == 0.0  # the authors' choice, also for a correct "no finding"
    assert soft_f1([A], []) == 0.0
    assert soft_f1([], [A]) == 0.0


def test_soft_f1_degenerate_and_inverted_predictions_score_zero():
    assert soft_f1([[0.2, 0.2, 0.2, 0.2]], [[0.2, 0.2, 0.2, 0.2]]) == 0.0  # zero area: IoU 0
    assert soft_f1([[0.5, 0.5, 0.0, 0.0]], [A]) == 0.0  # inverted A: area clamped to 0


def test_soft_f1_min_iou_drops_weak_matches():
    # pred [B] vs gt [A] with IoU 1/3: min_iou .5 makes it invalid -> TP 0, FP 1 -> 0; min_iou .3 keeps it
    assert soft_f1([B], [A], min_iou=0.5) == 0.0
    assert soft_f1([B], [A], min_iou=0.3) == pytest.approx(2 * (1 / 3) / (1 + 1 / 3), abs=1e-12)


def test_soft_f1_metric_parses_texts_and_averages():
    metric = SoftF1()
    preds = [answer([A, FAR]), answer([A]), "no boxes at all"]
    targets = [answer([A]), answer([A]), answer([A])]
    values = metric.score(preds, targets)
    assert values.dtype == torch.float32 and values.shape == (3,)
    torch.testing.assert_close(values, torch.tensor([2 / 3, 1.0, 0.0]))
    metric.update(preds, targets)
    torch.testing.assert_close(metric.compute(), torch.tensor((2 / 3 + 1.0) / 3))
    assert metric.higher_is_better and metric.worst_value == 0.0
    with pytest.raises(ValueError, match="min_iou"):
        SoftF1(min_iou=1.0)


# -------------------------------------------------------------------------------------------------- AP
G1, G2 = [0.0, 0, 0.4, 1], [0.6, 0, 1.0, 1]
P1 = G1  # IoU 1 with G1
P2 = G1  # duplicate: its best ground truth G1 is already taken -> FP
P3 = [0.5, 0, 1.0, 1]  # IoU with G2 = .4 / .5 = .8 -> TP
P4 = [0.45, 0, 0.55, 1]  # touches neither: IoU 0 -> FP


def test_average_precision_worked_voc_example():
    # order P1 P2 P3 P4 -> TP FP TP FP; cumTP 1 1 2 2, cumFP 0 1 1 2
    # recall 1/2 1/2 1 1, precision 1 1/2 2/3 1/2
    # with sentinels: mrec 0 .5 .5 1 1 1, mpre 0 1 .5 2/3 .5 0 -> monotone from the right: 1 1 2/3 2/3 .5 0
    # recall steps 0 -> .5 (precision 1) and .5 -> 1 (precision 2/3): AP = .5 * 1 + .5 * 2/3 = 5/6
    assert average_precision([P1, P2, P3, P4], [G1, G2]) == pytest.approx(5 / 6, abs=1e-12)


def test_average_precision_depends_on_output_order():
    # order P4 P3 P2 P1 -> FP TP TP FP; cumTP 0 1 2 2, cumFP 1 1 1 2;
    # recall 0 1/2 1 1, precision 0 1/2 2/3 1/2
    # monotone precision 2/3 2/3 2/3 2/3 .5 0 over mrec 0 0 .5 1 1 1: AP = .5 * 2/3 + .5 * 2/3 = 2/3
    assert average_precision([P4, P3, P2, P1], [G1, G2]) == pytest.approx(2 / 3, abs=1e-12)


def test_average_precision_threshold_is_inclusive():
    # IoU([0, 0, .5, 1], [0, 0, 1, 1]) = .5 exactly: a TP at threshold .5 -> AP 1; at .51 an FP -> AP 0
    assert average_precision([[0, 0, 0.5, 1]], [[0, 0, 1, 1]], 0.5) == 1.0
    assert average_precision([[0, 0, 0.5, 1]], [[0, 0, 1, 1]], 0.51) == 0.0


def test_average_precision_empty_sides_give_zero():
    assert average_precision([], []) == 0.0
    assert average_precision([A], []) == 0.0
    assert average_precision([], [A]) == 0.0


def _ap_loop(pred, gt, thr=0.5):
    """Slow reference written from the definition, with explicit loops."""
    if not pred or not gt:
        return 0.0
    taken, tps = set(), []
    for p in pred:
        ious = [pairwise_iou([p], [g])[0, 0] for g in gt]
        j = ious.index(max(ious))
        ok = ious[j] >= thr and j not in taken
        taken |= {j} if ok else set()
        tps.append(ok)
    rec, prec, tp = [], [], 0
    for i, ok in enumerate(tps, 1):
        tp += ok
        rec.append(tp / len(gt))
        prec.append(tp / i)
    rec, prec = [0.0] + rec + [1.0], [0.0] + prec + [0.0]
    for i in range(len(prec) - 2, -1, -1):
        prec[i] = max(prec[i], prec[i + 1])
    return sum((rec[i + 1] - rec[i]) * prec[i + 1] for i in range(len(rec) - 1) if rec[i + 1] != rec[i])


def test_average_precision_matches_loop_reference():
    rng = np.random.default_rng(2)
    for _ in range(50):
        pred = rng.uniform(0, 0.6, (rng.integers(0, 7), 4))
        gt = rng.uniform(0, 0.6, (rng.integers(0, 4), 4))
        pred[:, 2:] += 0.4
        gt[:, 2:] += 0.4
        assert average_precision(pred, gt) == pytest.approx(_ap_loop(pred.tolist(), gt.tolist()), abs=1e-12)


def test_grounding_map_compute_gives_map_and_mean_iou_over_all_pairs():
    preds = [answer([G1]), answer([P3, P4]), NEGATIVE_ANSWER]
    targets = [answer([G1, G2]), answer([G2]), answer([G1])]
    # AP: sample 1 TP with recall 1/2 -> AP 1/2; sample 2 TP then FP, recall 1 at precision 1 -> AP 1;
    # sample 3 has no predicted box -> AP 0. mAP = (1/2 + 1 + 0) / 3 = 1/2.
    # mean IoU over all pairs: sample 1 IoU(G1, G1) = 1, IoU(G1, G2) = 0; sample 2 IoU(P3, G2) = .8,
    # IoU(P4, G2) = 0; sample 3 has no pair -> (1 + 0 + .8 + 0) / 4 = .45 (the mean over matches would be .9)
    metric = GroundingMAP()
    torch.testing.assert_close(metric.score(preds, targets), torch.tensor([0.5, 1.0, 0.0]))
    metric.update(preds, targets)
    out = metric.compute()
    torch.testing.assert_close(out["map"], torch.tensor(0.5))
    torch.testing.assert_close(out["mean_iou"], torch.tensor(0.45))


def test_grounding_map_without_pairs_reports_zero_mean_iou_and_nan_only_before_any_sample():
    metric = GroundingMAP()
    with pytest.warns(UserWarning, match="called before the ``update``"):
        assert math.isnan(metric.compute()["mean_iou"].item())  # no sample yet
    metric.update([NEGATIVE_ANSWER], [NEGATIVE_ANSWER])
    out = metric.compute()
    assert out["map"].item() == 0.0 and out["mean_iou"].item() == 0.0  # 0 / 0 pairs: 0 by definition


# --------------------------------------------------------------- RadVLM evaluation: unrounded boxes, parsing
HALF = "[0.0, 0.0, 0.5, 1.0]"  # left half of the image
WHOLE_TEXT = "[0.0, 0.0, 1.0, 1.0]"  # the two-decimal text of the unrounded box below
WHOLE_UNROUNDED = [[0.004, 0.0, 1.0, 1.0]]


def test_grounding_map_uses_the_unrounded_ground_truth_boxes_when_given():
    # text: IoU(HALF, [0, 0, 1, 1]) = .5 / 1 = .5 >= .5 -> TP, AP 1, mean IoU .5
    # unrounded: intersection [.004, .5] x [0, 1] = .496, union .5 + .996 - .496 = 1 -> IoU .496 < .5 -> FP, AP 0
    metric = GroundingMAP()
    assert metric.score([HALF], [WHOLE_TEXT]).tolist() == [1.0]
    assert metric.score([HALF], [WHOLE_TEXT], gt_boxes=[WHOLE_UNROUNDED]).tolist() == [0.0]
    metric.update([HALF, HALF], [WHOLE_TEXT, WHOLE_TEXT], gt_boxes=[WHOLE_UNROUNDED, None])  # None: the text's
    out = metric.compute()
    torch.testing.assert_close(out["map"], torch.tensor(0.5))  # (0 + 1) / 2
    torch.testing.assert_close(out["mean_iou"], torch.tensor(0.498))  # (.496 + .5) / 2 pairs
    assert metric.iou_pairs([HALF], [WHOLE_TEXT], [WHOLE_UNROUNDED]) == [(pytest.approx(0.496), 1)]


def test_soft_f1_uses_the_unrounded_ground_truth_boxes_when_given():
    # one box each: 2 IoU / (1 + IoU): text 2 * .5 / 1.5 = 2/3; unrounded 2 * .496 / 1.496 = .663102
    metric = SoftF1()
    torch.testing.assert_close(metric.score([HALF], [WHOLE_TEXT]), torch.tensor([2 / 3]))
    torch.testing.assert_close(metric.score([HALF], [WHOLE_TEXT], [WHOLE_UNROUNDED]), torch.tensor([0.992 / 1.496]))
    metric.update([HALF], [WHOLE_TEXT], gt_boxes=[WHOLE_UNROUNDED])
    torch.testing.assert_close(metric.compute(), torch.tensor(0.992 / 1.496))


def test_an_empty_ground_truth_entry_falls_back_to_the_target_text():
    metric = GroundingMAP()
    assert metric.score([HALF], [WHOLE_TEXT], gt_boxes=[[]]).tolist() == [1.0]
    with pytest.raises(ValueError, match="2 gt_boxes entries for 1 targets"):
        metric.score([HALF], [WHOLE_TEXT], gt_boxes=[None, None])


def test_grounding_map_makes_no_box_of_a_negative_coordinate_as_radvlm_does():
    # "[-0.01, 0.2, 0.3, 0.4]" is no box for RadVLM's regex: no predicted box -> AP 0, no pair for the mean IoU.
    # The reward's parser reads it: intersection .3 x .2 = .06, union .31 x .2 = .062 -> IoU .9677 -> AP 1.
    pred, gt = "[-0.01, 0.2, 0.3, 0.4]", [[0.0, 0.2, 0.3, 0.4]]
    radvlm, reward = GroundingMAP(), GroundingMAP(box_style="reward")
    assert radvlm.score([pred], [""], gt_boxes=[gt]).tolist() == [0.0]
    assert reward.score([pred], [""], gt_boxes=[gt]).tolist() == [1.0]
    radvlm.update([pred], [""], gt_boxes=[gt])
    out = radvlm.compute()
    assert out["map"].item() == 0.0 and out["mean_iou"].item() == 0.0  # no predicted box: mean IoU 0


def test_grounding_map_ap_when_one_of_two_boxes_has_a_negative_coordinate():
    # pred "[-0.01, 0, .5, 1] and [0, 0, .5, 1]" vs gt [0, 0, 1, 1]
    # radvlm_eval: only the second box: IoU .5 -> TP -> AP 1; mean IoU .5 / 1 pair
    # reward: first box IoU .5 / 1.01 = .495 -> FP, second TP: cumTP 0 1, cumFP 1 1 -> recall 0 1, precision 0 .5;
    #   mrec 0 0 1 1, mpre 0 0 .5 0 -> monotone .5 .5 .5 0: AP = (1 - 0) * .5 = .5
    pred = "[-0.01, 0.0, 0.5, 1.0] and [0.0, 0.0, 0.5, 1.0]"
    assert GroundingMAP().score([pred], [WHOLE_TEXT]).tolist() == [1.0]
    assert GroundingMAP(box_style="reward").score([pred], [WHOLE_TEXT]).tolist() == [0.5]
    assert GroundingMAP().iou_pairs([pred], [WHOLE_TEXT]) == [(0.5, 1)]


def test_grounding_metrics_reject_an_unknown_box_style():
    with pytest.raises(ValueError, match="box style"):
        GroundingMAP(box_style="radvlm")
    with pytest.raises(ValueError, match="box style"):
        SoftF1(box_style="eval")


def _random_answers(n, seed):
    rng = random.Random(seed)

    def box():
        x, y = rng.uniform(0, 0.6), rng.uniform(0, 0.6)
        return [x, y, x + rng.uniform(0.05, 0.4), y + rng.uniform(0.05, 0.4)]

    return [answer([box() for _ in range(rng.randint(0, 4))]) for _ in range(n)]


@pytest.mark.parametrize("metric_cls", [SoftF1, GroundingMAP, BoxFormat])
def test_update_on_two_halves_equals_update_on_whole(metric_cls):
    preds, targets = _random_answers(40, 3), _random_answers(40, 4)
    whole = metric_cls()
    whole.update(preds, targets)
    sequential = metric_cls()
    sequential.update(preds[:17], targets[:17])
    sequential.update(preds[17:], targets[17:])
    rank0, rank1 = metric_cls(), metric_cls()  # DDP-style: two processes, states merged by their reduce fx
    rank0.update(preds[:17], targets[:17])
    rank1.update(preds[17:], targets[17:])
    rank0.merge_state(rank1)
    expected = whole.compute()
    for other in (sequential.compute(), rank0.compute()):
        if isinstance(expected, dict):
            assert expected.keys() == other.keys()
            for key in expected:
                torch.testing.assert_close(other[key], expected[key])
        else:
            torch.testing.assert_close(other, expected)


# ------------------------------------------------------------------------------------------------ format
@pytest.mark.parametrize("text, expected", [
    ("The nodule is located at the coordinates [0.12, 0.3, 0.5, 0.71] on the image.", 1.0),
    ("[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.6, 0.6] and [0.0, 0.0, 1.0, 1.0]", 1.0),
    (NEGATIVE_ANSWER, 1.0),
    ("  no abnormalities or lesions are detected on this chest x-ray ", 0.5),
    ("", 0.0),
    ("I think it is on the left.", 0.0),
    ("[0.1, 0.2, 0.3]", 0.0),
    ("[0.1, 0.2, 1.2, 0.5]", 0.5),  # out of range: valid 0; style and clean still 1 -> .25 + .25
    ("[0.5, 0.5, 0.1, 0.1]", 0.5),  # inverted
    ("[0.1, 0.1, 0.5, 0.5] and [0.5, 0.5, 0.1, 0.1]", 0.75),  # half the boxes valid: .5 * .5 + .25 + .25
    ("[0.123, 0.3, 0.5, 0.71]", 0.75),  # three decimals: style 0
    ("[0.1,0.2,0.3,0.4]", 0.75),  # separators inside the box: style 0
    ("[0.1, 0.2, 0.3, 0.4] [0.5, 0.5, 0.6, 0.6]", 0.75),  # boxes not joined by ", " / " and ": style 0
    ("[0.1, 0.2, 0.3, 0.4]]", 0.75),  # trailing bracket: clean 0
    ("[0.1, 0.2, 0.3, 0.4] and [0.5", 0.75),  # unbalanced: clean 0
    ("[0.1, 0.2, 0.3, 0.4] and [1e999, 0, 1, 1]", 0.75),  # skipped non-finite group left over: clean 0
    ("[0.1, 0.2, 0.3, 0.4]. " + NEGATIVE_ANSWER, 0.75),  # contradicts itself: clean 0
    ("[-1e3, 0.2, 0.3, 0.4]]", 0.0),  # invalid, bad style, garbage
])
def test_box_format_score_grades_answers(text, expected):
    assert box_format_score(text) == pytest.approx(expected, abs=1e-12)


def test_box_format_gives_full_credit_to_format_boxes_output():
    rng = np.random.default_rng(5)
    for _ in range(50):
        lo = rng.uniform(0, 0.49, (rng.integers(1, 6), 2))
        boxes = np.concatenate([lo, lo + rng.uniform(0.01, 0.5, lo.shape)], axis=1)
        boxes = np.round(boxes, 2)  # integral steps of .01 keep x1 < x2 after writing
        assert box_format_score(answer(boxes.tolist())) == 1.0


def test_box_format_metric_ignores_targets():
    metric = BoxFormat()
    values = metric.score([NEGATIVE_ANSWER, "[0.1, 0.2, 0.3]"], ["[0.1, 0.2, 0.3, 0.4]", NEGATIVE_ANSWER])
    torch.testing.assert_close(values, torch.tensor([1.0, 0.0]))


# -------------------------------------------------------------------------------------------------- fuzz
def _garbage(rng):
    alphabet = "[]0123456789.,-+eE naif\n"
    return [
        "",
        "[nan, nan, nan, nan] [inf, -inf, 0, 1] [1e999, 1e999, -1e999, 0]",
        "[1e308, -1e308, 1e308, 1e308] [1e300, 1e300, 1e301, 1e301]",
        "[-0.5, -0.5, -0.1, -0.1] [-1, -1, 1, 1]",
        "[0.1, 0.1, 0.5, 0.5], " * 50,  # 50 duplicate boxes
        "[0.1, 0.1, 0.5, 0.5" * 1000,  # 10k+ characters, unbalanced
        "".join(rng.choice(alphabet) for _ in range(10_000)),
        "[0.5, 0.5, 0.5, 0.5] [0.9, 0.9, 0.1, 0.1]",  # degenerate and inverted
        "The opacity is located at the coordinates [0.2, 0.3, 0.6, 0.7] on the image.",
        NEGATIVE_ANSWER,
    ]


@pytest.mark.parametrize("metric_cls", [SoftF1, GroundingMAP, BoxFormat])
def test_grounding_scores_are_finite_and_in_unit_range_on_garbage(metric_cls):
    texts = _garbage(random.Random(7))
    preds = [p for p in texts for _ in texts]
    targets = [t for _ in texts for t in texts]
    metric = metric_cls()
    values = metric.score(preds, targets)
    assert values.shape == (len(preds),)
    assert torch.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()
    metric.update(preds, targets)
    out = metric.compute()
    for value in (out.values() if isinstance(out, dict) else [out]):
        assert torch.isfinite(value) and 0 <= value <= 1


def test_soft_f1_of_fifty_duplicates_against_one_box():
    # 50 copies of A vs gt [A]: one match with IoU 1, FP = 49 -> P = 1/50, R = 1
    # -> F1 = 2 * (1/50) / (51/50) = 2/51
    assert SoftF1().score([answer([A] * 50)], [answer([A])]).item() == pytest.approx(2 / 51, abs=1e-7)



def test_perfect_scores_follow_radvlms_rules_for_no_finding_records_and_all_pairs():
    from metrics.grounding import perfect_scores

    a, b = (0.0, 0.0, 0.5, 0.5), (0.25, 0.0, 0.75, 0.5)  # IoU(a, b) = 0.125 / 0.375 = 1/3
    got = perfect_scores([[a], [a, b], []])
    assert got["map"] == pytest.approx(2 / 3)  # APs 1, 1, 0 (no finding: 0 even when answered correctly)
    assert got["soft_f1"] == pytest.approx(2 / 3)
    assert got["mean_iou"] == pytest.approx(11 / 15)  # (1 + 1 + 1/3 + 1/3 + 1) / (1 + 4)
    assert got["no_finding"] == 1
    # one box listed twice: the second copy is an FP (its best match is taken): recall .5 at precision 1 → AP .5
    assert perfect_scores([[a, a]])["map"] == pytest.approx(0.5)
    assert perfect_scores([[]]) == {"map": 0.0, "soft_f1": 0.0, "mean_iou": 0.0, "no_finding": 1}
    assert math.isnan(perfect_scores([])["map"])

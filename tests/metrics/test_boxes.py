"""Box parsing, RadVLM-style writing and pairwise IoU (metrics/boxes.py)."""

import math
import random
import time

import numpy as np
import pytest

from metrics.boxes import format_box, format_boxes, pairwise_iou, parse_boxes


# ------------------------------------------------------------------------------------------------ parsing
def test_parse_boxes_reads_radvlm_answer_in_order():
    text = ("The nodule is located at the coordinates [0.12, 0.3, 0.5, 0.71] and [0.6, 0.1, 0.9, 0.4] "
            "on the image.")
    assert parse_boxes(text) == [(0.12, 0.3, 0.5, 0.71), (0.6, 0.1, 0.9, 0.4)]


def test_parse_boxes_accepts_sign_exponent_and_spacing():
    text = "[-0.5,+2E-1 ,  .5,3.]  [1e2, 0, 1, 1]"
    assert parse_boxes(text) == [(-0.5, 0.2, 0.5, 3.0), (100.0, 0.0, 1.0, 1.0)]


def test_parse_boxes_skips_non_finite_and_non_numeric_groups():
    text = "[1e999, 0, 1, 1] [nan, 0, 1, 1] [inf, 0, 1, 1] [0x1, 0, 1, 1] [1_0, 0, 1, 1] [0.1, 0.2, 0.3, 0.4]"
    assert parse_boxes(text) == [(0.1, 0.2, 0.3, 0.4)]


def test_parse_boxes_needs_exactly_four_numbers():
    assert parse_boxes("[0.1, 0.2, 0.3] [0.1, 0.2, 0.3, 0.4, 0.5] [0.1 0.2 0.3 0.4]") == []


def test_parse_boxes_finds_inner_group_of_nested_brackets():
    assert parse_boxes("[[0.1, 0.2, 0.3, 0.4]]") == [(0.1, 0.2, 0.3, 0.4)]


def test_parse_boxes_rejects_non_string():
    with pytest.raises(TypeError, match="expects a str"):
        parse_boxes(None)


@pytest.mark.parametrize("text", [
    "[" + "1" * 10_000,
    "[1" * 5_000,
    "[1, 1, 1, 1" * 1_000,
    "[" + " " * 10_000 + "1, 1, 1, x",
    "[1e1e1e1" * 1_250,
])
def test_parse_boxes_is_fast_on_adversarial_10k_strings(text):
    start = time.perf_counter()
    assert parse_boxes(text) == []
    assert time.perf_counter() - start < 0.1  # measured below 1 ms: no catastrophic backtracking


def test_parse_boxes_never_raises_on_random_text():
    rng = random.Random(0)
    alphabet = "[]0123456789.,-+eE naif \n"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10_000)))
        boxes = parse_boxes(text)
        assert all(len(b) == 4 and all(math.isfinite(v) for v in b) for b in boxes)


# ------------------------------------------------------------------------- RadVLM's evaluation parser
def test_radvlm_eval_style_reads_a_radvlm_answer_like_the_reward_style():
    text = ("The nodule is located at the coordinates [0.12, 0.3, 0.5, 0.71] and [0.6, 0.1, 0.9, 0.4] "
            "on the image.")
    assert parse_boxes(text, style="radvlm_eval") == parse_boxes(text) == [(0.12, 0.3, 0.5, 0.71),
                                                                         (0.6, 0.1, 0.9, 0.4)]


def test_radvlm_eval_style_makes_no_box_of_a_negative_coordinate():
    # RadVLM's number pattern is digits and dots: "-0.01" does not match, so the group is no box at all
    text = "[-0.01, 0.2, 0.3, 0.4] and [0.5, 0.5, 0.7, 0.7]"
    assert parse_boxes(text, style="radvlm_eval") == [(0.5, 0.5, 0.7, 0.7)]
    assert parse_boxes(text) == [(-0.01, 0.2, 0.3, 0.4), (0.5, 0.5, 0.7, 0.7)]  # the reward keeps it


@pytest.mark.parametrize("text", [
    "[1e-1, 0.2, 0.3, 0.4]",  # exponent
    "[+0.1, 0.2, 0.3, 0.4]",  # sign
    "[ 0.1, 0.2, 0.3, 0.4]",  # space after [
    "[0.1 , 0.2, 0.3, 0.4]",  # space before a comma
    "[0.1, 0.2, 0.3, 0.4 ]",  # space before ]
])
def test_radvlm_eval_style_takes_no_sign_exponent_or_inner_spaces(text):
    assert parse_boxes(text, style="radvlm_eval") == []
    assert len(parse_boxes(text)) == 1  # the reward's parser reads each of them


def test_radvlm_eval_style_skips_a_group_float_cannot_read_where_radvlm_crashes():
    # "1.2.3" and "." match RadVLM's [\d.]+ and make its float() raise; here only that group is dropped
    text = "[1.2.3, 0.1, 0.2, 0.3] [., 0, 1, 1] [0.1,0.2,0.3,0.4] [1..2, 0, 1, 1]"
    assert parse_boxes(text, style="radvlm_eval") == [(0.1, 0.2, 0.3, 0.4)]


def test_radvlm_eval_style_keeps_an_overflowing_group_as_a_box_with_iou_zero():
    # 400 nines read as inf by float(), as in RadVLM: a predicted box that overlaps nothing (a false positive)
    text = "[" + "9" * 400 + ", 0.1, 0.2, 0.3]"
    boxes = parse_boxes(text, style="radvlm_eval")
    assert len(boxes) == 1 and boxes[0][0] == math.inf
    assert pairwise_iou(boxes, [[0.0, 0.0, 1.0, 1.0]]).tolist() == [[0.0]]
    assert parse_boxes(text) == []  # the reward's parser skips it


def test_parse_boxes_rejects_an_unknown_style():
    with pytest.raises(ValueError, match="radvlm_eval"):
        parse_boxes("[0.1, 0.2, 0.3, 0.4]", style="radvlm")


@pytest.mark.parametrize("text", [
    "[" + "1" * 10_000,
    "[1" * 5_000,
    "[1, 1, 1, 1" * 1_000,
    "[1," + " " * 10_000 + "x",
    "[1.1.1.1" * 1_250,
])
def test_radvlm_eval_style_is_fast_on_adversarial_10k_strings(text):
    start = time.perf_counter()
    assert parse_boxes(text, style="radvlm_eval") == []
    assert time.perf_counter() - start < 0.1


def test_radvlm_eval_style_never_raises_on_random_text():
    rng = random.Random(1)
    alphabet = "[]0123456789..,,-+e \n"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10_000)))
        boxes = parse_boxes(text, style="radvlm_eval")
        assert all(len(b) == 4 and all(v >= 0 for v in b) for b in boxes)


# ------------------------------------------------------------------------------------------------ writing
def test_format_boxes_joins_like_radvlm():
    a, b, c = [0.12, 0.3, 0.5, 0.71], [0, 0, 1, 1], [0.2, 0.25, 0.4, 0.6]
    assert format_boxes([]) == ""
    assert format_boxes([a]) == "[0.12, 0.3, 0.5, 0.71]"
    assert format_boxes([a, b]) == "[0.12, 0.3, 0.5, 0.71] and [0.0, 0.0, 1.0, 1.0]"
    assert format_boxes([a, b, c]) == "[0.12, 0.3, 0.5, 0.71], [0.0, 0.0, 1.0, 1.0] and [0.2, 0.25, 0.4, 0.6]"


def test_format_box_rounds_and_drops_trailing_zeros():
    # round(0.304, 2) = 0.3 is written "0.3" (not "0.30"); round(0.996, 2) = 1.0;
    # -0.001 rounds to -0.0, written "0.0"
    assert format_box([0.304, 0.996, -0.001, 0.12345]) == "[0.3, 1.0, 0.0, 0.12]"
    assert format_box([0.12345, 0.5, 0.5, 0.5], ndigits=3) == "[0.123, 0.5, 0.5, 0.5]"


def test_format_box_rejects_bad_boxes():
    with pytest.raises(ValueError, match="4 coordinates"):
        format_box([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="non-finite"):
        format_box([0.1, float("nan"), 0.3, 0.4])


def test_format_then_parse_round_trips():
    rng = np.random.default_rng(0)
    for k in range(12):
        boxes = rng.uniform(-2, 2, size=(k, 4)).tolist()
        text = f"The lesion is located at the coordinates {format_boxes(boxes)} on the image."
        assert parse_boxes(text) == [tuple(round(v, 2) + 0.0 for v in box) for box in boxes]


# ---------------------------------------------------------------------------------------------------- IoU
def _iou_loop(a, b):
    """Slow reference: IoU of two boxes, areas clamped at 0, 0 when the union is not positive."""
    area = lambda r: max(r[2] - r[0], 0.0) * max(r[3] - r[1], 0.0)
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def test_pairwise_iou_hand_example():
    # A = [0, 0, .5, .5], B = [.25, 0, .75, .5]: intersection .25 x .5 = .125, areas .25 each,
    # union .25 + .25 - .125 = .375 -> IoU 1/3. C is disjoint from A, touches B at x = .75 (no area) -> 0.
    a, b, c = [0, 0, 0.5, 0.5], [0.25, 0, 0.75, 0.5], [0.75, 0, 1, 0.5]
    iou = pairwise_iou([a, b], [a, b, c])
    expected = np.array([[1.0, 1 / 3, 0.0], [1 / 3, 1.0, 0.0]])
    np.testing.assert_allclose(iou, expected, rtol=0, atol=1e-15)


def test_pairwise_iou_matches_loop_reference():
    rng = np.random.default_rng(1)
    pred, gt = rng.uniform(-0.2, 1.2, size=(7, 4)), rng.uniform(-0.2, 1.2, size=(5, 4))  # many inverted
    expected = np.array([[_iou_loop(p, g) for g in gt] for p in pred])
    np.testing.assert_allclose(pairwise_iou(pred, gt), expected, rtol=1e-12, atol=1e-15)


def test_pairwise_iou_shapes_with_empty_sides():
    assert pairwise_iou([], [[0, 0, 1, 1]]).shape == (0, 1)
    assert pairwise_iou([[0, 0, 1, 1]] * 3, []).shape == (3, 0)
    with pytest.raises(ValueError, match=r"shape \(K, 4\)"):
        pairwise_iou([[0, 0, 1]], [[0, 0, 1, 1]])


def test_pairwise_iou_degenerate_and_inverted_boxes_give_zero():
    point = [0.5, 0.5, 0.5, 0.5]  # zero area against itself: union 0 -> IoU 0, not NaN
    inverted = [0.5, 0.5, 0.0, 0.0]  # x2 < x1: area clamped to 0
    iou = pairwise_iou([point, inverted], [point, [0, 0, 0.5, 0.5]])
    np.testing.assert_array_equal(iou, np.zeros((2, 2)))


def test_pairwise_iou_is_finite_for_huge_nan_and_infinite_coordinates():
    weird = [[1e300, -1e300, 1e308, 1e300], [-1e308, -1e308, 1e308, 1e308], [np.nan, 0, 1, 1],
             [0, 0, np.inf, 1], [-5, -5, -1, -1]]
    iou = pairwise_iou(weird, weird + [[0, 0, 1, 1]])
    assert np.isfinite(iou).all() and (iou >= 0).all() and (iou <= 1).all()
    # the whole-plane box (clamped to +-1e150) contains [0, 0, 1, 1]: IoU = 1 / (2e150)^2, about 2.5e-301
    assert 0 < iou[1, 5] < 1e-300
    assert iou[2].max() == 0 and iou[3].max() == 0  # NaN / inf rows score 0 with everything

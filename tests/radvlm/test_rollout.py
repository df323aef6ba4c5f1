import time

import pytest
import torch

from metrics.grounding import SoftF1
from metrics.text import GLEU
from radvlm.batch import select_rows
from radvlm.rewards import RewardTerm, compute_rewards


class Constant:
    """A metric stub: value 0.5 for every sample, lower is better (like RadCliQ)."""

    higher_is_better = False
    worst_value = 3.0

    def __init__(self):
        self.calls = []

    def score(self, preds, targets):
        self.calls.append(list(preds))
        return torch.full((len(preds),), 0.5)


class Slow(Constant):
    def score(self, preds, targets):
        time.sleep(2.0)
        return super().score(preds, targets)


class Broken(Constant):
    def score(self, preds, targets):
        raise RuntimeError("model missing")


BOX = "[0.1, 0.1, 0.5, 0.5]"


def test_each_prompt_is_scored_by_the_terms_of_its_task():
    radcliq, f1 = Constant(), SoftF1()
    terms = [RewardTerm(radcliq, 1.0, ["report_generation"], "radcliq"), RewardTerm(f1, 2.0, ["abnormality_grounding"])]
    res = compute_rewards(terms, ["a report", f"at {BOX}"], ["ref", f"at {BOX}"],
                          ["report_generation", "abnormality_grounding"], [False, False])
    # row 0: −1·0.5 = −0.5 (lower is better); row 1: 2·soft-F1 = 2·1 = 2
    torch.testing.assert_close(res.total, torch.tensor([-0.5, 2.0]))
    assert radcliq.calls == [["a report"]]
    assert torch.isnan(res.values["softf1"][0])


def test_thinking_prompts_score_only_the_answer_and_unclosed_get_the_floor():
    metric = Constant()
    texts = ["<think>long reasoning</think>\n\nThe heart is enlarged.", "<think>never closed"]
    res = compute_rewards([RewardTerm(metric)], texts, ["r", "r"], ["report_generation"] * 2, [True, True])
    assert metric.calls == [["The heart is enlarged."]]  # the trace is never scored, the unclosed row not at all
    # closed: −0.5; unclosed: worst value 3 → reward −3 (the authors' −3 for a missing </think>)
    torch.testing.assert_close(res.total, torch.tensor([-0.5, -3.0]))
    assert res.closed.tolist() == [True, False]


def test_boxes_inside_the_thinking_trace_are_not_counted():
    texts = [f"<think>maybe {BOX}</think> No abnormalities or lesions are detected on this Chest X-ray."]
    res = compute_rewards([RewardTerm(SoftF1())], texts, [f"at {BOX}"], ["abnormality_grounding"], [True])
    assert res.total.tolist() == [0.0]


def test_failing_and_slow_rewards_are_nan_and_counted():
    rows = ["a", "b"]
    res = compute_rewards([RewardTerm(Broken(), name="broken")], rows, rows, [None, None], [False, False])
    assert torch.isnan(res.total).all() and res.failed == {"broken": 2}
    start = time.perf_counter()
    res = compute_rewards([RewardTerm(Slow(), name="slow")], rows, rows, [None, None], [False, False], timeout=0.2)
    assert time.perf_counter() - start < 1.5
    assert torch.isnan(res.total).all() and res.failed == {"slow": 2}


def test_a_task_without_reward_is_a_configuration_error():
    with pytest.raises(ValueError, match="classification"):
        compute_rewards([RewardTerm(GLEU(), tasks=["report_generation"])], ["x"], ["y"], ["classification"], [False])


def test_select_rows_takes_matching_image_patches():
    batch = {"input_ids": torch.arange(6).reshape(3, 2), "image_grid_thw": torch.tensor([[1, 2, 2]] * 3),
             "pixel_values": torch.arange(12).float().reshape(12, 1)}
    sub = select_rows(batch, [2, 0])
    assert sub["input_ids"].tolist() == [[4, 5], [0, 1]]
    assert sub["pixel_values"].reshape(-1).tolist() == [8, 9, 10, 11, 0, 1, 2, 3]


def test_rewards_are_float32_under_a_bf16_default_dtype():
    """``bf16-true`` makes bfloat16 the default dtype around every step: rewards must still be float32 (this
    crashed with "Index put requires the source and destination dtypes match" before)."""
    from metrics.grounding import SoftF1

    terms = [RewardTerm(SoftF1(), tasks=["abnormality_grounding"]), RewardTerm(GLEU(), tasks=["report_generation"])]
    args = (["[0.1, 0.2, 0.3, 0.4]", "Heart is enlarged.", "no box"], ["[0.1, 0.2, 0.3, 0.41]", "Heart enlarged.",
            "[0.5, 0.5, 0.6, 0.6]"], ["abnormality_grounding", "report_generation", "abnormality_grounding"],
            [False, False, False])
    expected = compute_rewards(terms, *args)
    torch.set_default_dtype(torch.bfloat16)
    try:
        result = compute_rewards(terms, *args, timeout=5.0)
        assert torch.get_default_dtype() == torch.bfloat16
    finally:
        torch.set_default_dtype(torch.float32)
    assert result.total.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in result.values.values())
    torch.testing.assert_close(result.total, expected.total, rtol=0, atol=0)

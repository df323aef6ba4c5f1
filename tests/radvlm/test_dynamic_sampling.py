"""DAPO dynamic sampling, the pure parts: which groups are informative, how many train, what is carried, and the
rollout row operations that join groups of different generation batches (``radvlm.grpo``, ``radvlm.rollout``)."""

from __future__ import annotations

import pytest
import torch

from radvlm.grpo import DynamicSampling, DynamicSamplingError, groups_to_take, informative_groups, split_buffer
from radvlm.rollout import Rollout

NAN = float("nan")


def test_the_filter_reads_the_named_outcome_not_the_shaped_total():
    # G = 4. soft_f1 per rollout and the total after an overlong penalty of −1 on the last rollout of group 0
    soft_f1 = torch.tensor([1.0, 1.0, 1.0, 1.0,  # all correct: std 0 → no signal
                            1.0, 0.0, 1.0, 1.0])  # mean 0.75; Σ(r − m)² = 0.0625·3 + 0.5625 = 0.75; /3 → std 0.5
    total = soft_f1 + torch.tensor([0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0])  # group 0: [1, 1, 1, 0] varies
    assert informative_groups(soft_f1, 4).tolist() == [False, True]
    assert informative_groups(total, 4).tolist() == [True, True]  # the total would keep the all-correct group


def test_min_std_sets_the_floor_for_continuous_outcomes():
    # group 0: [0.2, 0.3, 0.2, 0.3]: mean 0.25, Σ(r − m)² = 4 · 0.0025 = 0.01, /3 → std 0.0577
    # group 1: [1, 0, 1, 1]: std 0.5 (above)
    values = torch.tensor([0.2, 0.3, 0.2, 0.3, 1.0, 0.0, 1.0, 1.0])
    assert informative_groups(values, 4, min_std=0.0).tolist() == [True, True]
    assert informative_groups(values, 4, min_std=0.05).tolist() == [True, True]  # 0.0577 > 0.05
    assert informative_groups(values, 4, min_std=0.06).tolist() == [False, True]  # 0.0577 ≤ 0.06
    assert informative_groups(values, 4, min_std=0.5).tolist() == [False, False]  # std must be above the floor


def test_unavailable_outcomes_never_count_as_variation():
    # group 0: one valid value (std undefined); group 1: [0, NaN, 1, NaN] → valid [0, 1], std √0.5 = 0.707
    values = torch.tensor([0.5, NAN, NAN, NAN, 0.0, NAN, 1.0, NAN])
    assert informative_groups(values, 4).tolist() == [False, True]
    assert informative_groups(torch.full((8,), NAN), 4).tolist() == [False, False]


def test_a_group_is_informative_when_any_named_term_varies():
    # terms (T = 2, B*G = 4 with G = 2): group 0 varies in term b only, group 1 in neither
    outcomes = torch.tensor([[1.0, 1.0, 0.0, 0.0],
                             [0.0, 1.0, 0.5, 0.5]])
    assert informative_groups(outcomes, 2).tolist() == [True, False]
    with pytest.raises(ValueError, match="outcomes must be"):
        informative_groups(torch.zeros(0, 4), 2)


def test_every_process_trains_a_full_batch_or_all_generate_again():
    assert groups_to_take([5, 3], target=4, gen_batches=1, max_gen_batches=3) == 0  # process 1 holds 3 < 4
    assert groups_to_take([5, 4], target=4, gen_batches=2, max_gen_batches=3) == 4  # both ≥ 4: both take 4
    assert groups_to_take([4], target=4, gen_batches=3, max_gen_batches=3) == 4  # full at the cap is fine
    assert groups_to_take([0], target=4, gen_batches=1000, max_gen_batches=None) == 0  # no cap


def test_the_cap_raises_an_error_naming_it():
    with pytest.raises(DynamicSamplingError) as info:
        groups_to_take([5, 3], target=4, gen_batches=3, max_gen_batches=3, outcome=["soft_f1"])
    message = str(info.value)
    assert "dynamic_sampling.max_gen_batches=3" in message and "3 generation batches" in message
    assert "gave 3 of the 4 informative groups" in message and "(per process: [5, 3])" in message
    assert "['soft_f1']" in message


def test_split_buffer_trains_the_oldest_and_carries_the_next_ones():
    assert split_buffer(7, take=4, max_carried=2) == ([0, 1, 2, 3], [4, 5], 1)  # group 6 dropped
    assert split_buffer(7, take=4, max_carried=4) == ([0, 1, 2, 3], [4, 5, 6], 0)
    assert split_buffer(4, take=4, max_carried=4) == ([0, 1, 2, 3], [], 0)
    assert split_buffer(5, take=2, max_carried=0) == ([0, 1], [], 3)
    with pytest.raises(ValueError, match="cannot take 5 of 4"):
        split_buffer(4, take=5, max_carried=1)


def test_dynamic_sampling_settings_are_checked():
    assert DynamicSampling(outcome="soft_f1").names == ("soft_f1",)
    assert DynamicSampling(outcome=["soft_f1", "box_format"]).names == ("soft_f1", "box_format")
    with pytest.raises(ValueError, match="outcome must name"):
        DynamicSampling(outcome=[])
    with pytest.raises(ValueError, match="min_std must be >= 0"):
        DynamicSampling(outcome="soft_f1", min_std=-0.1)
    with pytest.raises(ValueError, match="max_gen_batches must be an int >= 1"):
        DynamicSampling(outcome="soft_f1", max_gen_batches=0)
    with pytest.raises(ValueError, match="max_carried"):
        DynamicSampling(outcome="soft_f1", max_carried=-1)


def _rollout(prompts: list[list[int]], first_patch: float, texts: list[str]) -> Rollout:
    """G = 2 rollouts of len(prompts) prompts (equal lengths), each prompt's image 2 patches of D = 1."""
    g, b, p = 2, len(prompts), len(prompts[0])
    ids = torch.tensor(prompts).repeat_interleave(g, 0)  # (B*G, P)
    inputs = {"input_ids": ids, "attention_mask": torch.ones(b * g, p, dtype=torch.long),
              "mm_token_type_ids": torch.zeros(b * g, p, dtype=torch.long),
              "distinct_pixel_values": first_patch + torch.arange(2.0 * b).unsqueeze(1),  # (2B, 1)
              "distinct_image_grid_thw": torch.tensor([[1, 1, 2]] * b),  # (B, 3)
              "image_index": torch.arange(b).repeat_interleave(g)}  # (B*G,)
    c = 1 + b  # completions of width 2 or 3
    return Rollout(prompt_inputs=inputs, completion_ids=torch.full((b * g, c), 7),
                   completion_mask=torch.ones(b * g, c, dtype=torch.long), truncated=torch.zeros(b * g, dtype=torch.bool),
                   texts=texts, num_generations=g, ids=[f"p{k // g}" for k in range(b * g)],
                   targets=["t"] * (b * g), tasks=["report_generation"] * (b * g), thinking=[False] * (b * g))


def test_groups_of_two_generation_batches_join_into_one_rollout():
    a = _rollout([[11, 12, 13], [21, 22, 23]], first_patch=0.0, texts=["a0", "a1", "b0", "b1"])  # P = 3, C = 3
    b = _rollout([[31, 32]], first_patch=10.0, texts=["c0", "c1"])  # P = 2, C = 2
    second = a.groups([1])  # prompt 1 of a: its rows 2, 3 and its image (patches 2.0, 3.0)
    assert second.texts == ["b0", "b1"] and second.prompt_inputs["image_index"].tolist() == [0, 0]
    joined = Rollout.concat([second, b], pad_id=0)
    assert joined.prompt_inputs["input_ids"].tolist() == [[21, 22, 23], [21, 22, 23], [0, 31, 32], [0, 31, 32]]
    assert joined.prompt_inputs["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1], [0, 1, 1], [0, 1, 1]]
    assert joined.prompt_inputs["image_index"].tolist() == [0, 0, 1, 1]  # b's image after a's
    assert joined.prompt_inputs["distinct_pixel_values"].flatten().tolist() == [2.0, 3.0, 10.0, 11.0]
    assert joined.completion_mask.tolist() == [[1, 1, 1]] * 2 + [[1, 1, 0]] * 2  # b's completions right-padded
    assert joined.completion_ids[2:].tolist() == [[7, 7, 0]] * 2
    assert joined.texts == ["b0", "b1", "c0", "c1"] and joined.ids == ["p1", "p1", "p0", "p0"]
    assert len(joined) == 4 and joined.num_generations == 2 and joined.logprobs is None


def test_the_filter_runs_in_float64_under_a_bfloat16_default_dtype():
    # bf16-true training sets a bfloat16 default dtype: the std 0.0577 of [0.2, 0.3, 0.2, 0.3] must not round
    # across a floor of 0.0577 (bfloat16 has 8 bits of mantissa: 0.0577 → 0.0576)
    values = torch.tensor([0.2, 0.3, 0.2, 0.3], dtype=torch.float32)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        assert informative_groups(values, 4, min_std=0.0577).tolist() == [True]  # √(0.01/3) = 0.057735
        assert informative_groups(values, 4, min_std=0.0578).tolist() == [False]
    finally:
        torch.set_default_dtype(previous)

"""Shared-prefix log-prob passes (``Policy.token_logprobs(shared_prefix=True)``): each distinct prompt and its
image computed once into a KV cache, the completions attending to it, give the padded pass's log-probs (float32,
G = 4, prompts of different lengths, two images of different sizes, shared and repeated images, LoRA and full,
a micro-batch of rows out of group order)."""

from __future__ import annotations

import pytest
import torch

from radvlm.batch import append_completions, repeat_batch, select_rows
from radvlm.policy import Policy
from radvlm.prefix import prefix_groups, row_image_ids
from radvlm.rollout import Rollout
from tests.radvlm.test_vision_once import G, _completions, _policy, prompt_batch  # noqa: F401  (fixture)


def test_prefix_groups_by_hand():
    ids = torch.tensor([[0, 5, 6], [0, 5, 6], [4, 5, 6], [9, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1], [0, 1, 1]])
    first, inverse = prefix_groups(ids, mask)
    # rows 0, 1 and 3: the same attended tokens [5, 6] (row 3's 9 is padding); row 2 another prompt
    assert first.tolist() == [0, 2] and inverse.tolist() == [0, 0, 1, 0]
    first, inverse = prefix_groups(ids, mask, torch.tensor([3, 3, 3, 1]))  # row 3 shows another image
    assert first.tolist() == [0, 2, 3] and inverse.tolist() == [0, 0, 1, 2]
    first, inverse = prefix_groups(ids[[2, 0, 1]], mask[[2, 0, 1]])  # order of first appearance
    assert first.tolist() == [0, 1] and inverse.tolist() == [0, 1, 1]


def test_row_image_ids_by_hand():
    a, b = torch.zeros(4, 3), torch.ones(4, 3)
    batch = {"input_ids": torch.zeros(4, 2, dtype=torch.long), "pixel_values": torch.cat([a, b, a, b[:2]]),
             "image_grid_thw": torch.tensor([[1, 2, 2], [1, 2, 2], [1, 2, 2], [1, 1, 2]])}
    assert row_image_ids(batch).tolist() == [0, 1, 0, 3]  # row 3: another size, its own image
    assert row_image_ids({"input_ids": batch["input_ids"]}) is None
    assert row_image_ids({"image_index": torch.tensor([1, 0])}).tolist() == [1, 0]


def _batch(prompt_batch, ids, mask, shared_images):  # noqa: F811
    if shared_images:
        return Rollout.from_completions(prompt_batch, G, ids, mask, torch.zeros(2 * G, dtype=torch.bool),
                                        [""] * (2 * G)).model_batch()
    return append_completions(repeat_batch(Policy.model_inputs(prompt_batch), G), ids, mask)


@pytest.mark.parametrize("shared_images", [True, False], ids=["shared", "repeated"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_shared_prefix_pass_gives_the_padded_values(tiny_ckpt, prompt_batch, lora, shared_images):  # noqa: F811
    policy = _policy(tiny_ckpt, lora)
    ids, mask = _completions(policy, 2 * G)
    batch = _batch(prompt_batch, ids, mask, shared_images)
    assert bool((batch["attention_mask"][:, : -ids.shape[1]] == 0).any())  # prompts of different lengths
    p = batch["input_ids"].shape[1] - ids.shape[1]
    first, _ = prefix_groups(batch["input_ids"][:, :p], batch["attention_mask"][:, :p], row_image_ids(batch))
    assert first.tolist() == [0, G]  # two prompts computed once each, not 2·G rows
    with torch.no_grad():
        shared = policy.token_logprobs(batch, mask, shared_prefix=True)
        padded = policy.token_logprobs(batch, mask)
    assert bool((padded != 0).any()) and bool((shared[mask == 0] == 0).all())
    assert torch.allclose(shared, padded, atol=1e-5), (shared - padded).abs().max()


def test_shared_prefix_pass_on_a_micro_batch_out_of_group_order(tiny_ckpt, prompt_batch):  # noqa: F811
    """Token-balanced micro-batches mix the rows of groups: prompts are found by their content, not by order."""
    policy = _policy(tiny_ckpt, lora=False)
    ids, mask = _completions(policy, 2 * G)
    batch = _batch(prompt_batch, ids, mask, shared_images=True)
    rows = [5, 0, 6, 1, 2]
    sub, sub_mask = select_rows(batch, rows), mask[rows]
    with torch.no_grad():
        shared = policy.token_logprobs(sub, sub_mask, shared_prefix=True)
        padded = policy.token_logprobs(sub, sub_mask)
    assert torch.allclose(shared, padded, atol=1e-5), (shared - padded).abs().max()


def test_shared_prefix_pass_with_one_completion_token(tiny_ckpt, prompt_batch):  # noqa: F811
    policy = _policy(tiny_ckpt, lora=False)
    ids, mask = _completions(policy, 2 * G, width=1)
    mask[:] = 1
    batch = _batch(prompt_batch, ids, mask, shared_images=True)
    with torch.no_grad():
        shared = policy.token_logprobs(batch, mask, shared_prefix=True)
        padded = policy.token_logprobs(batch, mask)
    assert shared.shape == (2 * G, 1) and torch.allclose(shared, padded, atol=1e-5)


def test_shared_prefix_is_refused_with_gradients(tiny_ckpt, prompt_batch):  # noqa: F811
    policy = _policy(tiny_ckpt, lora=False)
    ids, mask = _completions(policy, 2 * G)
    with pytest.raises(ValueError, match="without gradient"):
        policy.token_logprobs(_batch(prompt_batch, ids, mask, True), mask, shared_prefix=True)

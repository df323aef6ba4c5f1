"""Padding-free log-prob passes (``Policy.token_logprobs(packed=True)``, ``radvlm.batch.pack_rows``): every
row's real tokens in one sequence with its own positions give the padded pass's log-probs and gradients
(float32, G = 4, prompts of different lengths, completions of different lengths, two images of different
sizes, shared and repeated images, LoRA and full)."""

from __future__ import annotations

import pytest
import torch

from radvlm.batch import append_completions, pack_rows, repeat_batch
from radvlm.policy import Policy
from radvlm.rollout import Rollout
from tests.radvlm.test_vision_once import G, _completions, _policy, prompt_batch  # noqa: F401  (fixture)


def test_pack_rows_by_hand():
    batch = {"input_ids": torch.tensor([[9, 1, 2], [3, 4, 5]]), "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
             "mm_token_type_ids": torch.tensor([[0, 0, 1], [0, 1, 0]]), "pixel_values": torch.ones(2, 3)}
    text = torch.tensor([[0, 0, 1], [0, 1, 2]])
    positions = torch.stack([text, text + 10, text + 20, text + 30])  # (4, N, T)
    packed, where = pack_rows(batch, positions)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert packed["mm_token_type_ids"].tolist() == [[0, 1, 0, 1, 0]]
    assert packed["position_ids"][:, 0].tolist() == [[0, 1, 0, 1, 2], [10, 11, 10, 11, 12], [20, 21, 20, 21, 22],
                                                     [30, 31, 30, 31, 32]]
    assert where.tolist() == [[-1, 0, 1], [2, 3, 4]]
    assert "attention_mask" not in packed and packed["pixel_values"] is batch["pixel_values"]


def _grads(policy, batch, mask, packed):
    policy.zero_grad(set_to_none=True)
    logp = policy.token_logprobs(batch, mask, packed=packed)  # (N, C)
    weights = torch.linspace(0.5, 1.5, logp.numel()).reshape(logp.shape)
    (logp * weights).sum().backward()
    return logp.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("shared_images", [True, False], ids=["shared", "repeated"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_packed_pass_gives_the_padded_values_and_gradients(tiny_ckpt, prompt_batch, lora, shared_images):  # noqa: F811
    policy = _policy(tiny_ckpt, lora)
    ids, mask = _completions(policy, 2 * G)
    if shared_images:
        batch = Rollout.from_completions(prompt_batch, G, ids, mask, torch.zeros(2 * G, dtype=torch.bool),
                                         [""] * (2 * G)).model_batch()
    else:
        batch = append_completions(repeat_batch(Policy.model_inputs(prompt_batch), G), ids, mask)
    assert bool((batch["attention_mask"] == 0).any())  # there is padding to remove: left (prompts) and right
    logp_p, grad_p = _grads(policy, batch, mask, packed=True)
    logp_d, grad_d = _grads(policy, batch, mask, packed=False)
    assert bool((logp_d != 0).any()) and bool((logp_p[mask == 0] == 0).all())
    assert torch.allclose(logp_p, logp_d, atol=1e-5), (logp_p - logp_d).abs().max()
    assert sorted(grad_p) == sorted(grad_d) and grad_p
    if not lora:
        assert any(".visual." in n for n in grad_p)
    for name in grad_d:
        assert torch.allclose(grad_p[name], grad_d[name], atol=1e-5, rtol=1e-4), name


def test_packed_pass_keeps_rows_apart(tiny_ckpt, prompt_batch):  # noqa: F811
    """A row's log-probs do not depend on the rows packed beside it (the mask keeps each row to itself)."""
    policy = _policy(tiny_ckpt, lora=False)
    ids, mask = _completions(policy, 2 * G)
    batch = Rollout.from_completions(prompt_batch, G, ids, mask, torch.zeros(2 * G, dtype=torch.bool),
                                     [""] * (2 * G)).model_batch()
    other = dict(batch, input_ids=batch["input_ids"].clone())
    other["input_ids"][0, -3:] = 7  # change the completion of row 0 only
    with torch.no_grad():
        a = policy.token_logprobs(batch, mask, packed=True)
        b = policy.token_logprobs(other, mask, packed=True)
    assert torch.equal(a[1:], b[1:]) or torch.allclose(a[1:], b[1:], atol=1e-6)
    assert not torch.allclose(a[0], b[0])


def test_trim_padding_by_hand():
    from radvlm.batch import trim_padding

    att = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]])  # prompt (3) | completion (3)
    batch = {"input_ids": torch.arange(12).view(2, 6), "attention_mask": att, "image_index": torch.tensor([0, 0])}
    mask = att[:, 3:]
    out, m, right = trim_padding(batch, mask)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4], [7, 8, 9, 10]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 0], [1, 1, 1, 1]]
    assert m.tolist() == [[1, 0], [1, 1]] and right == 1
    assert out["image_index"] is batch["image_index"]
    same, m2, r2 = trim_padding(batch | {"attention_mask": torch.ones(2, 6, dtype=torch.long)}, torch.ones(2, 3))
    assert r2 == 0 and same["input_ids"].shape == (2, 6)
    _, m3, r3 = trim_padding(batch, torch.zeros(2, 3))  # nothing to score: one column kept
    assert m3.shape == (2, 1) and r3 == 2


def test_trimmed_padded_pass_equals_the_full_width_computation(tiny_ckpt, prompt_batch):  # noqa: F811
    policy = _policy(tiny_ckpt, lora=False)
    ids, mask = _completions(policy, 2 * G, width=7)
    mask[:, 5:] = 0  # the last two completion columns are padding in every row
    batch = Rollout.from_completions(prompt_batch, G, ids, mask, torch.zeros(2 * G, dtype=torch.bool),
                                     [""] * (2 * G)).model_batch()
    with torch.no_grad():
        got = policy.token_logprobs(batch, mask, temperature=0.7)
        hidden = policy.hidden_states(batch)[:, -8:-1]  # (N, C, H): the full width, no trim
        logits = policy.hf_model.lm_head(hidden).float() / 0.7
        want = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask
    assert got.shape == (2 * G, 7)
    assert torch.allclose(got, want, atol=1e-5)

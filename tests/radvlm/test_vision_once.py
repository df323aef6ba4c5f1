"""Vision once per prompt: log-prob passes over rollouts run the vision tower once per distinct image
(``radvlm.batch.share_images``, ``Policy.shared_image_features``), with the values and gradients of the
repeated computation (float32, G = 4, prompts of different lengths, two images of different sizes)."""

from __future__ import annotations

import pytest
import torch

from datamodules.collate import PromptCollator
from datamodules.records import load_records
from radvlm.batch import append_completions, repeat_batch, select_rows
from radvlm.policy import LoRASettings, Policy
from radvlm.rollout import Rollout
from tests.helpers import report_record, write_records

G = 4


@pytest.fixture(scope="module")
def prompt_batch(tiny_ckpt, tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("visiononce")
    recs = [report_record(0), report_record(1)]
    recs[1]["conversations"][0]["value"] = "<image>\nDescribe the lungs and the heart of this chest X-ray in detail."
    path = write_records(folder, recs)
    rng = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(96, 128, generator=rng) * 255).byte().numpy()).save(folder / "img" / "1.png")
    processor = Policy.from_pretrained(tiny_ckpt).processor
    return PromptCollator(processor)(load_records(path))


def _completions(policy, n_rows, width=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(300, 600, (n_rows, width), generator=gen)  # (N*G, C)
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0  # rows of different lengths
    mask[6, 2:] = 0
    return ids, mask


def _policy(tiny_ckpt, lora):
    policy = Policy.from_pretrained(tiny_ckpt, dtype="float32",
                                    lora=LoRASettings(r=4, alpha=8, dropout=0.0) if lora else None)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return policy


def _grads(policy, batch, mask):
    policy.zero_grad(set_to_none=True)
    logp = policy.token_logprobs(batch, mask)  # (N, C)
    weights = torch.linspace(0.5, 1.5, logp.numel()).reshape(logp.shape)
    (logp * weights).sum().backward()
    return logp.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_shared_vision_features_give_the_repeated_values_and_gradients(tiny_ckpt, prompt_batch, lora):
    policy = _policy(tiny_ckpt, lora)
    ids, mask = _completions(policy, 2 * G)
    shared = Rollout.from_completions(prompt_batch, G, ids, mask, torch.zeros(2 * G, dtype=torch.bool),
                                      [""] * (2 * G)).model_batch()
    repeated = append_completions(repeat_batch(Policy.model_inputs(prompt_batch), G), ids, mask)
    assert "pixel_values" not in shared and shared["distinct_image_grid_thw"].shape[0] == 2
    calls = []
    visual = policy.hf_model.model.visual
    original = visual.forward
    visual.forward = lambda pixels, grid_thw, **kw: calls.append(int(grid_thw.shape[0])) or original(pixels, grid_thw,
                                                                                                     **kw)
    try:
        logp_s, grad_s = _grads(policy, shared, mask)
        logp_r, grad_r = _grads(policy, repeated, mask)
    finally:
        visual.forward = original
    assert calls == [2, 2 * G]  # the tower saw each image once instead of G times
    assert torch.allclose(logp_s, logp_r, atol=1e-5)
    assert sorted(grad_s) == sorted(grad_r) and grad_s
    if not lora:
        assert any(".visual." in n for n in grad_s)  # the tower's own gradient, summed over the G rows
    for name in grad_r:
        assert torch.allclose(grad_s[name], grad_r[name], atol=1e-5, rtol=1e-4), name


def test_selected_rows_keep_only_the_images_they_show(tiny_ckpt, prompt_batch):
    policy = _policy(tiny_ckpt, lora=False)
    ids, mask = _completions(policy, 2 * G)
    shared = Rollout.from_completions(prompt_batch, G, ids, mask, torch.zeros(2 * G, dtype=torch.bool),
                                      [""] * (2 * G)).model_batch()
    repeated = append_completions(repeat_batch(Policy.model_inputs(prompt_batch), G), ids, mask)
    rows = [5, 6, 7]  # rows of the second prompt only
    sub = select_rows(shared, rows)
    assert sub["distinct_image_grid_thw"].tolist() == prompt_batch["image_grid_thw"][1:].tolist()
    assert sub["image_index"].tolist() == [0, 0, 0]
    with torch.no_grad():
        got = policy.token_logprobs(sub, mask[rows])
        want = policy.token_logprobs(select_rows(repeated, rows), mask[rows])
    assert torch.allclose(got, want, atol=1e-5)
    mixed = select_rows(shared, [7, 0])  # rows of both prompts, out of order
    assert mixed["image_index"].tolist() == [1, 0] and mixed["distinct_image_grid_thw"].shape[0] == 2

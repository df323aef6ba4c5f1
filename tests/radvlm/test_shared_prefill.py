"""Shared-prefill rollouts (``Policy.generate(shared_prefill=True)``) give the plain path's samples."""

import pytest
import torch

from datamodules.collate import PromptCollator
from datamodules.records import load_records
from radvlm import generation as generation_module
from radvlm.generation import mrope_position_ids, shared_prefill_generate
from radvlm.policy import LoRASettings, Policy, repeat_batch
from tests.helpers import report_record, write_records


@pytest.fixture(scope="module")
def policy(tiny_ckpt):
    return Policy.from_pretrained(tiny_ckpt, dtype="float32")


@pytest.fixture(scope="module")
def prompts(policy, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shared_prefill")
    recs = [report_record(0), report_record(1)]
    # a longer second prompt: the first one is left-padded
    longer = "<image>\nPlease write the findings of a radiology report for this Chest X-ray."
    recs[1]["conversations"][0]["value"] = longer
    batch = PromptCollator(policy.processor)(load_records(write_records(folder, recs)))
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][1, 0] == 1  # padding present
    return batch


def _both(policy, prompts, seed, **kw):
    torch.manual_seed(seed)
    plain = policy.generate(prompts, **kw)
    torch.manual_seed(seed)
    shared = policy.generate(prompts, shared_prefill=True, **kw)
    return plain, shared


def _generation_config(policy, **kw):
    from transformers import GenerationConfig

    return GenerationConfig(eos_token_id=policy.stop_token_ids, pad_token_id=policy.pad_token_id,
                            suppress_tokens=policy.suppress_token_ids, use_cache=True, **kw)


def test_mrope_positions_give_image_tokens_grid_positions_and_shift_later_text(policy, prompts):
    pos = mrope_position_ids(policy.hf_model, Policy.model_inputs(prompts))  # (4, N, P)
    mask = prompts["attention_mask"]
    row = 0  # the padded row
    pad = int((mask[row] == 0).sum())
    # text row: 0 on padding, then 0, 1, 2, ... over the real tokens
    assert pos[0, row, :pad].tolist() == [0] * pad
    assert pos[0, row, pad:].tolist() == list(range(mask.shape[1] - pad))
    # a 64×64 image → 4×4 patches of 16 → 2×2 merged tokens, starting at s (the position of the token after
    # <|vision_start|>): T = s s s s, H = s s s+1 s+1, W = s s+1 s s+1; the text after the image starts at s+2
    img = (prompts["mm_token_type_ids"][row] == 1).nonzero().flatten()
    assert img.numel() == 4
    s = int(img[0]) - pad
    assert pos[1, row, img].tolist() == [s, s, s, s]
    assert pos[2, row, img].tolist() == [s, s, s + 1, s + 1]
    assert pos[3, row, img].tolist() == [s, s + 1, s, s + 1]
    after = int(img[-1]) + 1  # <|vision_end|>
    assert pos[1:, row, after].tolist() == [s + 2] * 3
    # the last prompt token: text index (P-1-pad) shifted by the rope delta 2 - 4 = -2
    last = mask.shape[1] - 1
    assert pos[1:, row, last].tolist() == [last - pad - 2] * 3


def test_mrope_positions_equal_those_hugging_face_generate_prepares(policy, prompts):
    hf = policy.hf_model
    inputs = Policy.model_inputs(prompts)
    kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
    saved = hf.model.rope_deltas
    try:
        reference = hf._prepare_position_ids_for_generation(inputs["input_ids"], dict(kwargs))  # (4, N, P)
    finally:
        hf.model.rope_deltas = saved
    assert torch.equal(mrope_position_ids(hf, inputs), reference)


def test_greedy_rollouts_are_token_identical(policy, prompts):
    plain, shared = _both(policy, prompts, 0, num_return_sequences=3, max_new_tokens=24)
    assert plain.completion_ids.shape == (6, 24)
    assert torch.equal(plain.completion_ids, shared.completion_ids)
    assert torch.equal(plain.completion_mask, shared.completion_mask)
    assert torch.equal(plain.prompt_ids, shared.prompt_ids)
    assert plain.texts == shared.texts


def test_sampled_rollouts_are_identical_for_the_same_seed(policy, prompts):
    kw = {"num_return_sequences": 4, "max_new_tokens": 24, "do_sample": True, "temperature": 0.7, "top_p": 0.9,
          "top_k": 40}
    plain, shared = _both(policy, prompts, 11, **kw)
    assert torch.equal(plain.completion_ids, shared.completion_ids)
    assert torch.equal(plain.truncated, shared.truncated)
    # the 8 samples are not all one sequence, and another seed gives other samples
    assert len({tuple(r) for r in shared.completion_ids.tolist()}) > 2
    torch.manual_seed(12)
    other = policy.generate(prompts, shared_prefill=True, **kw)
    assert not torch.equal(other.completion_ids, shared.completion_ids)
    assert not torch.isin(shared.completion_ids, torch.tensor(policy.suppress_token_ids)).any()


def test_every_step_logits_match_the_plain_path(policy, prompts):
    hf, g = policy.hf_model, 2
    inputs = Policy.model_inputs(prompts)
    config = _generation_config(policy, max_new_tokens=10, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    plain = hf.generate(**repeat_batch(inputs, g), generation_config=config)
    shared = shared_prefill_generate(hf, inputs, g, config)
    assert len(plain.logits) == len(shared.logits) == 10
    for a, b in zip(plain.logits, shared.logits):  # each (N*G, V)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_wrong_rope_positions_would_change_the_logits(policy, prompts, monkeypatch):
    """Control for the test above: without the image's rope delta the cached decode is measurably different."""
    hf = policy.hf_model
    inputs = Policy.model_inputs(prompts)
    config = _generation_config(policy, max_new_tokens=3, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    right = shared_prefill_generate(hf, inputs, 2, config)

    def text_only(model, batch):  # (4, N, P): ignores the image grid
        mask = batch["attention_mask"]
        text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        return text.unsqueeze(0).expand(4, -1, -1)

    monkeypatch.setattr(generation_module, "mrope_position_ids", text_only)
    wrong = shared_prefill_generate(hf, inputs, 2, config)
    assert (wrong.logits[0] - right.logits[0]).abs().max() > 1e-4


def test_vision_tower_sees_each_image_once_instead_of_g_times(policy, prompts):
    seen = []
    hook = policy.hf_model.model.visual.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        _both(policy, prompts, 0, num_return_sequences=4, max_new_tokens=2)
    finally:
        hook.remove()
    patches = int(prompts["pixel_values"].shape[0])  # 2 images × 16 patches
    assert seen == [4 * patches, patches]  # plain path: every image 4 times; shared: once


def test_shared_prefill_with_lora_adapters_matches_plain_path(tiny_ckpt, prompts):
    lora = Policy.from_pretrained(tiny_ckpt, lora=LoRASettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.add_(0.3)  # active adapters change the samples
    plain, shared = _both(lora, prompts, 5, num_return_sequences=2, max_new_tokens=12, do_sample=True)
    assert torch.equal(plain.completion_ids, shared.completion_ids)
    assert lora.model.training  # generate restores train mode


def test_right_padded_prompts_are_refused(policy, prompts):
    inputs = Policy.model_inputs(prompts)
    bad = dict(inputs, attention_mask=inputs["attention_mask"].flip(1))
    with pytest.raises(ValueError, match="left-padded"):
        shared_prefill_generate(policy.hf_model, bad, 2, _generation_config(policy, max_new_tokens=2))


def test_shared_prefill_fills_the_cache_with_gradient_checkpointing_on(tiny_ckpt, prompts):
    ckpt = Policy.from_pretrained(tiny_ckpt, gradient_checkpointing=True)
    assert ckpt.hf_model.training and ckpt.hf_model.is_gradient_checkpointing
    inputs = Policy.model_inputs(prompts)
    config = _generation_config(ckpt, max_new_tokens=6, do_sample=False)
    shared = shared_prefill_generate(ckpt.hf_model, inputs, 2, config)  # called in train mode on purpose
    plain = ckpt.hf_model.generate(**repeat_batch(inputs, 2), generation_config=config)
    assert torch.equal(shared, plain)
    assert ckpt.hf_model.training  # mode restored

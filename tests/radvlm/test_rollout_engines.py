"""The rollout seam: ``Rollout`` rows, ``HFEngine``, ``FastHFEngine`` (LoRA merged, chunked, static cache)."""

import pytest
import torch

from datamodules.collate import PromptCollator
from datamodules.records import load_records
from radvlm.fast_engine import FastHFEngine, merged_lora, prompt_chunks
from radvlm.policy import LoRASettings, Policy
from radvlm.rollout import HFEngine, Rollout, RolloutEngine, Sampling
from tests.helpers import report_record, write_records


@pytest.fixture(scope="module")
def lora_policy(tiny_ckpt):
    """A LoRA policy whose adapters are not zero (B is zero at init: the merge would be trivial)."""
    policy = Policy.from_pretrained(tiny_ckpt, dtype="float32", lora=LoRASettings(r=4, alpha=8, dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return policy


@pytest.fixture(scope="module")
def prompts(lora_policy, tmp_path_factory):
    folder = tmp_path_factory.mktemp("engines")
    recs = [report_record(i) for i in range(3)]
    recs[1]["conversations"][0]["value"] = "<image>\nPlease write the findings of a radiology report for this X-ray."
    return PromptCollator(lora_policy.processor)(load_records(write_records(folder, recs)))


GREEDY = Sampling(num_generations=2, max_new_tokens=6, do_sample=False)


def test_engines_satisfy_the_protocol():
    assert isinstance(HFEngine(), RolloutEngine) and isinstance(FastHFEngine(), RolloutEngine)


def test_hf_engine_rollout_groups_rows_and_repeats_prompt_fields(lora_policy, prompts):
    rollout = HFEngine(shared_prefill=True).generate(lora_policy, prompts, GREEDY)
    assert len(rollout) == 6 and rollout.num_generations == 2
    assert rollout.ids == [i for i in prompts["ids"] for _ in range(2)]
    assert rollout.targets == [t for t in prompts["targets"] for _ in range(2)]
    assert rollout.prompt_inputs["input_ids"].shape[0] == 6 and rollout.prompt_inputs["image_grid_thw"].shape[0] == 6
    batch = rollout.model_batch()
    assert batch["input_ids"].shape[1] == prompts["input_ids"].shape[1] + rollout.completion_ids.shape[1]


def test_merged_lora_restores_the_weights_bit_exactly(lora_policy, prompts):
    before = {k: v.clone() for k, v in lora_policy.model.state_dict().items()}
    batch = Policy.model_inputs(prompts)
    lora_policy.eval()
    with torch.no_grad():
        unmerged = lora_policy(batch)
        with merged_lora(lora_policy.model) as merged_layers:
            merged = lora_policy(batch)
            changed = [k for k, v in lora_policy.model.state_dict().items() if not torch.equal(v, before[k])]
    lora_policy.train()
    assert merged_layers > 0 and changed  # the base weights really held W + s·B@A inside the block
    assert torch.allclose(merged, unmerged, atol=1e-4)  # same function, other rounding
    after = lora_policy.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # bit-identical afterwards


def test_prompt_chunks_fit_the_memory_budget():
    # 5 prompts, G = 2, 10 bytes a row, budget 45 → 2 prompts (40 bytes) a chunk
    assert prompt_chunks(5, 2, 10, 45) == [[0, 1], [2, 3], [4]]
    assert prompt_chunks(5, 2, 10, 5) == [[0], [1], [2], [3], [4]]  # at least one prompt a chunk
    assert prompt_chunks(5, 2, 10, None) == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("engine", [
    FastHFEngine(),
    FastHFEngine(decode_memory_gib=1e-9),  # one prompt a chunk
    FastHFEngine(shared_prefill=False, static_cache=True, compile=False),
], ids=["merged", "chunked", "static_cache"])
def test_fast_engine_gives_the_eager_greedy_ids_in_float32(lora_policy, prompts, engine):
    before = {k: v.clone() for k, v in lora_policy.model.state_dict().items()}
    eager = HFEngine(shared_prefill=False).generate(lora_policy, prompts, GREEDY)
    fast = engine.generate(lora_policy, prompts, GREEDY)
    width = min(eager.completion_ids.shape[1], fast.completion_ids.shape[1])
    assert torch.equal(fast.completion_mask.sum(1), eager.completion_mask.sum(1))
    assert torch.equal(fast.completion_ids[:, :width] * fast.completion_mask[:, :width],
                       eager.completion_ids[:, :width] * eager.completion_mask[:, :width])
    assert fast.texts == eager.texts and torch.equal(fast.truncated, eager.truncated)
    assert all(torch.equal(v, before[k]) for k, v in lora_policy.model.state_dict().items())


def test_fast_engine_refuses_static_cache_with_shared_prefill():
    with pytest.raises(ValueError, match="static_cache"):
        FastHFEngine(shared_prefill=True, static_cache=True)


def test_rollout_from_completions_without_thinking_field(lora_policy, prompts):
    batch = {k: v for k, v in prompts.items() if k != "thinking"}
    rollout = Rollout.from_completions(batch, 2, torch.zeros(6, 1, dtype=torch.long),
                                       torch.ones(6, 1, dtype=torch.long), torch.zeros(6, dtype=torch.bool), [""] * 6)
    assert rollout.thinking == [False] * 6

import pytest
import torch

from datamodules.collate import PromptCollator, SFTCollator
from datamodules.records import load_records
from radvlm.generation import completion_mask_from_ids
from radvlm.policy import LoRASettings, Policy, repeat_batch
from tests.helpers import report_record, write_records


@pytest.fixture(scope="module")
def policy(tiny_ckpt):
    torch.manual_seed(0)
    return Policy.from_pretrained(tiny_ckpt, dtype="float32")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recs")
    recs = [report_record(i, "The heart is normal." + " No effusion." * i) for i in range(3)]
    return load_records(write_records(folder, recs))


def test_from_pretrained_returns_train_mode_and_tiny_size(policy):
    assert policy.model.training
    n = sum(p.numel() for p in policy.parameters())
    assert 3e5 < n < 3e6


def test_sft_loss_equals_full_logits_cross_entropy(policy, records):
    batch = SFTCollator(policy.processor)(records)
    total, count = policy.sft_loss(batch, chunk_size=7)  # several chunks
    logits = policy(batch)[:, :-1]
    ref = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(total / count, ref, rtol=1e-5, atol=1e-5)


def _rollout_batch(policy, records, g=2, max_new_tokens=6):
    prompts = PromptCollator(policy.processor)(records)
    torch.manual_seed(1)
    out = policy.generate(prompts, num_return_sequences=g, max_new_tokens=max_new_tokens, do_sample=True)
    batch = repeat_batch(Policy.model_inputs(prompts), g)
    batch["input_ids"] = torch.cat([batch["input_ids"], out.completion_ids], 1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], out.completion_mask], 1)
    batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(out.completion_mask).int()], 1)
    return prompts, out, batch


def test_token_logprobs_match_log_softmax_of_full_logits(policy, records):
    _, out, batch = _rollout_batch(policy, records)
    lp, ent = policy.token_logprobs(batch, out.completion_mask, temperature=0.7, chunk_size=4, return_entropy=True)
    c = out.completion_ids.shape[1]
    full = (policy(batch)[:, -c - 1 : -1].float() / 0.7).log_softmax(-1)
    ref = full.gather(-1, out.completion_ids.unsqueeze(-1)).squeeze(-1) * out.completion_mask
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)
    ref_ent = -(full.exp() * full).sum(-1) * out.completion_mask
    torch.testing.assert_close(ent, ref_ent, rtol=1e-4, atol=1e-4)


def test_entropy_keeps_its_gradient_only_when_asked(policy, records):
    # the entropy bonus back-propagates through the full-vocabulary entropy of the checkpointed chunks: its
    # gradient equals that of the entropy of the full logits (the reference of the test above)
    _, out, batch = _rollout_batch(policy, records)
    _, ent = policy.token_logprobs(batch, out.completion_mask, temperature=0.7, chunk_size=4, return_entropy=True)
    assert not ent.requires_grad
    params = [p for p in policy.parameters() if p.requires_grad]
    _, ent = policy.token_logprobs(batch, out.completion_mask, temperature=0.7, chunk_size=4, return_entropy=True,
                                   entropy_grad=True)
    got = torch.autograd.grad(ent.sum(), params[-1])[0]
    c = out.completion_ids.shape[1]
    full = (policy(batch)[:, -c - 1 : -1].float() / 0.7).log_softmax(-1)
    ref = torch.autograd.grad((-(full.exp() * full).sum(-1) * out.completion_mask).sum(), params[-1])[0]
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-5)


def test_generate_groups_rollouts_contiguously_and_never_samples_vision_tokens(policy, records):
    prompts, out, _ = _rollout_batch(policy, records, g=3, max_new_tokens=12)
    assert out.completion_ids.shape[0] == 3 * len(records)
    assert len(out.texts) == 9
    # prompts of group i are all equal to prompt i
    for i in range(len(records)):
        assert torch.equal(out.prompt_ids[3 * i], out.prompt_ids[3 * i + 2])
    banned = torch.tensor(policy.suppress_token_ids)
    assert not torch.isin(out.completion_ids, banned).any()


def test_completion_mask_stops_after_first_stop_token():
    ids = torch.tensor([[5, 9, 7, 9], [5, 6, 7, 8]])
    mask, truncated = completion_mask_from_ids(ids, [9])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, True]


def test_repeat_batch_repeats_image_patches_per_sample(policy, records):
    prompts = PromptCollator(policy.processor)(records)
    rep = repeat_batch(Policy.model_inputs(prompts), 2)
    per_image = int(prompts["image_grid_thw"][0].prod())
    assert rep["pixel_values"].shape[0] == 2 * prompts["pixel_values"].shape[0]
    torch.testing.assert_close(rep["pixel_values"][:per_image], rep["pixel_values"][per_image : 2 * per_image])
    assert torch.equal(rep["input_ids"][0], rep["input_ids"][1])


def test_lora_trains_only_adapters_and_reference_disables_them(tiny_ckpt, records):
    policy = Policy.from_pretrained(tiny_ckpt, lora=LoRASettings(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("visual" in n for n in trainable)  # language model only by default
    batch = SFTCollator(policy.processor)(records)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)  # make the adapters matter
        with_adapters = policy(batch)
        with policy.reference():
            reference = policy(batch)
    base = Policy.from_pretrained(tiny_ckpt)
    with torch.no_grad():
        torch.testing.assert_close(reference, base(batch), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_adapters, reference)


def test_reference_without_lora_is_an_error(policy):
    with pytest.raises(RuntimeError, match="LoRA"):
        with policy.reference():
            pass


def test_saved_policy_round_trips(policy, records, tmp_path):
    policy.save_pretrained(tmp_path / "export")
    again = Policy.from_pretrained(tmp_path / "export")
    batch = SFTCollator(policy.processor)(records)
    with torch.no_grad():
        torch.testing.assert_close(policy(batch), again(batch))

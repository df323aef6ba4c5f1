"""``VLLMEngine`` against a stand-in with vLLM 0.28–0.30's API (``tests/fake_vllm.py``), on CPU.

The stand-in runs the tiny Hugging Face model it loaded, so what reaches it (arguments, weights, prompt ids,
images) decides its samples and log-probs: a wrong weight sync, prompt or image shows up as a log-prob gap
to the trainer, as with the real engine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.collate import PromptCollator
from datamodules.images import load_image
from datamodules.records import load_records
from radvlm.lora import lora_scalings, merge_lora_state_dict
from radvlm.policy import LoRASettings, PolicyConfig
from radvlm.rollout import Sampling
from radvlm.rollout_correction import logprob_agreement
from tests import fake_vllm
from tests.helpers import report_record, write_records

SAMPLE = Sampling(num_generations=2, max_new_tokens=6, temperature=1.0)


@pytest.fixture()
def vllm(monkeypatch):
    return fake_vllm.install(monkeypatch)


@pytest.fixture(scope="module")
def lora_policy(tiny_ckpt):
    """LoRA with non-zero B (a trivial merge would hide a wrong one), pixel budget set on the processor."""
    policy = PolicyConfig(str(tiny_ckpt), dtype="float32", lora=LoRASettings(r=4, alpha=8, dropout=0.0),
                          min_pixels=1024, max_pixels=128 * 128).build()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return policy


def _batch(policy, folder, n=2, question=None, sixteen_bit=False):
    recs = [report_record(i) for i in range(n)]
    if question:
        recs[-1]["conversations"][0]["value"] = "<image>\n" + question
    path = write_records(folder, recs)
    if sixteen_bit:  # a 16-bit radiograph: PIL's own RGB conversion would clip it to white
        arr = (np.linspace(0, 60000, 96 * 96).reshape(96, 96)).astype(np.uint16)
        Image.fromarray(arr).save(folder / "img" / "0.png")
    return PromptCollator(policy.processor, max_length=512)(load_records(path))


def _engine(policy, **kw):
    from radvlm.vllm_engine import VLLMEngine

    engine = VLLMEngine(**kw)
    engine.setup(policy, max_model_len=512 + SAMPLE.max_new_tokens, seed=3)
    return engine


def test_engine_arguments_follow_vllm_and_the_policy(vllm, lora_policy):
    from radvlm.vllm_engine import engine_kwargs

    single = engine_kwargs(lora_policy, 600, 0.4, True, seed=5, world_size=1)
    assert single["mm_processor_kwargs"] == {"size": {"shortest_edge": 1024, "longest_edge": 128 * 128}}
    assert single["logprobs_mode"] == "processed_logprobs" and single["generation_config"] == "vllm"
    assert single["max_model_len"] == 600 and single["seed"] == 5 and single["limit_mm_per_prompt"] == {"image": 1}
    assert "distributed_executor_backend" not in single
    assert engine_kwargs(lora_policy, 600, 0.4, True, 5, world_size=2)["distributed_executor_backend"] == \
        "external_launcher"
    bf16 = PolicyConfig(lora_policy.hf_model.config._name_or_path, dtype="bfloat16")
    assert engine_kwargs(bf16.build(), 600, 0.4, True, 5, 1)["dtype"] == "bfloat16"  # compute, not master dtype


def test_a_vllm_outside_the_range_is_refused_with_the_range(vllm, monkeypatch):
    from radvlm.vllm_engine import VLLM_RANGE, require_vllm

    assert require_vllm() is vllm
    monkeypatch.setattr(vllm, "__version__", "0.34.0")
    with pytest.raises(ImportError, match=VLLM_RANGE.replace("<", "<").replace(">", ">")):
        require_vllm()


def test_setup_builds_asleep_and_keeps_the_trainers_random_state(vllm, lora_policy):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    engine = _engine(lora_policy)
    assert torch.equal(torch.rand(3), expected)  # vLLM reseeded its own generators, not the trainer's
    assert engine.llm.calls[-1] == ("sleep", 2) and engine.llm.asleep == {"weights", "kv_cache"}
    assert engine.llm.kwargs["seed"] == 3 and engine.llm.kwargs["enable_sleep_mode"] is True
    assert engine.llm.llm_engine.model_executor is None  # multiprocess by default: no driver worker to reach


def test_sync_streams_exactly_the_merged_weights_in_bounded_buckets(vllm, lora_policy):
    engine = _engine(lora_policy, sync_bucket_mib=1)
    engine.sync_weights(lora_policy)
    merged = merge_lora_state_dict(lora_policy.model.state_dict(), lora_scalings(lora_policy.model))
    model = engine.llm.model
    assert sorted(model.loaded) == sorted(model.params) == sorted(k for k in merged if k in model.params)
    for name, value in model.params.items():
        assert torch.equal(value, merged[name]), name
    largest = max(t.numel() * t.element_size() for t in merged.values())
    assert model.max_call_bytes <= max(2**20, largest)  # one bucket at a time
    names = [c[0] for c in engine.llm.calls]
    assert names.index("wake_up") < names.index("collective_rpc") < names.index("reset_prefix_cache")
    assert engine.llm.calls[names.index("wake_up")] == ("wake_up", ("weights",))
    assert engine.llm.calls[-1] == ("wake_up", ("kv_cache",)) and engine.llm.llm_engine.encoder_resets == 1


def test_rollout_after_a_resume_uses_the_current_weights(vllm, lora_policy, tmp_path):
    engine = _engine(lora_policy)  # built from the checkpoint on disk, then asleep (weights discarded)
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(lora_policy, _batch(lora_policy, tmp_path), SAMPLE)
    engine.sync_weights(lora_policy)  # the first rollout of a resumed run syncs first, as every one
    rollout = engine.generate(lora_policy, _batch(lora_policy, tmp_path), SAMPLE)
    assert len(rollout) == 4 and engine.synced_steps == 1


def test_prompts_and_images_reach_the_engine_as_training_sees_them(vllm, lora_policy, tmp_path):
    engine = _engine(lora_policy)
    batch = _batch(lora_policy, tmp_path, sixteen_bit=True)
    engine.sync_weights(lora_policy)
    engine.generate(lora_policy, batch, SAMPLE)
    got = engine.llm.received[0]
    pad = lora_policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert got["prompt_token_ids"].count(pad) == 1  # one placeholder: vLLM expands it itself
    own = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert got["expanded"] == own  # expanded by the engine's processor: the trainer's very prompt
    assert np.array_equal(np.asarray(got["image"]), np.asarray(load_image(tmp_path / "img" / "0.png")))
    naive = np.asarray(Image.open(tmp_path / "img" / "0.png").convert("RGB"))  # PIL clips 16 bit at 255
    assert naive.mean() > 200 and 100 < np.asarray(got["image"]).mean() < 160  # min-max scaled, not white


def test_wider_later_batches_are_accepted_and_past_the_limit_refused(vllm, lora_policy, tmp_path):
    engine = _engine(lora_policy)
    engine.sync_weights(lora_policy)
    engine.generate(lora_policy, _batch(lora_policy, tmp_path / "a"), SAMPLE)
    engine.sync_weights(lora_policy)
    wide = _batch(lora_policy, tmp_path / "b", question="Describe the heart, the lungs, the pleura, the bones "
                  "and every device in this chest X-ray in the form of a radiology report.")
    assert wide["input_ids"].shape[1] > _batch(lora_policy, tmp_path / "c")["input_ids"].shape[1]
    assert len(engine.generate(lora_policy, wide, SAMPLE)) == 4
    engine.max_model_len = 20
    with pytest.raises(ValueError, match="max_model_len=20"):
        engine.generate(lora_policy, wide, SAMPLE)


def test_engine_logprobs_agree_with_the_trainer_after_a_sync(vllm, lora_policy, tmp_path):
    engine = _engine(lora_policy)
    batch = _batch(lora_policy, tmp_path)
    engine.sync_weights(lora_policy)
    rollout = engine.generate(lora_policy, batch, SAMPLE)
    trainer = lora_policy.token_logprobs(rollout.model_batch(), rollout.completion_mask)
    known = torch.isfinite(rollout.logprobs) & rollout.completion_mask.bool()
    mean, _ = logprob_agreement(trainer.detach(), torch.nan_to_num(rollout.logprobs), known.long())
    # same weights, prompt and image: the same distribution, but for the vision tokens the engine suppresses
    # (its processed log-probs renormalise without them; measured 0.005 nats for this random tiny model)
    assert mean < 0.02, mean
    # the image of another record: the engine's distribution is no longer the trainer's
    other = _batch(lora_policy, tmp_path / "other")
    batch["pil_images"] = [Image.new("RGB", (64, 64), 255)] * len(batch["ids"])
    engine.sync_weights(lora_policy)
    wrong = engine.generate(lora_policy, batch, SAMPLE)
    trainer = lora_policy.token_logprobs(wrong.model_batch(), wrong.completion_mask)
    known = torch.isfinite(wrong.logprobs) & wrong.completion_mask.bool()
    assert logprob_agreement(trainer.detach(), torch.nan_to_num(wrong.logprobs), known.long())[0] > 5 * mean
    assert other["input_ids"].shape[0] == 2


def test_outputs_become_a_grouped_rollout_with_the_stop_token(vllm, lora_policy, tmp_path):
    from radvlm.vllm_engine import SUPPRESS_BIAS, VLLMEngine, rollout_from_outputs

    kwargs = VLLMEngine.sampling_kwargs(lora_policy, Sampling(num_generations=2, max_new_tokens=6, temperature=0.7))
    assert kwargs["logprobs"] == 0 and kwargs["top_k"] == 0 and kwargs["temperature"] == 0.7
    assert kwargs["logit_bias"] == {t: SUPPRESS_BIAS for t in lora_policy.suppress_token_ids}
    stop = lora_policy.stop_token_ids[0]
    lp = lambda ids: [{t: fake_vllm.Logprob(-0.5)} for t in ids]  # noqa: E731
    out = [fake_vllm.RequestOutput("0", [], [
        fake_vllm.CompletionOutput(0, "", [300, 301], None, lp([300, 301]), "stop", stop),  # stop token left out
        fake_vllm.CompletionOutput(1, "", [302, stop], None, lp([302, stop]), "stop")])]
    batch = _batch(lora_policy, tmp_path, n=1)
    rollout = rollout_from_outputs(lora_policy, batch, Sampling(num_generations=2, max_new_tokens=6), out)
    assert rollout.completion_ids[0].tolist() == [300, 301, stop] and rollout.completion_mask.sum(1).tolist() == [3, 2]
    assert rollout.logprobs[0, :2].tolist() == [-0.5, -0.5] and torch.isnan(rollout.logprobs[0, 2])  # unknown
    assert rollout.logprobs[1].tolist() == [-0.5, -0.5, 0.0]  # padding 0


def _grpo_fit(tiny_ckpt, folder, **module_kw):
    import lightning as L

    from datamodules.datamodule import RadVLMDataModule
    from lightning_modules.grpo import GRPOModule
    from metrics.text import GLEU
    from radvlm.rewards import RewardTerm
    from radvlm.vllm_engine import VLLMEngine

    class Length(GLEU):
        def score(self, preds, targets):
            return torch.tensor([len(p) / 10 for p in preds], dtype=torch.float32)

    data_file = write_records(folder, [report_record(i) for i in range(4)])
    module = GRPOModule(PolicyConfig(str(tiny_ckpt), dtype="float32"), rewards=[RewardTerm(Length())],
                        num_generations=2, max_new_tokens=6, beta=0.0, engine=VLLMEngine(), **module_kw)
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[str(data_file)], collator=PromptCollator, batch_size=2,
                            max_length=256, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, default_root_dir=folder)
    trainer.fit(module, data)
    return trainer, module


def test_grpo_with_the_engine_logs_the_agreement_and_corrects_by_default(vllm, tiny_ckpt, tmp_path):
    trainer, module = _grpo_fit(tiny_ckpt, tmp_path)
    metrics = trainer.callback_metrics
    assert trainer.global_step == 2 and module.engine.synced_steps == 2
    assert module.engine.llm.kwargs["max_model_len"] == 256 + 6  # data.max_length + max_new_tokens
    assert float(metrics["train/rollout_logprob_diff"]) < 0.05
    assert 0 < float(metrics["train/rollout_is_mean"]) <= 2.0  # vLLM's default: token-level weights, cap 2


def test_a_trainer_engine_mismatch_stops_the_run_at_the_first_step(vllm, tiny_ckpt, tmp_path, monkeypatch):
    from lightning_modules.grpo import RolloutMismatchError
    from radvlm import vllm_engine

    def no_sync(worker, weights):  # the engine keeps other weights than the trainer's
        model = worker.get_model()
        with torch.no_grad():
            for name, _ in weights:
                model.params[name].copy_(torch.randn_like(model.params[name]) * 0.5)
        return len(weights)

    monkeypatch.setattr(vllm_engine, "load_into_worker", no_sync)
    with pytest.raises(RolloutMismatchError, match="max_rollout_logprob_diff=0.5"):
        _grpo_fit(tiny_ckpt, tmp_path, rollout_correction=False)

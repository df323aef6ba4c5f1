"""GRPOModule picks its rollout engine: the flat ``shared_prefill`` maps onto the default HF engine."""

import pytest

from lightning_modules.grpo import GRPOModule
from metrics.text import GLEU
from radvlm.fast_engine import FastHFEngine
from radvlm.policy import PolicyConfig
from radvlm.rewards import RewardTerm
from radvlm.rollout import HFEngine, Sampling


def make(**kw):
    return GRPOModule(PolicyConfig("unused", dtype="float32"), rewards=[RewardTerm(GLEU())], **kw)


def test_flat_shared_prefill_selects_the_default_hf_engine():
    engine = make(shared_prefill=True).engine
    assert type(engine) is HFEngine and engine.shared_prefill
    assert type(make().engine) is HFEngine and not make().engine.shared_prefill


def test_explicit_engine_is_used_and_kept_out_of_the_hyperparameters():
    module = make(engine=FastHFEngine(decode_memory_gib=1.0))
    assert isinstance(module.engine, FastHFEngine)
    assert "engine" not in module.hparams  # checkpoints hold plain values only (weights_only loading)


def test_shared_prefill_with_an_explicit_engine_is_refused():
    with pytest.raises(ValueError, match="set it on the engine"):
        make(shared_prefill=True, engine=FastHFEngine())


def test_sampling_groups_the_flat_arguments():
    module = make(num_generations=4, max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=5)
    assert module.sampling == Sampling(num_generations=4, max_new_tokens=12, temperature=0.7, top_p=0.9, top_k=5)

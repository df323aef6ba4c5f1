"""What the modules expose instead of private handshakes: the prediction budget each stage defines
(``predict_max_new_tokens``), evaluation metrics logged when torchmetrics says they were updated
(``update_called``), and GRPO checkpoint loading that skips only ``NOT_CHECKPOINTED`` keys, as strict as asked
otherwise."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lightning_modules.common import PolicyModule
from lightning_modules.grpo import GRPOModule
from lightning_modules.sft import SFTModule
from metrics.text import GLEU
from radvlm.policy import PolicyConfig
from radvlm.rewards import RewardTerm


def grpo(tiny_ckpt, **kw) -> GRPOModule:
    return GRPOModule(PolicyConfig(str(tiny_ckpt), dtype="float32"), rewards=[RewardTerm(GLEU())], num_generations=2,
                      **kw)


def test_each_stage_defines_its_prediction_budget(tiny_ckpt):
    assert SFTModule(PolicyConfig(str(tiny_ckpt)), max_new_tokens=7).predict_max_new_tokens == 7
    assert grpo(tiny_ckpt, max_new_tokens=9, val_max_new_tokens=5).predict_max_new_tokens == 5
    assert grpo(tiny_ckpt, max_new_tokens=9).predict_max_new_tokens == 9

    class Stage(PolicyModule):  # a stage that does not say: a clear error, not a guess from hparams names
        def __init__(self) -> None:
            super().__init__(PolicyConfig(str(tiny_ckpt)))
            self.save_hyperparameters({"max_new_tokens": 3})

    with pytest.raises(NotImplementedError, match="Stage does not define predict_max_new_tokens"):
        _ = Stage().predict_max_new_tokens


def test_evaluation_logs_only_the_metrics_that_were_updated():
    updated, idle = GLEU(), GLEU()
    updated.update(["the heart is enlarged"], ["the heart is enlarged"])
    logged = {}
    module = SimpleNamespace(val_metric_modules={"gleu": updated, "idle": idle}, _val_chars=[4, 6], _val_rows=[],
                             log=lambda name, value, **kw: logged.__setitem__(name, value),
                             text_table=lambda *a: None, agree_all=bool)  # one process: its own decision
    module.log_measured = lambda name, value: PolicyModule.log_measured(module, name, value)
    module._unavailable_warned = set()
    GRPOModule._log_eval(module, "val")
    assert set(logged) == {"val/gleu", "val/answer_chars_mean"}  # nothing computed for a metric without rows
    assert logged["val/gleu"] == pytest.approx(1.0) and logged["val/answer_chars_mean"] == 5


def test_grpo_loading_skips_only_the_keys_left_out_on_purpose(tiny_ckpt):
    module = grpo(tiny_ckpt)
    module.configure_model()
    assert module.reference_model is not None
    state = module.state_dict()
    assert not any(k.startswith(GRPOModule.NOT_CHECKPOINTED) for k in state)
    assert module.load_state_dict(state).missing_keys == []  # strict, and the reference keys are not missing
    policy_key = next(k for k in state if k.startswith("policy."))
    partial = {k: v for k, v in state.items() if k != policy_key}
    with pytest.raises(RuntimeError, match=rf"Missing key\(s\) in state_dict: \"{policy_key}\""):
        module.load_state_dict(partial)
    result = module.load_state_dict(partial, strict=False)  # strict=False is honoured, and reports the real gap
    assert result.missing_keys == [policy_key] and result.unexpected_keys == []
    with pytest.raises(RuntimeError, match="size mismatch"):
        module.load_state_dict({**state, policy_key: torch.zeros(1)})

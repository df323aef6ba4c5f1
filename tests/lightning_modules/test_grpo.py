import lightning as L
import pytest
import torch

from datamodules.collate import PromptCollator
from datamodules.datamodule import RadVLMDataModule
from lightning_modules.grpo import GRPOModule
from lightning_modules.grpo_rewards import RewardFailureError
from metrics.text import GLEU
from radvlm.policy import LoRASettings, PolicyConfig
from radvlm.rewards import RewardTerm
from tests.helpers import report_record, write_records


class Failing(GLEU):
    def score(self, preds, targets):
        raise RuntimeError("reward server down")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grpodata")
    answers = ["The heart is enlarged.", "No pleural effusion.", "Small left apical pneumothorax."]
    return write_records(folder, [report_record(i, answers[i % 3]) for i in range(8)])


def make(tiny_ckpt, data_file, tmp_path, rewards=None, lora=None, max_steps=2, **kw):
    L.seed_everything(0)
    module = GRPOModule(
        PolicyConfig(str(tiny_ckpt), dtype="float32", lora=lora),
        rewards=rewards or [RewardTerm(GLEU())],
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
        num_generations=4, max_new_tokens=8, ppo_mini_batch_size=1, micro_batch_size=3, **kw,
    )
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[str(data_file)], val_files=[str(data_file)],
                            collator=PromptCollator, batch_size=2, max_val_samples=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, limit_val_batches=1)
    return module, data, trainer


def test_grpo_fit_changes_parameters_with_two_updates_per_step(tiny_ckpt, data_file, tmp_path):
    module, data, trainer = make(tiny_ckpt, data_file, tmp_path, max_steps=4)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    trainer.fit(module, data)
    assert trainer.global_step == 4  # 2 prompts per batch, mini-batch of 1 prompt → 2 updates per batch
    changed = sum(not torch.equal(before[n], p) for n, p in module.policy.named_parameters())
    assert changed > 0
    assert "train/reward_mean" in trainer.callback_metrics
    assert "train/kl" in trainer.callback_metrics
    assert module.reference_model is not None  # full fine-tune with beta > 0: frozen copy


def test_grpo_with_lora_uses_disabled_adapters_as_reference(tiny_ckpt, data_file, tmp_path):
    module, data, trainer = make(tiny_ckpt, data_file, tmp_path, lora=LoRASettings(r=4, alpha=8), max_steps=2)
    trainer.fit(module, data)
    assert module.reference_model is None
    assert torch.isfinite(trainer.callback_metrics["train/kl"])


def test_failing_reward_stops_the_run_when_too_many_are_unavailable(tiny_ckpt, data_file, tmp_path):
    module, data, trainer = make(tiny_ckpt, data_file, tmp_path, rewards=[RewardTerm(Failing())],
                                 max_unavailable_fraction=0.5)
    with pytest.raises(RewardFailureError, match="could not be computed"):
        trainer.fit(module, data)


class FailingFromSecondBatch(GLEU):
    """Scores the first training batch, fails from the second on."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def score(self, preds, targets):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("reward server down")
        return super().score(preds, targets)


def test_a_reward_failure_names_the_batch_as_the_progress_line_counts_it(tiny_ckpt, data_file, tmp_path, capsys):
    from lightning_modules.callbacks import RunProgress

    module, data, _ = make(tiny_ckpt, data_file, tmp_path, rewards=[RewardTerm(FailingFromSecondBatch())],
                           overlap_rewards=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[RunProgress(plain=True, every_n_seconds=0)])
    with pytest.raises(RewardFailureError) as err:
        trainer.fit(module, data)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[GRPO] batch")]
    assert len(lines) == 1 and lines[0].startswith("[GRPO] batch 1/3") and "| step 2 |" in lines[0]
    # the second batch failed: "batch 2" in the error, as the progress line would have counted it
    assert "100% of the rewards of batch 2 could not be computed" in str(err.value)
    assert "2 optimizer steps done" in str(err.value)


def test_validation_reports_reward_metric(tiny_ckpt, data_file, tmp_path):
    module, data, trainer = make(tiny_ckpt, data_file, tmp_path)
    trainer.validate(module, data)
    assert "val/gleu" in trainer.callback_metrics


def test_test_stage_logs_the_same_metrics_under_test(tiny_ckpt, data_file, tmp_path):
    module, data, trainer = make(tiny_ckpt, data_file, tmp_path)
    data.hparams.test_files = [str(data_file)]
    trainer.test(module, data)
    assert "test/gleu" in trainer.callback_metrics and "test/answer_chars_mean" in trainer.callback_metrics


def test_length_drift_monitor_warns_when_answers_shrink():
    from types import SimpleNamespace

    from lightning_modules.callbacks import LengthDriftMonitor

    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append(metrics))
    trainer = SimpleNamespace(callback_metrics={"val/answer_chars_mean": torch.tensor(207.0)}, sanity_checking=False,
                              loggers=[logger], global_step=0)
    monitor = LengthDriftMonitor(min_ratio=0.7)
    monitor.on_validation_end(trainer, None)
    trainer.callback_metrics["val/answer_chars_mean"] = torch.tensor(93.0)  # the paper's hacked RadGraph run
    with pytest.warns(UserWarning, match="reward hacking"):
        monitor.on_validation_end(trainer, None)
    assert logged[0]["val/answer_chars_ratio"] == 1.0
    assert abs(logged[1]["val/answer_chars_ratio"] - 93 / 207) < 1e-9  # 0.449
    assert LengthDriftMonitor().load_state_dict(monitor.state_dict()) is None


def test_zero_std_filter_keeps_every_micro_batch_when_distributed(tiny_ckpt, data_file, tmp_path, monkeypatch):
    """With several processes, filtered rows stay in the passes (zero mask) so every rank runs the same
    number of backward calls; a single process skips them."""
    calls = {}
    for distributed in (False, True):
        module, data, trainer = make(tiny_ckpt, data_file, tmp_path, max_steps=2, filter_zero_std_groups=True,
                                     rewards=[RewardTerm(Constant())])
        monkeypatch.setattr(GRPOModule, "_is_distributed", lambda self, d=distributed: d)
        # no row may be trained at all, so bound the run by batches, not optimizer steps
        trainer.fit_loop.epoch_loop.max_steps, trainer.fit_loop.max_epochs, trainer.limit_train_batches = -1, 1, 2
        count = {"n": 0}
        module.configure_model()
        real = module.manual_backward
        def counting_backward(loss, count=count, real=real):
            count["n"] += 1
            return real(loss)

        monkeypatch.setattr(module, "manual_backward", counting_backward)
        trainer.fit(module, data)
        calls[distributed] = count["n"]
        monkeypatch.undo()
    # constant rewards: every group has std 0 → a single process skips every row, two processes do not
    assert calls[False] == 0 and calls[True] > 0


class Constant(GLEU):
    def score(self, preds, targets):
        return torch.full((len(preds),), 0.5)


def test_validation_gives_box_metrics_the_records_unrounded_boxes():
    from lightning_modules.grpo_eval import takes_gt_boxes
    from metrics.grounding import GroundingMAP, SoftF1

    assert takes_gt_boxes(GroundingMAP()) and takes_gt_boxes(SoftF1()) and not takes_gt_boxes(GLEU())
    metric = GroundingMAP()
    # the answer matches the 2-decimal text box but not the record's unrounded box (IoU .496 < .5): AP 0
    metric.update(["[0, 0, 0.5, 1]"], ["[0.0, 0.0, 1.0, 1.0]"], gt_boxes=[[[0.004, 0.0, 1.0, 1.0]]])
    assert float(metric.compute()["map"]) == 0.0


def test_checkpoint_loading_is_strict_except_for_the_rebuilt_reference(tiny_ckpt, data_file, tmp_path):
    module, _, _ = make(tiny_ckpt, data_file, tmp_path)
    module.configure_model()
    assert module.reference_model is not None
    state = module.state_dict()
    assert not any(k.startswith("reference_model.") for k in state)
    module.load_state_dict(state)  # the reference keys are left out on purpose: fine
    broken = dict(state)
    broken.pop(next(k for k in state if k.startswith("policy.")))
    with pytest.raises(RuntimeError, match=r"Missing key\(s\)"):
        module.load_state_dict(broken)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\)"):
        module.load_state_dict({**state, "policy.not_a_weight": torch.zeros(1)})

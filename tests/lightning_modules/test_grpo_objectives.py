"""GRPOModule with injected losses and advantage estimators (radvlm.objectives) and the overlong reward term."""

from __future__ import annotations

import inspect

import lightning as L
import pytest
import torch

from datamodules.collate import PromptCollator
from datamodules.datamodule import RadVLMDataModule
from lightning_modules.grpo import GRPOModule
from lightning_modules.grpo_rewards import term_matrix
from metrics.text import GLEU
from radvlm.objectives import CISPOLoss, GRPOLoss, GSPOLoss, PerTermNormalization, SAPOLoss
from radvlm.policy import PolicyConfig
from radvlm.rewards import OverlongPenalty, RewardResult, RewardTerm
from tests.helpers import report_record, write_records

NAN = float("nan")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grpo_objectives")
    answers = ["The heart is enlarged.", "No pleural effusion.", "Small left apical pneumothorax."]
    return write_records(folder, [report_record(i, answers[i % 3]) for i in range(4)])


def fit(tiny_ckpt, data_file, tmp_path, **kw):
    L.seed_everything(0)
    module = GRPOModule(
        PolicyConfig(str(tiny_ckpt), dtype="float32"),
        rewards=[RewardTerm(GLEU()), RewardTerm(OverlongPenalty(max_length=8, cache_length=4), weight=0.5)],
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), num_generations=4, max_new_tokens=8, beta=0.0,
        micro_batch_size=4, **kw)
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[str(data_file)], val_files=[str(data_file)],
                            collator=PromptCollator, batch_size=2, max_val_samples=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, limit_val_batches=0)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    trainer.fit(module, data)
    changed = sum(not torch.equal(before[n], p) for n, p in module.policy.named_parameters())
    return module, trainer, changed


@pytest.mark.parametrize(("loss", "stat"), [(GSPOLoss(eps_low=0.2, eps_high=0.2), "clip_frac_high"),
                                            (CISPOLoss(), "clip_frac_high"),
                                            (SAPOLoss(entropy_coeff=0.01), "gate_mean")], ids=repr)
def test_each_loss_and_per_term_advantages_train_the_policy(tiny_ckpt, data_file, tmp_path, loss, stat):
    module, trainer, changed = fit(tiny_ckpt, data_file, tmp_path, loss=loss, advantage=PerTermNormalization())
    metrics = trainer.callback_metrics
    assert changed > 0 and trainer.global_step == 1
    assert f"train/{stat}" in metrics and torch.isfinite(metrics["train/loss"])
    assert "train/reward/overlongpenalty" in metrics  # the length term was scored
    assert ("train/entropy_bonus" in metrics) == (loss.entropy_coeff != 0)


class RecordingLoss(GRPOLoss):
    """GRPOLoss that records whether the entropy it was given carries a gradient."""

    def __init__(self, entropy_coeff: float) -> None:
        super().__init__(entropy_coeff=entropy_coeff)
        self.seen: list[bool] = []

    def __call__(self, *args, **kwargs):
        self.seen.append(bool(kwargs["entropy"].requires_grad))
        return super().__call__(*args, **kwargs)


@pytest.mark.parametrize("coeff", [0.0, 0.05])
def test_entropy_has_a_gradient_only_for_an_entropy_bonus(tiny_ckpt, data_file, tmp_path, coeff):
    loss = RecordingLoss(coeff)
    fit(tiny_ckpt, data_file, tmp_path, loss=loss)
    assert loss.seen and set(loss.seen) == {coeff != 0}


def test_term_matrix_holds_signed_values_and_weights():
    class Lower(GLEU):
        higher_is_better = False

    terms = [RewardTerm(GLEU(), weight=2.0, name="up"), RewardTerm(Lower(), weight=0.5, name="down")]
    result = RewardResult(total=torch.zeros(3), closed=torch.ones(3, dtype=torch.bool), failed={},
                          values={"up": torch.tensor([0.1, NAN, 0.3]), "down": torch.tensor([3.0, 1.0, NAN])})
    values, weights = term_matrix(terms, result, torch.zeros(3))
    # "down" is lower-is-better: sign −1
    torch.testing.assert_close(values, torch.tensor([[0.1, -3.0], [NAN, -1.0], [0.3, NAN]]), equal_nan=True)
    assert weights.tolist() == [2.0, 0.5]
    # a filler batch (no per-term values): the total as one term of weight 1
    values, weights = term_matrix(terms, RewardResult(torch.zeros(2), {}, {}, torch.ones(2, dtype=torch.bool)),
                                  torch.tensor([1.0, 2.0]))
    assert values.tolist() == [[1.0], [2.0]] and weights.tolist() == [1.0]


def test_module_has_no_flat_clip_or_aggregation_flags_and_checks_the_objects():
    params = inspect.signature(GRPOModule.__init__).parameters
    assert not {"eps_low", "eps_high", "dual_clip", "loss_agg", "scale_rewards"} & set(params)
    assert {"loss", "advantage"} <= set(params)
    with pytest.raises(TypeError, match="loss must be a radvlm.objectives.PolicyLoss"):
        GRPOModule(PolicyConfig("unused"), rewards=[RewardTerm(GLEU())], loss="grpo")
    with pytest.raises(ValueError, match=r"these names repeat: \['gleu'\]"):
        GRPOModule(PolicyConfig("unused"), rewards=[RewardTerm(GLEU()), RewardTerm(GLEU())],
                   advantage=PerTermNormalization())


def test_checkpoint_records_the_objectives_and_a_resume_with_others_is_logged(caplog):
    terms = [RewardTerm(GLEU())]
    saved = GRPOModule(PolicyConfig("unused"), rewards=terms, loss=GSPOLoss(), advantage=PerTermNormalization())
    checkpoint: dict = {"hyper_parameters": dict(saved.hparams)}
    saved.on_save_checkpoint(checkpoint)
    assert checkpoint["radvlm"]["objectives"] == {
        "loss": "GSPOLoss(agg='seq-mean-token-mean', entropy_coeff=0.0, eps_low=0.0003, eps_high=0.0004)",
        "advantage": "PerTermNormalization(eps=1e-06)"}
    resumed = GRPOModule(PolicyConfig("unused"), rewards=terms)  # the defaults: GRPOLoss, GroupNormalization
    with caplog.at_level("WARNING"):
        resumed.on_load_checkpoint(checkpoint)
    assert "loss: GSPOLoss(" in caplog.text and "→ GRPOLoss(" in caplog.text
    assert "advantage: PerTermNormalization(eps=1e-06) → GroupNormalization(scale='group', eps=1e-06)" in caplog.text

"""Numerical guards and reward failures (GRPO; the SFT loss guard is in tests/lightning_modules/test_sft.py).

- A non-finite loss or gradient norm skips the optimizer step (weights untouched, gradients cleared), is
  counted (``train/skipped_steps``) and the next good step goes on; ``max_consecutive_skips`` skips in a
  row stop the run with ``NonFiniteError`` and a ``last-good.ckpt`` holding the last good weights.
- A reward metric that raises or runs past ``reward_timeout`` gives NaN for the rows it had to score; those
  rows get advantage 0 (no gradient from the policy loss), the fraction is logged as
  ``train/reward_unavailable_frac`` and the run stops with ``RewardFailureError`` past
  ``max_unavailable_fraction``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.collate import PromptCollator
from datamodules.datamodule import RadVLMDataModule
from lightning_modules.common import NonFiniteError
from lightning_modules.grpo import GRPOModule
from lightning_modules.grpo_rewards import RewardFailureError
from lightning_modules.sft import SFTModule
from radvlm import grpo as grpo_math
from radvlm.objectives import GRPOLoss
from radvlm.policy import PolicyConfig
from radvlm.rewards import RewardError, RewardTerm, compute_rewards, score_with_timeout
from tests.helpers import report_record, write_records

NAN = float("nan")


# ------------------------------------------------------------------------------------------ test metrics
class Length:
    """Characters of the answer: a reward that differs between rollouts of a random tiny model."""

    higher_is_better = True
    worst_value = 0.0

    def score(self, preds: list[str], targets: list[str]) -> torch.Tensor:
        return torch.tensor([float(len(p)) for p in preds])


class Failing(Length):
    def score(self, preds, targets):
        raise ConnectionError("reward server down")


class Slow(Length):
    def __init__(self, seconds: float = 2.0) -> None:
        self.seconds = seconds

    def score(self, preds, targets):
        time.sleep(self.seconds)
        return super().score(preds, targets)


class WrongLength(Length):
    def score(self, preds, targets):
        return torch.zeros(len(preds) + 1)


class LowerIsBetter(Length):
    higher_is_better = False
    worst_value = 3.0


# ----------------------------------------------------------------------------------- compute_rewards itself
def test_failing_term_gives_nan_only_for_its_rows_and_is_counted():
    terms = [RewardTerm(Length(), weight=1.0, tasks=["report_generation"], name="length"),
             RewardTerm(Failing(), weight=2.0, tasks=["classification"], name="failing")]
    tasks = ["report_generation", "report_generation", "classification", "classification"]
    result = compute_rewards(terms, ["ab", "abcd", "x", "y"], ["t"] * 4, tasks, [False] * 4)
    # report rows: 1 · (+1) · len = 2, 4; classification rows: unavailable
    assert result.total[:2].tolist() == [2.0, 4.0]
    assert torch.isnan(result.total[2:]).all()
    assert result.unavailable.tolist() == [False, False, True, True]
    assert result.failed == {"length": 0, "failing": 2}


def test_slow_term_times_out_into_nan_without_waiting_for_it():
    terms = [RewardTerm(Slow(seconds=3.0), name="slow"), RewardTerm(LowerIsBetter(), weight=0.5, name="low")]
    start = time.perf_counter()
    result = compute_rewards(terms, ["abc", "a"], ["t", "t"], [None, None], [False, False], timeout=0.2)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0  # the 3 s metric was abandoned after 0.2 s
    assert torch.isnan(result.total).all()  # a NaN term makes the weighted sum NaN
    assert result.failed == {"slow": 2, "low": 0}
    # the other term is still reported: lower is better → sign −1, raw values 3 and 1
    assert result.values["low"].tolist() == [3.0, 1.0]


def test_score_with_timeout_raises_reward_error_and_passes_fast_results():
    with pytest.raises(RewardError, match="took longer than 0.1s"):
        score_with_timeout(Slow(seconds=2.0), ["a"], ["b"], timeout=0.1)
    assert score_with_timeout(Length(), ["abc"], ["b"], timeout=5.0).tolist() == [3.0]


def test_metric_returning_wrong_number_of_values_is_unavailable_not_a_crash():
    result = compute_rewards([RewardTerm(WrongLength(), name="wrong")], ["a", "b"], ["t", "t"], [None] * 2,
                             [False] * 2)
    assert torch.isnan(result.total).all() and result.failed == {"wrong": 2}


def test_unavailable_rewards_get_advantage_zero_and_no_policy_gradient():
    # one group of G = 4: rewards [1, 2, NaN, 3] → valid mean 2, unbiased std 1 →
    # advantages [(1 − 2) / (1 + 1e-6), (2 − 2) / …, 0 (unavailable), (3 − 2) / (1 + 1e-6)]
    rewards = torch.tensor([1.0, 2.0, NAN, 3.0])
    adv = grpo_math.group_advantages(rewards, 4)
    assert adv.tolist() == pytest.approx([-1 / (1 + 1e-6), 0.0, 0.0, 1 / (1 + 1e-6)], abs=1e-7)
    assert adv[2].item() == 0.0
    logp = torch.full((4, 3), -1.0, requires_grad=True)  # (N, C)
    loss, _ = GRPOLoss()(logp, logp.detach(), adv, torch.ones(4, 3))
    loss.backward()
    assert torch.equal(logp.grad[2], torch.zeros(3))  # the unavailable row contributes no gradient
    assert bool((logp.grad[0] != 0).all()) and bool((logp.grad[3] != 0).all())


# ------------------------------------------------------------------------------------------ GRPO runs
@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("guarddata")
    reports = [report_record(i, a) for i, a in enumerate(["The heart is enlarged.", "No pleural effusion."])]
    cls = [{"id": f"c{i}", "image": f"img/c{i}.png", "task": "classification",
            "conversations": [{"from": "human", "value": "<image>\nWhich abnormalities are present?"},
                              {"from": "gpt", "value": a}]}
           for i, a in enumerate(["Cardiomegaly.", "No abnormalities."])]
    return write_records(folder, reports + cls)  # 2 report + 2 classification records


def grpo_run(tiny_ckpt, data_file, tmp_path, rewards=None, max_steps=2, batch_size=2, **kw):
    L.seed_everything(0)
    module = GRPOModule(PolicyConfig(str(tiny_ckpt), dtype="float32"),
                        rewards=rewards or [RewardTerm(Length(), name="length")],
                        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), num_generations=4,
                        max_new_tokens=6, beta=0.0, micro_batch_size=4, **kw)
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[str(data_file)], collator=PromptCollator,
                            batch_size=batch_size)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, limit_val_batches=0)
    module.configure_model()
    return module, data, trainer


def poison_logprobs(module, monkeypatch, calls: set[int] | None = None) -> list[int]:
    """Make the gradient-carrying ``token_logprobs`` calls numbered in ``calls`` (all if None) return NaN."""
    real = module.policy.token_logprobs
    count = []

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        if not torch.is_grad_enabled():  # π_old / reference log-probs stay clean
            return out
        count.append(1)
        if calls is not None and len(count) not in calls:
            return out
        logp, entropy = out if isinstance(out, tuple) else (out, None)
        logp = logp * NAN
        return (logp, entropy) if entropy is not None else logp

    monkeypatch.setattr(module.policy, "token_logprobs", poisoned)
    return count


def watch_steps(module, monkeypatch) -> list[tuple[bool, bool]]:
    """Record, per ``guarded_step``: (stepped, weights changed)."""
    real = module.guarded_step
    seen: list[tuple[bool, bool]] = []

    def watched(*args, **kwargs):
        before = [p.detach().clone() for p in module.policy.parameters()]
        stepped, norm = real(*args, **kwargs)
        changed = any(not torch.equal(b, p) for b, p in zip(before, module.policy.parameters()))
        assert all(p.grad is None for p in module.policy.parameters())  # gradients cleared either way
        seen.append((stepped, changed))
        return stepped, norm

    monkeypatch.setattr(module, "guarded_step", watched)
    return seen


# 2 prompts per batch, mini-batches of 1 prompt → 2 updates per batch; the first update's loss is NaN
def test_grpo_nan_loss_skips_that_update_counts_it_and_continues(tiny_ckpt, data_file, tmp_path, monkeypatch):
    module, data, trainer = grpo_run(tiny_ckpt, data_file, tmp_path, max_steps=3, ppo_mini_batch_size=1)
    poison_logprobs(module, monkeypatch, calls={1})
    steps = watch_steps(module, monkeypatch)
    trainer.fit(module, data)
    # batch 1: update 1 skipped (NaN), update 2 stepped; batch 2: both stepped → 3 optimizer steps
    assert steps == [(False, False), (True, True), (True, True), (True, True)]
    assert trainer.global_step == 3
    assert module.skipped_steps == 1 and module.consecutive_skips == 0
    assert trainer.callback_metrics["train/skipped_steps"].item() == 1.0
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_grpo_nan_gradient_with_finite_loss_is_skipped(tiny_ckpt, data_file, tmp_path, monkeypatch):
    module, data, trainer = grpo_run(tiny_ckpt, data_file, tmp_path, max_steps=3, ppo_mini_batch_size=1)
    steps = watch_steps(module, monkeypatch)
    fired = []

    def nan_once(grad):  # the first backward writes a NaN gradient into the output head
        if fired:
            return grad
        fired.append(1)
        return torch.full_like(grad, NAN)

    module.policy.hf_model.lm_head.weight.register_hook(nan_once)
    trainer.fit(module, data)
    assert steps == [(False, False), (True, True), (True, True), (True, True)]
    assert module.skipped_steps == 1 and trainer.global_step == 3
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_sft_nan_gradient_with_finite_loss_is_skipped(tiny_ckpt, data_file, tmp_path, monkeypatch):
    L.seed_everything(0)
    module = SFTModule(PolicyConfig(str(tiny_ckpt), dtype="float32"),
                       optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[str(data_file)], batch_size=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0)
    module.configure_model()
    steps = watch_steps(module, monkeypatch)
    fired = []
    module.policy.hf_model.lm_head.weight.register_hook(
        lambda g: g if fired else (fired.append(1), torch.full_like(g, NAN))[1])
    trainer.fit(module, data)
    # 4 records, batch 2: batch 1 skipped, batches 2 and 3 stepped → global step 2
    assert steps == [(False, False), (True, True), (True, True)]
    assert module.skipped_steps == 1 and trainer.global_step == 2
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())


def test_grpo_consecutive_nan_steps_stop_with_error_and_last_good_checkpoint(tiny_ckpt, data_file, tmp_path,
                                                                             monkeypatch):
    module, data, trainer = grpo_run(tiny_ckpt, data_file, tmp_path, max_steps=10, ppo_mini_batch_size=1,
                                     max_consecutive_skips=3)
    poison_logprobs(module, monkeypatch)  # every update
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(NonFiniteError, match="3 consecutive steps") as err:
        trainer.fit(module, data)
    assert module.skipped_steps == 3 and trainer.global_step == 0
    saved = list(tmp_path.rglob("last-good.ckpt"))
    assert len(saved) == 1 and str(saved[0]) in str(err.value)
    ckpt = torch.load(saved[0], weights_only=True, map_location="cpu")
    assert ckpt["radvlm"]["skipped_steps"] == 3
    for name, value in ckpt["state_dict"].items():  # the last good state = the initial weights, finite
        assert torch.isfinite(value).all() and torch.equal(value, initial[name]), name


def test_failing_reward_rows_are_masked_and_the_run_goes_on_below_the_limit(tiny_ckpt, data_file, tmp_path,
                                                                             monkeypatch):
    rewards = [RewardTerm(Length(), tasks=["report_generation"], name="length"),
               RewardTerm(Failing(), tasks=["classification"], name="failing")]
    # one batch of all 4 prompts × G = 4: rows of the 2 classification prompts (8 of 16) are unavailable
    module, data, trainer = grpo_run(tiny_ckpt, data_file, tmp_path, rewards=rewards, max_steps=2,
                                     batch_size=4, max_unavailable_fraction=0.6)
    seen = []
    real_adv = grpo_math.group_advantages

    def spy(rewards, group_size, **kw):
        adv = real_adv(rewards, group_size, **kw)
        seen.append((rewards.clone(), adv.clone()))
        return adv

    monkeypatch.setattr(grpo_math, "group_advantages", spy)
    trainer.fit(module, data)
    assert trainer.callback_metrics["train/reward_unavailable_frac"].item() == 0.5  # 8 / 16
    assert trainer.callback_metrics["train/reward_failed/failing"].item() == 8.0
    for rewards_t, adv in seen:
        unavailable = torch.isnan(rewards_t)
        assert int(unavailable.sum()) == 8
        assert torch.equal(adv[unavailable], torch.zeros(8))  # masked: no policy-gradient contribution
        assert torch.isfinite(adv).all() and bool((adv[~unavailable] != 0).any())  # the rest still learns
    assert module.skipped_steps == 0 and trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_failing_reward_above_the_limit_stops_the_run(tiny_ckpt, data_file, tmp_path):
    rewards = [RewardTerm(Length(), tasks=["report_generation"], name="length"),
               RewardTerm(Failing(), tasks=["classification"], name="failing")]
    module, data, trainer = grpo_run(tiny_ckpt, data_file, tmp_path, rewards=rewards, batch_size=4,
                                     max_unavailable_fraction=0.4)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(RewardFailureError, match=r"50% of the rewards .*'failing': 8"):
        trainer.fit(module, data)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # stopped before updating


def test_slow_reward_times_out_and_stops_the_run(tiny_ckpt, data_file, tmp_path):
    module, data, trainer = grpo_run(tiny_ckpt, data_file, tmp_path,
                                     rewards=[RewardTerm(Slow(2.0), name="slow")], reward_timeout=0.2,
                                     max_unavailable_fraction=0.5)
    start = time.perf_counter()
    with pytest.raises(RewardFailureError, match=r"100% of the rewards .*'slow': 8"):
        trainer.fit(module, data)
    assert time.perf_counter() - start < 30.0  # not stuck on the 2 s metric

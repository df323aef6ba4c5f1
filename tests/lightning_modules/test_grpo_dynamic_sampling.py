"""DAPO dynamic sampling in ``GRPOModule`` (``dynamic_sampling``): generation batches whose outcome term does not
vary within a group are dropped, batches generate until a full batch of informative groups is held, the extra
ones are carried to the next step and into checkpoints (a resume in the middle of a refill is bitwise), and the
cap stops the run with an error naming it. Two processes: ``test_grpo_dynamic_sampling_ranks.py``."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from datamodules.collate import PromptCollator
from datamodules.datamodule import RadVLMDataModule
from lightning_modules.grpo import GRPOModule
from metrics.text import GLEU
from radvlm.grpo import DynamicSampling, DynamicSamplingError
from radvlm.policy import PolicyConfig
from radvlm.rewards import RewardTerm
from tests.helpers import report_record, write_records
from tests.test_reliability_resume import Run, assert_same_state, lambda_scheduler, make_trainer

G = 2  # rollouts per prompt


class Scripted(GLEU):
    """The outcome term: at its k-th training call, group j varies ([0, 1]) iff ``pattern[k][j]``, else is
    constant ([1, 1]); with ``pattern=None``, a group varies iff its reference ends in an even digit."""

    def __init__(self, pattern: list[list[bool]] | None = None) -> None:
        super().__init__()
        self.pattern, self.calls = pattern, 0

    def score(self, preds, targets):
        if self.pattern is None:
            varies = [int(t.rstrip(".")[-1]) % 2 == 0 for t in targets[::G]]
        else:
            varies = self.pattern[self.calls]
            self.calls += 1
        return torch.tensor([[0.0, 1.0] if v else [1.0, 1.0] for v in varies]).flatten()  # (B*G,)


class Penalty(GLEU):
    """A shaping term that always varies within a group (−0.5 on the second rollout): the total varies too."""

    def score(self, preds, targets):
        return torch.tensor([0.0, -0.5] * (len(preds) // G))


class Trained(Callback):
    """The ids of each generation batch, and of the groups each optimizer step trained on."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.trained: list[list[str]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        real = pl_module._advantages

        def recorded(rollout, rewards, *args, **kwargs):
            self.trained.append(list(rollout.ids[::G]))
            return real(rollout, rewards, *args, **kwargs)

        pl_module._advantages = recorded

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(list(batch["ids"]))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dsdata")
    return write_records(folder, [report_record(i, f"Finding number {i}.") for i in range(10)])


def module_and_data(tiny_ckpt, data_file, outcome_metric, lr_scheduler=None, **ds):
    L.seed_everything(0)
    rewards = [RewardTerm(outcome_metric, name="outcome"), RewardTerm(Penalty(), name="penalty")]
    module = GRPOModule(PolicyConfig(str(tiny_ckpt), dtype="float32"), rewards=rewards,
                        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), lr_scheduler=lr_scheduler, num_generations=G,
                        max_new_tokens=4, micro_batch_size=4, dynamic_sampling=DynamicSampling(outcome="outcome", **ds))
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[str(data_file)], val_files=[str(data_file)],
                            collator=PromptCollator, batch_size=2, max_val_samples=2)
    return module, data


def fit_batches(tiny_ckpt, data_file, tmp_path, pattern, n_batches, **ds):
    module, data = module_and_data(tiny_ckpt, data_file, Scripted(pattern), **ds)
    record = Trained()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=n_batches, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[record])
    trainer.fit(module, data)
    return trainer, module, record


# generation batches (2 prompts each): groups informative by the outcome term (the total always varies)
PATTERN = [[False, False], [True, False], [True, True], [True, False]]


@pytest.fixture(scope="module")
def refill_run(tiny_ckpt, data_file, tmp_path_factory):
    return fit_batches(tiny_ckpt, data_file, tmp_path_factory.mktemp("refill"), PATTERN, 4, max_gen_batches=3)


def test_refill_generates_until_a_full_batch_of_informative_groups(refill_run):
    trainer, module, record = refill_run
    b = record.batches
    # batch 1 keeps 0 groups, batch 2 one (held 1 < 2): generation only; batch 3 keeps two (held 3): the two
    # oldest train; batch 4 keeps one: with the carried group, a full batch again
    assert trainer.global_step == 2
    assert record.trained == [[b[1][0], b[2][0]], [b[2][1], b[3][0]]]
    assert trainer.callback_metrics["train/dynamic_sampling/gen_batches"] == 1.0  # the last step: batch 4 alone
    assert module._ds_groups == [] and module._ds_gen_batches == 0


def test_the_filter_reads_the_outcome_term_not_the_varying_total(refill_run):
    _, _, record = refill_run
    b = record.batches
    trained = {i for step in record.trained for i in step}
    # every group's total varies (the penalty term); these groups' outcome does not, and none of them trained
    assert trained.isdisjoint({b[0][0], b[0][1], b[1][1], b[3][1]})
    assert len(trained) == 4


def test_carried_groups_train_first_at_the_next_step(tiny_ckpt, data_file, tmp_path):
    # kept: batch 1 one group (held 1), batch 2 both (held 3: the step trains b1[0], b2[0] and carries b2[1]),
    # batch 3 both (held 3: the carried b2[1] trains first, with b3[0]; b3[1] is carried)
    pattern = [[True, False], [True, True], [True, True]]
    trainer, module, record = fit_batches(tiny_ckpt, data_file, tmp_path, pattern, 3)
    b = record.batches
    assert record.trained == [[b[0][0], b[1][0]], [b[1][1], b[2][0]]]
    assert [x["rollout"].ids[0] for x in module._ds_groups] == [b[2][1]]  # held for the next step
    assert trainer.global_step == 2


def test_the_cap_stops_the_run_with_an_error_naming_it(tiny_ckpt, data_file, tmp_path):
    with pytest.raises(DynamicSamplingError, match=r"dynamic_sampling.max_gen_batches=2\) gave 1 of the 2"):
        fit_batches(tiny_ckpt, data_file, tmp_path, [[False, False], [True, False]], 4, max_gen_batches=2)


def test_an_outcome_that_is_no_reward_term_is_refused(tiny_ckpt):
    with pytest.raises(ValueError, match=r"names \['soft_f1'\], which are not reward terms"):
        GRPOModule(PolicyConfig(str(tiny_ckpt)), rewards=[RewardTerm(GLEU())],
                   dynamic_sampling=DynamicSampling(outcome="soft_f1"))


# ------------------------------------------------------------------------------------------------ resume
class EveryBatch(Callback):
    """Saves a checkpoint after every batch (``batch=i.ckpt``) and notes what the module held then."""

    def __init__(self, folder) -> None:
        self.folder, self.held, self.steps = folder, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trainer.save_checkpoint(str(self.folder / f"batch={len(self.held)}.ckpt"))
        self.held.append(len(pl_module._ds_groups))
        self.steps.append(trainer.global_step)


def resume_parts(tiny_ckpt, data_file):
    return module_and_data(tiny_ckpt, data_file, Scripted(None), lr_scheduler=lambda_scheduler, max_gen_batches=None)


N_STEPS = 4


@pytest.fixture(scope="module")
def straight_run(tiny_ckpt, data_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_straight")
    module, data = resume_parts(tiny_ckpt, data_file)
    saver, trained = EveryBatch(root), Trained()
    trainer = make_trainer(root, N_STEPS, [saver, trained])
    trainer.fit(module, data)
    return Run(module, trainer, trained), saver


def test_a_resume_in_the_middle_of_a_refill_is_bitwise(straight_run, tiny_ckpt, data_file, tmp_path):
    straight, saver = straight_run
    # a batch after which groups were held and no step followed: the refill was under way
    refilling = [i for i in range(1, len(saver.held)) if saver.held[i] > 0 and saver.steps[i] == saver.steps[i - 1]]
    assert refilling, (saver.held, saver.steps)
    i = refilling[0]
    ckpt = torch.load(saver.folder / f"batch={i}.ckpt", weights_only=True, map_location="cpu")
    held = ckpt["radvlm"]["dynamic_sampling"][0]
    assert len(held["groups"]) == saver.held[i] and held["gen_batches"] >= 1  # carried groups are checkpointed
    module, data = resume_parts(tiny_ckpt, data_file)  # a new process: fresh objects
    torch.manual_seed(1234)
    trained = Trained()
    trainer = make_trainer(tmp_path, N_STEPS, [trained])
    trainer.fit(module, data, ckpt_path=str(saver.folder / f"batch={i}.ckpt"), weights_only=True)
    assert trained.batches == straight.recorder.batches[i + 1:]
    steps_before = saver.steps[i]
    assert trained.trained == straight.recorder.trained[steps_before:]  # the held groups trained as before
    assert_same_state(straight, Run(module, trainer, trained))  # weights, optimizer, scheduler

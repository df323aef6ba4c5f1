"""Dynamic sampling on 2 gloo processes (``FSDP2Strategy``) whose kept-group counts differ: rank 0 keeps every
group, rank 1 none at its first batch and one at its second. Both generate until both hold a full batch, then
train on the same number of groups per step, end with the same weights, and never hang (every process has a
hard timeout, the test kills the group past its own); a checkpoint holds the groups each process holds.

Run as a script (``python test_grpo_dynamic_sampling_ranks.py CKPT DATA OUT``) it fits the real
``GRPOModule``; Lightning's launcher starts the second process. Each rank writes ``OUT/rankR.json``.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

import pytest
import torch

for _folder in (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "radvlm"):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))
from test_rank_agreement import HANG_S, _fit, _rank, _summary, _Watch  # noqa: E402
from test_sharded_generation import run_with_hard_timeout  # noqa: E402
from test_sharded_training import LengthReward  # noqa: E402

SCRIPT = Path(__file__).resolve()
G = 4


@pytest.fixture(scope="module")
def ranks(tiny_ckpt, tmp_path_factory) -> list[dict]:
    from tests.helpers import report_record, write_records

    folder = tmp_path_factory.mktemp("dsranks")
    data = write_records(folder, [report_record(i, f"Finding number {i}.") for i in range(16)])
    out = folder / "out"
    out.mkdir()
    run = run_with_hard_timeout([sys.executable, str(SCRIPT), str(tiny_ckpt), str(data), str(out)], 240)
    missing = [r for r in (0, 1) if not (out / f"rank{r}.json").is_file()]
    assert not missing, f"ranks {missing} wrote nothing:\n{run.stdout[-6000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_ranks_whose_kept_counts_differ_train_on_the_same_number_of_groups(ranks):
    r0, r1 = ranks
    # kept per batch: rank 0 [2, 2, 2, 2], rank 1 [0, 1, 2, 2] (target 2 per rank). Held after each batch:
    # batch 1 (2, 0) and 2 (4, 1): generation only on both; batch 3 (6, 3): both train 2, rank 0 carries 2 and
    # drops 2 (max_carried: one batch), rank 1 carries 1; batch 4 (4, 3): both train 2 again
    assert r0["kept"] == [2, 2, 2, 2] and r1["kept"] == [0, 1, 2, 2]
    assert r0["trained"] == r1["trained"] == [2, 2]
    assert r0["held"] == [2, 4, 2, 2] and r1["held"] == [0, 1, 1, 1]
    for info in ranks:  # 2 steps × 2 updates (one prompt per rank per update)
        assert info["global_step"] == 4
        assert info["saved_held"] == [2, 1]  # the checkpoint holds the groups of both processes
        assert info["restored_ids"] == info["held_ids"] and len(info["restored_ids"]) == info["held"][-1]
    assert r0["grad_norms"] == r1["grad_norms"] and r0["weights"] == r1["weights"] and r0["finite"]


# ---------------------------------------------------------------------------------------------- the worker
class KeptByRank(LengthReward):
    """The outcome: every group varies on rank 0; on rank 1 none at its first call, the first group at its
    second, every group after."""

    calls = 0

    def score(self, preds, targets):
        n = len(preds) // G
        call, KeptByRank.calls = KeptByRank.calls, KeptByRank.calls + 1
        varies = n if _rank() == 0 or call >= 2 else call  # rank 1: 0, then 1, then all
        return torch.tensor([[0.0, 1.0, 0.0, 1.0] if j < varies else [1.0] * G for j in range(n)]).flatten()


class _Kept(_Watch):
    """Also: groups kept per batch, groups trained per step, groups held after each batch."""

    def __init__(self) -> None:
        super().__init__()
        self.kept, self.trained, self.held = [], [], []

    def on_train_start(self, trainer, pl_module) -> None:
        real = pl_module._advantages

        def recorded(rollout, rewards, *args, **kwargs):
            self.trained.append(len(rollout) // G)
            return real(rollout, rewards, *args, **kwargs)

        pl_module._advantages = recorded

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.kept.append(round(float(trainer.callback_metrics["train/dynamic_sampling/kept_frac"]) * 2))
        self.held.append(len(pl_module._ds_groups))


def _worker(ckpt: str, data_file: str, out: str) -> None:
    from lightning_modules.grpo import GRPOModule
    from radvlm.grpo import DynamicSampling
    from radvlm.policy import PolicyConfig
    from radvlm.rewards import RewardTerm

    faulthandler.dump_traceback_later(HANG_S, exit=True)
    os.environ["RADVLM_TEST_DEVICES"] = "2"
    torch.set_num_threads(1)
    rewards = [RewardTerm(KeptByRank(), name="outcome"), RewardTerm(LengthReward(), weight=0.1, name="length")]
    module = GRPOModule(PolicyConfig(ckpt, dtype="float32"), rewards=rewards,
                        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0), num_generations=G,
                        max_new_tokens=8, micro_batch_size=3, beta=0.1, ppo_mini_batch_size=2,
                        dynamic_sampling=DynamicSampling(outcome="outcome", max_gen_batches=3))
    record = _Kept()
    trainer, module = _fit("grpo", ckpt, data_file, Path(out), [record], batches=4, module=module)
    info = _summary(trainer, module, record)
    info.update(kept=record.kept, trained=record.trained, held=record.held)
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)  # every process's held groups, gathered (a collective)
    info["saved_held"] = [len(st["groups"]) for st in checkpoint["radvlm"]["dynamic_sampling"]]
    module._ds_groups = []
    module.on_load_checkpoint(checkpoint)  # each process takes back its own
    info["restored_ids"] = [x["rollout"].ids[0] for x in module._ds_groups]
    info["held_ids"] = [x["rollout"]["ids"][0]
                        for x in checkpoint["radvlm"]["dynamic_sampling"][trainer.global_rank]["groups"]]
    (Path(out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    _worker(*sys.argv[1:])

import logging

import pytest
import torch

from lightning_modules.common import check_schedule_length


def one_cycle(total_steps):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=total_steps)


def test_a_one_cycle_schedule_shorter_than_the_run_is_refused_at_setup():
    with pytest.raises(ValueError, match=r"total_steps=10 is below trainer.max_steps=12.*step 11"):
        check_schedule_length(one_cycle(10), 12)
    # and it is a real trap: torch fails at step total_steps + 1
    sched = one_cycle(2)
    for _ in range(2):
        sched.optimizer.step()
        sched.step()
    with pytest.raises(ValueError, match="Tried to step"):
        sched.step()


def test_longer_schedule_warns_and_matching_or_epoch_bounded_runs_pass(caplog):
    with caplog.at_level(logging.WARNING):
        check_schedule_length(one_cycle(20), 10)
    assert "never anneals" in caplog.text and "50%" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_schedule_length(one_cycle(10), 10)
        check_schedule_length(one_cycle(10), -1)  # bounded by epochs: not checked
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        check_schedule_length(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), 100)  # other schedulers
    assert not caplog.text


def test_schedule_changes_lists_settings_not_progress():
    """A OneCycleLR of 6 steps after 6 steps vs a fresh one of 9: only total_steps is a change of setting (its
    phases follow it); position, rates and step counts are progress."""
    from lightning_modules.resume import schedule_changes

    def one_cycle(total: int, steps: int, pct_start: float = 0.3) -> dict:
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=total, pct_start=pct_start)
        for _ in range(steps):
            opt.step()
            scheduler.step()
        return scheduler.state_dict()

    assert schedule_changes(one_cycle(6, 6), one_cycle(9, 0)) == ["total_steps: 6 → 9"]
    assert schedule_changes(one_cycle(6, 6), one_cycle(6, 0)) == []
    # same length, other warm-up: the phase boundary moves from 0.3·6−1 = 0.8 to 0.5·6−1 = 2.0
    (change,) = schedule_changes(one_cycle(6, 2), one_cycle(6, 0, pct_start=0.5))
    assert change.startswith("_schedule_phases: [{'end_step': 0.79999") and "'end_step': 2.0" in change


def test_schedule_changes_ignores_the_progress_of_nested_schedulers():
    from lightning_modules.resume import schedule_changes

    def sequential(steps: int, t_max: int = 4) -> dict:
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        parts = [torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=2),
                 torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max)]
        scheduler = torch.optim.lr_scheduler.SequentialLR(opt, parts, milestones=[2])
        for _ in range(steps):
            opt.step()
            scheduler.step()
        return scheduler.state_dict()

    assert schedule_changes(sequential(3), sequential(0)) == []  # progress only
    (change,) = schedule_changes(sequential(3), sequential(0, t_max=8))
    assert change.startswith("_schedulers: [{'start_factor': 0.1")  # the cosine part's T_max 4 → 8

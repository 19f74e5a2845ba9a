"""Warm-up + milestone learning-rate schedule (torch LambdaLR)."""

import pytest
import torch

from resam_dist.train.schedule import build_scheduler, lr_factor, set_peak_settings


def test_factor_warms_up_linearly_then_decays_at_milestones():
    factors = [lr_factor(s, warmup_steps=4, milestones=[6, 8], gamma=0.1) for s in range(10)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4:6] == pytest.approx([1.0, 1.0])
    assert factors[6:8] == pytest.approx([0.1, 0.1])
    assert factors[8:] == pytest.approx([0.01, 0.01])
    assert lr_factor(0, warmup_steps=0, milestones=[], gamma=0.1) == 1.0


def test_scheduler_drives_the_optimizer_and_resumes_from_its_state():
    weight = torch.nn.Parameter(torch.zeros(2))

    def make():
        optimizer = torch.optim.AdamW([weight], lr=1.0)
        return optimizer, build_scheduler(optimizer, warmup_steps=2, milestones=[3], gamma=0.5)

    optimizer, scheduler = make()
    seen = []
    for _ in range(5):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.5])

    state = scheduler.state_dict()
    optimizer2, scheduler2 = make()
    scheduler2.load_state_dict(state)
    assert scheduler2.get_last_lr() == pytest.approx(scheduler.get_last_lr())
    assert scheduler2.last_epoch == 5


def test_a_resume_applies_another_peak_lr_and_weight_decay_and_keeps_the_moments():
    """As the trainer resumes: the checkpoint's optimizer and schedule state restored (peak lr 1.0,
    weight decay 0.01), then the config's (0.1, 0.5) set over them."""
    def make(lr, weight_decay):
        weight = torch.nn.Parameter(torch.ones(2))
        optimizer = torch.optim.AdamW([weight], lr=lr, weight_decay=weight_decay)
        return weight, optimizer, build_scheduler(optimizer, warmup_steps=2, milestones=[3], gamma=0.5)

    weight, optimizer, scheduler = make(1.0, 0.01)
    for _ in range(4):
        weight.grad = torch.full_like(weight, 0.5)
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)  # after the milestone
    _, resumed, resumed_scheduler = make(0.1, 0.5)
    resumed.load_state_dict(optimizer.state_dict())
    resumed_scheduler.load_state_dict(scheduler.state_dict())
    assert resumed.param_groups[0]["lr"] == 0.5 and resumed_scheduler.base_lrs == [1.0]  # the checkpoint's
    set_peak_settings(resumed_scheduler, lr=0.1, weight_decay=0.5)
    group = resumed.param_groups[0]
    assert (group["lr"], group["initial_lr"], group["weight_decay"]) == (pytest.approx(0.05), 0.1, 0.5)
    assert resumed_scheduler.get_last_lr() == [group["lr"]]
    moments = optimizer.state_dict()["state"][0]
    assert all(torch.equal(resumed.state_dict()["state"][0][key], moments[key]) for key in moments)
    resumed_scheduler.step()
    assert group["lr"] == pytest.approx(0.05) and resumed_scheduler.base_lrs == [0.1]
    # the same values again leave the restored lr as it was, bit for bit
    set_peak_settings(scheduler, lr=1.0, weight_decay=0.01)
    assert optimizer.param_groups[0]["lr"] == 0.5


def test_bad_schedule_is_a_value_error():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="milestones"):
        build_scheduler(optimizer, warmup_steps=1, milestones=[5, 2], gamma=0.1)
    with pytest.raises(ValueError, match="warmup"):
        build_scheduler(optimizer, warmup_steps=-1, milestones=[], gamma=0.1)

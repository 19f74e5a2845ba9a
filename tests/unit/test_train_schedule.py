"""Warm-up + milestone learning-rate schedule (torch LambdaLR)."""

import pytest
import torch

from resam_dist.train.schedule import build_scheduler, lr_factor, schedule_warnings, set_peak_settings


def test_factor_warms_up_linearly_then_decays_at_milestones():
    factors = [lr_factor(s, warmup_steps=4, milestones=[6, 8], gamma=0.1) for s in range(10)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4:6] == pytest.approx([1.0, 1.0])
    assert factors[6:8] == pytest.approx([0.1, 0.1])
    assert factors[8:] == pytest.approx([0.01, 0.01])
    assert lr_factor(0, warmup_steps=0, milestones=[], gamma=0.1) == 1.0


def test_factor_in_images_counts_each_step_as_its_global_batch():
    # 64 images a step: warm-up 250 images -> 64/250, 128/250, 192/250, then the peak; milestone
    # 2000 images fires at the first step taken after 2000 images (step 32: 32 * 64 = 2048 >= 2000)
    factors = [lr_factor(s, warmup_steps=250, milestones=[2000, 4000], gamma=0.1, images_per_step=64)
               for s in range(70)]
    assert factors[:4] == pytest.approx([64 / 250, 128 / 250, 192 / 250, 1.0])
    assert factors[31] == 1.0 and factors[32] == pytest.approx(0.1)
    assert factors[62] == pytest.approx(0.1) and factors[63] == pytest.approx(0.01)
    # one image a step: the same factors as counting optimizer steps
    for step in range(12):
        assert lr_factor(step, warmup_steps=4, milestones=[6, 8], gamma=0.1, images_per_step=1) == \
            lr_factor(step, warmup_steps=4, milestones=[6, 8], gamma=0.1)
    with pytest.raises(ValueError, match="images per optimizer step"):
        build_scheduler(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]), warmup_steps=1,
                        milestones=[], gamma=0.1, images_per_step=0)


def test_schedule_warnings_name_what_a_run_never_reaches():
    # 90 steps of 64 images: warm-up and both milestones are reached in images, none in steps
    assert schedule_warnings(total_steps=90, warmup_steps=250, milestones=[2000, 4000], images_per_step=64,
                             unit="images") == []
    notes = schedule_warnings(total_steps=90, warmup_steps=250, milestones=[2000, 4000], images_per_step=1,
                              unit="steps")
    assert len(notes) == 3
    assert "warmup_steps 250 (optimizer steps) outlasts this run's 90 optimizer steps" in notes[0]
    assert "milestones [2000, 4000] (optimizer steps) lie beyond" in notes[1]
    assert 'schedule_unit "images"' in notes[2]
    # a milestone fires when the last step is taken at or after it: 63 * 64 = 4032 >= 4000
    assert schedule_warnings(total_steps=64, warmup_steps=250, milestones=[2000, 4000], images_per_step=64,
                             unit="images") == []
    notes = schedule_warnings(total_steps=63, warmup_steps=250, milestones=[2000, 4000], images_per_step=64,
                              unit="images")
    assert notes == ["train.milestones [4000] (images) lie beyond this run's 63 optimizer steps: those decays "
                     "never happen"]


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

"""Learning-rate schedule: linear warm-up, then a step decay at milestones (torch LambdaLR).

The factor applied to the peak lr before optimizer step `s + 1` (s optimizer steps done) is

    min(1, (s + 1) / warmup_steps) * gamma ** (number of milestones m with m <= s)

so the first step runs at lr / warmup_steps, step `warmup_steps` reaches the peak, and the step
after `m` optimizer steps runs decayed. With `train.schedule_unit` "images", warmup_steps and the
milestones count training images instead: each optimizer step stands for `images_per_step` of
them (the global batch: images_per_rank x ranks x grad_accum_steps), so

    min(1, (s + 1) * images_per_step / warmup_steps) * gamma ** (number of m with m <= s * images_per_step)

and a schedule written for batch 1 (the public code's) holds at any global batch. DeepSpeed
calls `scheduler.step()` once per optimizer step; its state (`last_epoch`) is saved in the
checkpoint. A resumed run applies its config's peak lr and weight decay over the checkpoint's
(`set_peak_settings`), and its warm-up, milestones and gamma (the factor is rebuilt from the
config, not restored).
"""

from __future__ import annotations

import bisect
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, *, warmup_steps: int, milestones: list[int], gamma: float,
              images_per_step: int = 1) -> float:
    """Multiplier of the peak lr after `step` optimizer steps (see the module docstring);
    images_per_step 1: warmup_steps and milestones count optimizer steps."""
    warmup = 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) * images_per_step / warmup_steps)
    decays = bisect.bisect_right(milestones, step * images_per_step)
    return warmup * gamma ** decays


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, milestones: list[int],
                    gamma: float, images_per_step: int = 1) -> LambdaLR:
    """LambdaLR over `lr_factor` (a functools.partial, so the scheduler state stays picklable)."""
    if warmup_steps < 0:
        raise ValueError(f"train.warmup_steps must be >= 0, got {warmup_steps}")
    if any(later <= earlier for earlier, later in zip(milestones, list(milestones)[1:])):
        raise ValueError(f"train.milestones must be strictly increasing, got {milestones}")
    if images_per_step < 1:
        raise ValueError(f"images per optimizer step must be >= 1, got {images_per_step}")
    factor = partial(lr_factor, warmup_steps=warmup_steps, milestones=list(milestones), gamma=gamma,
                     images_per_step=images_per_step)
    return LambdaLR(optimizer, lr_lambda=factor)


def schedule_warnings(*, total_steps: int, warmup_steps: int, milestones: list[int], images_per_step: int,
                      unit: str) -> list[str]:
    """What of the schedule a run of `total_steps` optimizer steps never reaches: a warm-up that
    outlasts it, milestones that never fire (with the global batch, so the fix is plain)."""
    counted = "images" if unit == "images" else "optimizer steps"
    last = (total_steps - 1) * images_per_step  # what the last step's decay count is taken at
    notes = []
    if warmup_steps > total_steps * images_per_step:
        notes.append(f"train.warmup_steps {warmup_steps} ({counted}) outlasts this run's {total_steps} optimizer "
                     f"steps: the lr never reaches its peak")
    unreached = [m for m in milestones if m > last]
    if unreached:
        notes.append(f"train.milestones {unreached} ({counted}) lie beyond this run's {total_steps} optimizer "
                     f"steps: those decays never happen")
    if notes and unit == "steps":
        notes.append("train.schedule_unit \"images\" counts warm-up and milestones in training images "
                     "(the public code's schedules are written for batch 1)")
    return notes


def set_peak_settings(scheduler: LambdaLR, *, lr: float, weight_decay: float) -> None:
    """A resumed run's train.lr and train.weight_decay, over the ones its checkpoint restored: the
    peak lr (the schedule's base) and the weight decay of every parameter group, and the lr of the
    next optimizer step (the peak times the schedule's factor at the restored step). The
    optimizer's moments and the schedule's step stay as restored; unchanged values leave the lr
    as restored, bit for bit (LambdaLR computes it the same way)."""
    groups = scheduler.optimizer.param_groups  # (the trainer builds one group; all get the same values)
    scheduler.base_lrs = [lr] * len(groups)
    for group, factor in zip(groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["weight_decay"] = weight_decay
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]  # (what get_last_lr() returns)

"""Learning-rate schedule: linear warm-up, then a step decay at milestones (torch LambdaLR).

The factor applied to the peak lr before optimizer step `s + 1` (s optimizer steps done) is

    min(1, (s + 1) / warmup_steps) * gamma ** (number of milestones m with m <= s)

so the first step runs at lr / warmup_steps, step `warmup_steps` reaches the peak, and the step
after `m` optimizer steps runs decayed. DeepSpeed calls `scheduler.step()` once per optimizer
step; its state (`last_epoch`) is saved in the checkpoint. A resumed run applies its config's
peak lr and weight decay over the checkpoint's (`set_peak_settings`), and its warm-up, milestones
and gamma (the factor is rebuilt from the config, not restored).
"""

from __future__ import annotations

import bisect
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, *, warmup_steps: int, milestones: list[int], gamma: float) -> float:
    """Multiplier of the peak lr after `step` optimizer steps (see the module docstring)."""
    warmup = 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
    decays = bisect.bisect_right(milestones, step)
    return warmup * gamma ** decays


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, milestones: list[int],
                    gamma: float) -> LambdaLR:
    """LambdaLR over `lr_factor` (a functools.partial, so the scheduler state stays picklable)."""
    if warmup_steps < 0:
        raise ValueError(f"train.warmup_steps must be >= 0, got {warmup_steps}")
    if any(later <= earlier for earlier, later in zip(milestones, list(milestones)[1:])):
        raise ValueError(f"train.milestones must be strictly increasing, got {milestones}")
    factor = partial(lr_factor, warmup_steps=warmup_steps, milestones=list(milestones), gamma=gamma)
    return LambdaLR(optimizer, lr_lambda=factor)


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

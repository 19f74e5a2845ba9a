"""Learning-rate schedule: linear warm-up, then a step decay at milestones (torch LambdaLR).

The factor applied to the peak lr before optimizer step `s + 1` (s optimizer steps done) is

    min(1, (s + 1) / warmup_steps) * gamma ** (number of milestones m with m <= s)

so the first step runs at lr / warmup_steps, step `warmup_steps` reaches the peak, and the step
after `m` optimizer steps runs decayed. DeepSpeed calls `scheduler.step()` once per optimizer
step; its state (`last_epoch`) is saved in the checkpoint.
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

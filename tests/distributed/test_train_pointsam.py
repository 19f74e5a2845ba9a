"""The PointSAM-style baseline through the real trainer: 2 gloo ranks, ZeRO-2, one epoch, a NaN loss
injected at step 2 on rank 1. The skipped micro-step must leave the prototype store alone: after 3
optimizer steps (4 batches, one skipped) each rank's state counts exactly 3 iterations, and the
checkpoint restores it. The last step is logged although the skip made it end short of the 4 steps
the epoch was planned to take."""

from __future__ import annotations

import math

import pytest
import torch

from resam_dist.train.metrics import read_jsonl
from train_helpers import run, torchrun_cmd, write_config

pytestmark = pytest.mark.distributed

STEPS = 3


def test_pointsam_trains_and_skipped_steps_leave_its_state_alone(train_shards, tmp_path):
    config = write_config(tmp_path / "config.json", shards=train_shards, output_dir=tmp_path / "run", overrides={
        "resam.method": "pointsam", "resam.pointsam_cluster_every": 2, "resam.pointsam_target_images": 2,
        "resam.pointsam_store_size": 16, "deepspeed.zero_optimization.stage": 2, "train.max_steps": 0,
        "train.epochs": 1, "train.log_every": 2, "checkpoint.every_steps": STEPS, "faults.nan_loss_step": 2,
        "faults.nan_loss_rank": 1})
    result = run(torchrun_cmd(config), log=tmp_path / "train.log")
    assert result.returncode == 0, (tmp_path / "train.log").read_text()[-4000:]

    records = read_jsonl(tmp_path / "run" / "train_log.jsonl")
    steps = [r for r in records if r["event"] == "step"]
    assert records[0]["total_steps"] == STEPS + 1  # 16 scenes, 2 ranks x 2 images: 4 batches
    assert [r["step"] for r in steps] == [2, 3] and all(math.isfinite(r["loss"]) for r in steps)
    assert records[-1]["event"] == "end" and records[-1]["skipped"]["nonfinite"] == 1

    checkpoint = tmp_path / "run" / "checkpoints" / f"step_{STEPS:08d}"
    for rank in (0, 1):
        state = torch.load(checkpoint / f"client_rank{rank:05d}.pt", weights_only=False)["step_state"]
        assert state["iteration"] == STEPS, f"rank {rank}: the skipped step changed the PointSAM state"
        assert state["store"].shape[0] > 0 and state["target_prototypes"].shape[0] > 0

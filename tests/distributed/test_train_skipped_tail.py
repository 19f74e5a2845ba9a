"""A run resumed inside an epoch whose remaining batches the loss guard all skips goes on into the
next epoch. The tail is replayed exactly on every relaunch, so stopping there ("every batch of a
whole epoch skipped") would stop every relaunch too; only a whole epoch of skips stops a run.
Under ZeRO-3: the relaunch also resumes a stage-3 checkpoint (partitioned LoRA weights and optimizer
state, no frozen weights) and trains on from it."""

from __future__ import annotations

import pytest

from resam_dist.train.metrics import read_jsonl
from train_helpers import run, torchrun_cmd, write_config

pytestmark = pytest.mark.distributed

SKIPPED_ONCE = {"nonfinite": 1, "spike": 0, "nonfinite_grad": 0}  # the skip counts by reason

# 16 scenes, 2 ranks x 2 images: 4 batches per epoch and rank


def test_a_skipped_epoch_tail_after_a_resume_does_not_stop_the_run(train_shards, tmp_path):
    common = {"deepspeed.zero_optimization.stage": 3, "checkpoint.every_steps": 3}
    first = write_config(tmp_path / "first.json", shards=train_shards, output_dir=tmp_path / "run",
                         overrides={**common, "train.max_steps": 3})
    done = run(torchrun_cmd(first), log=tmp_path / "first.log")
    assert done.returncode == 0, done.stdout[-4000:]
    # the relaunch: one batch of epoch 0 is left, and its loss is NaN on rank 1
    second = write_config(tmp_path / "second.json", shards=train_shards, output_dir=tmp_path / "run",
                          overrides={**common, "train.max_steps": 5, "faults.nan_loss_step": 4,
                                     "faults.nan_loss_rank": 1})
    resumed = run(torchrun_cmd(second), log=tmp_path / "second.log")
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    records = read_jsonl(tmp_path / "run" / "train_log.jsonl")
    assert [r["resumed_from"] for r in records if r["event"] == "start"] == [None, "step_00000003"]
    skips = [r for r in records if r["event"] == "skip"]
    assert [(r["step"], r["reason"]) for r in skips] == [(4, "nonfinite")]
    assert [r["step"] for r in records if r["event"] == "step"] == [1, 2, 3, 4, 5]
    assert records[-1]["event"] == "end" and records[-1]["skipped"] == SKIPPED_ONCE

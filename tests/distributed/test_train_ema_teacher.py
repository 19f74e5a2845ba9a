"""The EMA teacher (`resam.teacher_ema`) under ZeRO-2 on 2 gloo ranks: its averages move, are the
same on both ranks, go into every checkpoint, and a run stopped and relaunched reproduces the
uninterrupted run's losses and averages bit for bit (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

from resam_dist.train.metrics import read_jsonl
from train_helpers import deepspeed_cmd, run, step_losses, write_config

pytestmark = pytest.mark.distributed


def client(output_dir, step, rank):
    path = output_dir / "checkpoints" / f"step_{step:08d}" / f"client_rank{rank:05d}.pt"
    return torch.load(path, weights_only=False)


def test_ema_teacher_is_identical_on_ranks_checkpointed_and_resumed_bitwise(train_shards, tmp_path):
    common = {"deepspeed.zero_optimization.stage": 2, "checkpoint.every_steps": 2, "checkpoint.keep_last": 3,
              "resam.teacher_ema": 0.5}
    straight_cfg = write_config(tmp_path / "straight.json", shards=train_shards, output_dir=tmp_path / "straight",
                                overrides={**common, "train.max_steps": 4})
    straight = run(deepspeed_cmd(straight_cfg), log=tmp_path / "straight.log")
    assert straight.returncode == 0, straight.stdout[-4000:]
    for max_steps in (2, 4):  # the same run in two launches
        split_cfg = write_config(tmp_path / f"split{max_steps}.json", shards=train_shards,
                                 output_dir=tmp_path / "split", overrides={**common, "train.max_steps": max_steps})
        done = run(deepspeed_cmd(split_cfg), log=tmp_path / f"split{max_steps}.log")
        assert done.returncode == 0, done.stdout[-4000:]

    starts = [r for r in read_jsonl(tmp_path / "split" / "train_log.jsonl") if r["event"] == "start"]
    assert [s["resumed_from"] for s in starts] == [None, "step_00000002"]
    straight_losses = step_losses(tmp_path / "straight" / "train_log.jsonl")
    assert sorted(straight_losses) == [1, 2, 3, 4]
    assert step_losses(tmp_path / "split" / "train_log.jsonl") == straight_losses  # exact float equality

    early, late = (client(tmp_path / "straight", step, 0)["teacher_ema"] for step in (2, 4))
    assert late["decay"] == 0.5 and len(late["averages"]) > 0
    assert any(not torch.equal(a, b) for a, b in zip(early["averages"], late["averages"]))  # they move
    for run_dir in ("straight", "split"):
        rank0, rank1 = (client(tmp_path / run_dir, 4, rank)["teacher_ema"] for rank in (0, 1))
        assert all(torch.equal(a, b) for a, b in zip(rank0["averages"], rank1["averages"]))
        assert all(torch.equal(a, b) for a, b in zip(rank0["averages"], late["averages"]))

"""The EMA teacher (`resam.teacher_ema`) under ZeRO-2 on 2 gloo ranks, with gradient accumulation:
the averages follow avg_k = d avg_(k-1) + (1 - d) w_k once per optimizer step, are the same on both
ranks, go into every checkpoint, and a run stopped and relaunched reproduces the uninterrupted
run's losses and averages bit for bit (CPU, fp32). The teacher really runs with them: step 1
(averages = weights) has the plain run's loss, step 2 does not."""

from __future__ import annotations

import pytest
import torch

from resam_dist.train.metrics import read_jsonl
from train_helpers import run, step_losses, torchrun_cmd, write_config

pytestmark = pytest.mark.distributed

DECAY = 0.5


def client(output_dir, step, rank):
    path = output_dir / "checkpoints" / f"step_{step:08d}" / f"client_rank{rank:05d}.pt"
    return torch.load(path, weights_only=False)


def lora_weights(output_dir, step):
    """The LoRA tensors of the engine's checkpoint, in parameter order (the trainer's order)."""
    path = output_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    module = torch.load(path, weights_only=False, map_location="cpu")["module"]
    return [tensor.float() for name, tensor in module.items() if "lora_" in name]


def test_ema_teacher_averages_once_per_step_on_every_rank_and_resumes_bitwise(train_shards, tmp_path):
    common = {"deepspeed.zero_optimization.stage": 2, "train.grad_accum_steps": 2, "checkpoint.every_steps": 1,
              "checkpoint.keep_last": 4, "resam.teacher_ema": DECAY}
    straight_cfg = write_config(tmp_path / "straight.json", shards=train_shards, output_dir=tmp_path / "straight",
                                overrides={**common, "train.max_steps": 4})
    straight = run(torchrun_cmd(straight_cfg), log=tmp_path / "straight.log")
    assert straight.returncode == 0, straight.stdout[-4000:]
    for max_steps in (2, 4):  # the same run in two launches
        split_cfg = write_config(tmp_path / f"split{max_steps}.json", shards=train_shards,
                                 output_dir=tmp_path / "split", overrides={**common, "train.max_steps": max_steps})
        done = run(torchrun_cmd(split_cfg), log=tmp_path / f"split{max_steps}.log")
        assert done.returncode == 0, done.stdout[-4000:]
    plain_cfg = write_config(tmp_path / "plain.json", shards=train_shards, output_dir=tmp_path / "plain",
                             overrides={**common, "resam.teacher_ema": 0.0, "train.max_steps": 2})
    plain = run(torchrun_cmd(plain_cfg), log=tmp_path / "plain.log")
    assert plain.returncode == 0, plain.stdout[-4000:]

    straight_losses = step_losses(tmp_path / "straight" / "train_log.jsonl")
    assert sorted(straight_losses) == [1, 2, 3, 4]
    plain_losses = step_losses(tmp_path / "plain" / "train_log.jsonl")
    assert plain_losses[1] == straight_losses[1] and plain_losses[2] != straight_losses[2]

    starts = [r for r in read_jsonl(tmp_path / "split" / "train_log.jsonl") if r["event"] == "start"]
    assert [s["resumed_from"] for s in starts] == [None, "step_00000002"]
    assert step_losses(tmp_path / "split" / "train_log.jsonl") == straight_losses  # exact float equality

    for step in (2, 3, 4):  # one update per optimizer step (2 micro-batches each), from its weights
        previous = client(tmp_path / "straight", step - 1, 0)["teacher_ema"]["averages"]
        current = client(tmp_path / "straight", step, 0)["teacher_ema"]["averages"]
        weights = lora_weights(tmp_path / "straight", step)
        assert len(current) == len(weights) == len(previous) > 0
        for average, before, weight in zip(current, previous, weights, strict=True):
            torch.testing.assert_close(average, DECAY * before + (1 - DECAY) * weight, rtol=1e-6, atol=1e-7)
        assert any(not torch.equal(a, b) for a, b in zip(previous, current, strict=True))
    final = client(tmp_path / "straight", 4, 0)["teacher_ema"]["averages"]
    for run_dir in ("straight", "split"):
        for rank in (0, 1):
            averages = client(tmp_path / run_dir, 4, rank)["teacher_ema"]["averages"]
            assert all(torch.equal(a, b) for a, b in zip(averages, final, strict=True))

    # relaunches that change the teacher: dropping the EMA teacher is a warning; turning it on over
    # a checkpoint written without one is refused before any step
    dropped_cfg = write_config(tmp_path / "dropped.json", shards=train_shards, output_dir=tmp_path / "straight",
                               overrides={**common, "resam.teacher_ema": 0.0, "train.max_steps": 5})
    dropped = run(torchrun_cmd(dropped_cfg), log=tmp_path / "dropped.log")
    assert dropped.returncode == 0, dropped.stdout[-4000:]
    assert "holds an EMA teacher (decay 0.5) but resam.teacher_ema is 0" in dropped.stdout
    assert "teacher_ema" not in client(tmp_path / "straight", 5, 0)
    refused_cfg = write_config(tmp_path / "refused.json", shards=train_shards, output_dir=tmp_path / "plain",
                               overrides={**common, "train.max_steps": 3})
    refused = run(torchrun_cmd(refused_cfg), log=tmp_path / "refused.log")
    assert refused.returncode != 0
    assert "has no EMA teacher (written with resam.teacher_ema 0)" in refused.stdout
    assert sorted(step_losses(tmp_path / "plain" / "train_log.jsonl")) == [1, 2]

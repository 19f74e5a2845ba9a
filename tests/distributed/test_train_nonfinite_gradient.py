"""A finite loss with a non-finite gradient (faults.nan_grad_step: rank 1, step 2) under ZeRO-2, and
at stage 0 in fp32 (where the trainer's FiniteStepAdamW does what ZeRO's check does), on 2 gloo
ranks, with the EMA teacher: DeepSpeed skips that optimizer update. The trainer counts it
(`skipped.nonfinite_grad`, a "skip" record), leaves the EMA teacher alone, and keeps the schedule
on its step numbers: the milestone at step 3 still divides the lr from step 4 on (before, every
such skip pushed the schedule back one step, uncounted)."""

from __future__ import annotations

import math

import pytest
import torch

from resam_dist.train.metrics import read_jsonl
from train_helpers import run, torchrun_cmd, write_config

pytestmark = pytest.mark.distributed


def checkpoint_file(run_dir, step, name):
    return torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / name, weights_only=False, map_location="cpu")


@pytest.mark.parametrize("stage", [2, 0])
def test_a_skipped_update_is_counted_and_keeps_the_schedule_and_the_teacher(train_shards, tmp_path, stage):
    config = write_config(tmp_path / "config.json", shards=train_shards, output_dir=tmp_path / "run", overrides={
        "deepspeed.zero_optimization.stage": stage, "train.precision": "fp32", "train.max_steps": 4, "checkpoint.every_steps": 1,
        "checkpoint.keep_last": 4, "resam.teacher_ema": 0.5, "faults.nan_grad_step": 2, "faults.nan_loss_rank": 1})
    result = run(torchrun_cmd(config), log=tmp_path / "train.log")
    assert result.returncode == 0, (tmp_path / "train.log").read_text()[-4000:]

    records = read_jsonl(tmp_path / "run" / "train_log.jsonl")
    steps = {r["step"]: r for r in records if r["event"] == "step"}
    assert sorted(steps) == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in steps.values())
    skips = [r for r in records if r["event"] == "skip"]
    assert [(r["step"], r["reason"]) for r in skips] == [(2, "nonfinite_grad")]
    assert records[-1]["event"] == "end" and records[-1]["skipped"] == {"nonfinite": 0, "spike": 0,
                                                                        "nonfinite_grad": 1}
    # lr 1e-3, warm-up 2 steps, milestone 3 (train_helpers): the schedule of a run without a skip
    assert [steps[step]["lr"] for step in (1, 2, 3, 4)] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-4])

    def lora(step):  # the LoRA tensors of the engine's checkpoint, in parameter order
        module = checkpoint_file(tmp_path / "run", step, "mp_rank_00_model_states.pt")["module"]
        return [tensor for name, tensor in module.items() if "lora_" in name]

    def averages(step):
        return checkpoint_file(tmp_path / "run", step, "client_rank00000.pt")["teacher_ema"]["averages"]

    assert all(torch.equal(a, b) for a, b in zip(lora(1), lora(2), strict=True))  # no update at step 2
    assert all(bool(torch.isfinite(tensor).all()) for tensor in lora(4))
    assert all(torch.equal(a, b) for a, b in zip(averages(1), averages(2), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(lora(2), lora(3), strict=True))  # step 3 trains again
    assert not all(torch.equal(a, b) for a, b in zip(averages(2), averages(3), strict=True))

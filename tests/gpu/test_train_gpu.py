"""The CUDA path of the trainer: nccl, one device per local rank, bf16 where supported, Triton
kernels, CUDA memory in the log (skipped without a CUDA device)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from train_helpers import make_shards, run, torchrun_cmd, write_config  # noqa: E402

from resam_dist.train.metrics import read_jsonl  # noqa: E402

pytestmark = pytest.mark.gpu


def test_training_on_cuda_devices(tmp_path):
    ranks = min(2, torch.cuda.device_count())
    shards = make_shards(tmp_path / "data")
    config = write_config(tmp_path / "config.json", shards=shards, output_dir=tmp_path / "run", overrides={
        "deepspeed.zero_optimization.stage": 2, "train.max_steps": 3, "train.precision": "auto",
        "kernels.enabled": True})
    result = run(torchrun_cmd(config, nprocs=ranks), log=tmp_path / "train.log", timeout=600, cuda=True)
    assert result.returncode == 0, result.stdout[-4000:]
    records = read_jsonl(tmp_path / "run" / "train_log.jsonl")
    start = records[0]
    assert start["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert [r["device"] for r in start["ranks"]] == [f"cuda:{r}" for r in range(ranks)]
    steps = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for record in steps:
        assert math.isfinite(record["loss"])
        assert 0 < record["memory"]["allocated_bytes"] <= record["memory"]["peak_bytes"]
        assert record["memory"]["reserved_bytes"] >= record["memory"]["allocated_bytes"]
    assert (tmp_path / "run" / "export" / "sam_merged.pth").is_file()

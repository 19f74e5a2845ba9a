"""memory_vs_pointsam on a CUDA device: the production path of all three variants (CUDA memory
counters, bf16 DeepSpeed ZeRO-2 over nccl, Triton kernels), with the tiny model and a few steps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "memory_vs_pointsam.py"


def test_benchmark_on_cuda(tmp_path):
    command = [sys.executable, str(SCRIPT), "--model", "tiny", "--instances", "8", "--images-per-step", "2",
               "--warmup", "1", "--steps", "3", "--device", "cuda", "--out", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    files = sorted(tmp_path.glob("memory_vs_pointsam_*.json"))
    assert len(files) == 1 and files[0].stem != "memory_vs_pointsam_cpu"
    result = json.loads(files[0].read_text())
    assert result["device"] == torch.cuda.get_device_name(0)
    variants = result["variants"]
    assert set(variants) == {"pointsam", "resam_public", "resam_dist"}
    for name, variant in variants.items():
        assert variant["memory_kind"] == "cuda_allocated" and not variant["out_of_memory"], name
        # the peak includes the weights resident before training
        assert variant["peak_bytes"] >= variant["baseline_bytes"] > 0, name
        assert variant["images_per_second"] > 0 and variant["finite"], name
    dist = variants["resam_dist"]
    assert dist["kernels"] == "triton" and dist["zero_stage"] == 2
    assert dist["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    # the teacher with gradients costs memory: PointSAM-style needs more than ReSAM-dist
    assert variants["pointsam"]["peak_bytes"] > dist["peak_bytes"]
    assert files[0].with_suffix(".md").exists() and files[0].with_suffix(".png").exists()

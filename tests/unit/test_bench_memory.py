"""Smoke test of benchmarks/memory_vs_pointsam.py: the tiny model, 1 warm-up + 2 steps, all three
variants (in parallel processes to save time: memory stays per process, timing is not judged)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "memory_vs_pointsam.py"


def test_benchmark_writes_three_variants(tmp_path):
    command = [sys.executable, str(SCRIPT), "--model", "tiny", "--instances", "2", "--images-per-step", "2",
               "--warmup", "1", "--steps", "2", "--device", "cpu", "--parallel", "--out", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    result = json.loads((tmp_path / "memory_vs_pointsam_cpu.json").read_text())
    assert set(result["variants"]) == {"pointsam", "resam_public", "resam_dist"}
    for name, variant in result["variants"].items():
        assert variant["peak_bytes"] > 0 and variant["mean_bytes"] > 0, name
        assert variant["images_per_second"] > 0 and len(variant["step_seconds"]) == 2, name
        assert variant["finite"] and len(variant["losses"]) == 3, name
    assert result["variants"]["resam_public"]["images_per_forward"] == 1
    assert result["variants"]["resam_dist"]["images_per_forward"] == 2
    assert result["variants"]["resam_dist"]["zero_stage"] == 2
    assert result["summary"]["targets_apply"] is False
    assert result["summary"]["peak_memory_reduction_vs_pointsam"] < 1.0

    markdown = (tmp_path / "memory_vs_pointsam_cpu.md").read_text()
    for label in ("PointSAM-style", "ReSAM (public code)", "ReSAM-dist"):
        assert f"| {label} |" in markdown
    png = (tmp_path / "memory_vs_pointsam_cpu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_cuda_asked_for_without_a_device_is_a_usage_error(tmp_path):
    import torch
    if torch.cuda.is_available():
        import pytest
        pytest.skip("a CUDA device is present")
    completed = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--out", str(tmp_path)],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "error: --device cuda: no CUDA device is available" in completed.stderr
    assert "Traceback" not in completed.stderr and not list(tmp_path.iterdir())

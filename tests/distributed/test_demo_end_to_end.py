"""The README's first command in small: `resam-demo` on the default target with tiny settings
(2 pretraining steps, 2 robust steps, 2 adaptation steps through `deepspeed launch/train.py` on
2 gloo ranks, 4 training and 4 test images). Checks the path end to end, not the figures: those
come from the full demo (README, docs/DEMO_FINDINGS.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from train_helpers import run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

DEMO = Path(sys.executable).parent / "resam-demo"
TINY = ["--train-images", "4", "--test-images", "4", "--pretrain-steps", "2", "--robust-steps", "2",
        "--steps", "2", "--seeds", "0", "--overlays", "1"]


def test_demo_runs_end_to_end_and_reuses_its_folder(tmp_path, monkeypatch):
    # as a user runs it: no Triton interpreter, so the kernels fall back to their torch references
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out, cache = tmp_path / "demo", tmp_path / "cache"
    command = [str(DEMO), *TINY, "--out", str(out), "--cache", str(cache)]
    first = run(command, log=tmp_path / "first.log", timeout=600)
    assert first.returncode == 0, first.stdout[-4000:]

    results = json.loads((out / "results.json").read_text())
    assert set(results["table"]) == {"direct", "ReSAM (full)"}
    assert results["settings"]["target"] == "rooftops-ships" and results["settings"]["adaptation_steps"] == 2
    for row in results["table"].values():
        assert 0.0 <= row["miou"][0] <= 1.0 and "miou_buildings" in row and "miou_sar_ships" in row
    assert {"direct", "adapted (ReSAM, seed 0)"} <= set(results["pseudo_label_iou_on_test"])
    assert len(results["overlays"]) == 1 and Path(results["overlays"][0]).exists()
    training = [json.loads(line) for line in (out / "runs" / "resam-seed0" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in training if row["event"] == "step"] == [1, 2]
    assert (out / "runs" / "resam-seed0" / "export" / "adapter" / "adapter_config.json").exists()
    teachers = sorted(path.name for path in cache.glob("*.pth"))
    assert len(teachers) == 2 and any(name.startswith("tiny_source_robust_") for name in teachers)

    # a second run finds the teachers and the finished adaptation run, and gives the same table
    second = run(command, log=tmp_path / "second.log", timeout=600)
    assert second.returncode == 0, second.stdout[-4000:]
    assert "pretrained source model from cache" in second.stdout
    assert "photometrically robust source model from cache" in second.stdout
    assert "reusing finished run" in second.stdout
    assert json.loads((out / "results.json").read_text())["table"] == results["table"]

    # the same folder with another target is refused before anything is written
    refused = run([*command, "--target", "dense"], log=tmp_path / "refused.log", timeout=120)
    assert refused.returncode == 2 and "holds a demo made with other settings" in refused.stdout
    assert "Traceback" not in refused.stdout
    assert json.loads((out / "demo_settings.json").read_text())["target"] == "rooftops-ships"

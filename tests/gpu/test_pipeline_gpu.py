"""The DALI pipeline on the GPU ("mixed" decoding): batches on the device, the same geometry as the
CPU pipeline (explicit per-operator seeds make the random draws identical), reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from resam_dist.config import Config
from resam_dist.data.pipeline import build_train_loader
from resam_dist.data.shards import main as resam_prep
from resam_dist.data.synthetic import write_synthetic_coco

pytestmark = pytest.mark.gpu

GPU = torch.device("cuda", 0)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline_gpu")
    parts = []
    for kind, count, size, first in (("source_shapes", 4, (40, 56), 1), ("sar_ships", 2, (80, 80), 101)):
        path = write_synthetic_coco(root / "coco", kind, count, size, seed=first, first_image_id=first,
                                    first_annotation_id=first * 1000)
        parts.append(json.loads(path.read_text()))
    coco = root / "coco" / "annotations.json"
    coco.write_text(json.dumps({"images": [i for p in parts for i in p["images"]],
                                "annotations": [a for p in parts for a in p["annotations"]],
                                "categories": parts[0]["categories"]}))
    code = resam_prep(["--annotations", str(coco), "--images", str(root / "coco" / "images"),
                       "--out", str(root / "shards"), "--tile-size", "48", "--overlap", "8", "--min-area", "6",
                       "--shard-size-mb", "0.03", "--no-progress"])
    assert code == 0
    return root / "shards"


def epoch(shards: Path, device: torch.device, image_size: int = 64):
    cfg = Config()
    cfg.data.train_shards = str(shards)
    cfg.data.num_points = 3
    cfg.train.images_per_rank = 4
    loader = build_train_loader(cfg, image_size=image_size, rank=0, world_size=1, local_rank=0, device=device)
    return list(loader)


def test_gpu_batches_live_on_the_device_and_match_the_cpu_geometry(shards):
    on_cpu, on_gpu = epoch(shards, CPU), epoch(shards, GPU)
    assert len(on_cpu) == len(on_gpu) == 4
    for cpu_batch, gpu_batch in zip(on_cpu, on_gpu):
        assert gpu_batch.keys == cpu_batch.keys
        for name in ("weak", "strong", "gt_masks", "points", "point_labels", "boxes", "counts", "image_sizes"):
            assert getattr(gpu_batch, name).device.type == "cuda", name
        for name in ("gt_masks", "points", "point_labels", "boxes", "counts", "image_sizes"):
            assert torch.equal(getattr(gpu_batch, name).cpu(), getattr(cpu_batch, name)), name
        difference = (gpu_batch.weak.cpu() - cpu_batch.weak).abs()   # resize rounding may differ by a grey level
        assert difference.mean() < 0.02 and difference.max() < 0.1
        assert not torch.equal(gpu_batch.strong, gpu_batch.weak)


def test_gpu_points_lie_in_their_masks(shards):
    for batch in epoch(shards, GPU):
        for b in range(batch.points.shape[0]):
            for k in range(int(batch.counts[b])):
                for p in range(6):
                    x, y = batch.points[b, k, p].tolist()
                    assert bool(batch.gt_masks[b, k, int(y), int(x)]) == (p < 3)


def test_gpu_same_seed_same_batches(shards):
    first, second = epoch(shards, GPU, image_size=1024), epoch(shards, GPU, image_size=1024)
    for one, two in zip(first, second):
        assert one.keys == two.keys
        for name in ("weak", "strong", "gt_masks", "points", "boxes"):
            assert torch.equal(getattr(one, name), getattr(two, name)), name

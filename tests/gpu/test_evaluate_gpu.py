"""resam-eval's model path on CUDA: same masks as on the CPU (fp32), bf16 autocast runs."""

import pytest
import torch

from resam_dist.data.coco import CocoSplit
from resam_dist.data.synthetic import write_synthetic_coco
from resam_dist.eval.evaluate import evaluate_model
from resam_dist.eval.metrics import ImagewiseMeter
from resam_dist.model.build import build_sam

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_eval")
    annotations = write_synthetic_coco(root, "buildings", 4, (200, 300), seed=3)
    return CocoSplit(annotations, root / "images")


def test_cuda_matches_cpu_and_bf16_runs(split):
    model = build_sam("tiny", seed=0)
    on_cpu = evaluate_model(model, split, num_points=1, batch_size=2, device="cpu")
    on_cuda = evaluate_model(model, split, num_points=1, batch_size=2, device="cuda")
    assert on_cuda.scores["instances"] == on_cpu.scores["instances"] > 0
    assert isinstance(on_cuda.meter, ImagewiseMeter) and on_cuda.meter.state.device.type == "cuda"
    for key in ("miou", "f1", "precision", "recall", "ap"):
        assert on_cuda.scores[key] == pytest.approx(on_cpu.scores[key], abs=0.02), key
    in_bf16 = evaluate_model(model, split, num_points=1, batch_size=2, device="cuda",
                             autocast_dtype=torch.bfloat16)
    assert 0.0 <= in_bf16.scores["miou"] <= 1.0
    assert in_bf16.scores["miou"] == pytest.approx(on_cuda.scores["miou"], abs=0.1)

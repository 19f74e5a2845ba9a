"""Point-prompted evaluation of the tiny SAM on a hand-written 3-image COCO set, and resam-eval."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resam_dist.config import load_config
from resam_dist.data.coco import CocoSplit, masks_to_rle
from resam_dist.eval.evaluate import (
    canvas_logits_to_masks, evaluate_model, load_model, main, prepare_canvas, resized_shape, sample_prompts,
)
from resam_dist.eval.metrics import score_coco_results
from resam_dist.model.build import PIXEL_MEAN, PIXEL_STD, build_sam

REPO = Path(__file__).resolve().parents[2]
SCORE_KEYS = ("miou", "f1", "precision", "recall", "miou_instances", "f1_instances", "ap", "ap50", "ap75",
              "images", "instances")


def _write_coco(root: Path) -> Path:
    """Three images: 40 x 64 with two instances (categories 1, 2), 48 x 48 with one, 32 x 40 with none."""
    (root / "images").mkdir(parents=True)
    specs = [
        (1, "a.png", 40, 64, [((4, 10, 20, 30), 1), ((22, 38, 30, 60), 2)]),
        (2, "b.png", 48, 48, [((10, 10, 40, 30), 1)]),
        (3, "c.png", 32, 40, []),
    ]
    images, annotations = [], []
    rng = np.random.default_rng(0)
    ann_id = 100
    for image_id, name, height, width, boxes in specs:
        pixels = rng.integers(60, 90, size=(height, width, 3), dtype=np.uint8)
        for (y0, x0, y1, x1), category in boxes:
            pixels[y0:y1, x0:x1] = (200, 40, 40) if category == 1 else (40, 40, 220)
            mask = np.zeros((1, height, width), dtype=bool)
            mask[0, y0:y1, x0:x1] = True
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": category,
                                "segmentation": masks_to_rle(mask)[0], "iscrowd": 0,
                                "area": float(mask.sum()), "bbox": [x0, y0, x1 - x0, y1 - y0]})
            ann_id += 1
        Image.fromarray(pixels).save(root / "images" / name)
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
    gt_file = root / "annotations.json"
    gt_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                   "categories": [{"id": 1, "name": "roof"}, {"id": 2, "name": "ship"}]}))
    return gt_file


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return _write_coco(root), root / "images"


@pytest.fixture(scope="module")
def tiny_model():
    return build_sam("tiny", seed=0)


def test_resize_canvas_and_normalisation():
    assert resized_shape(40, 64, 256) == (160, 256)
    assert resized_shape(3, 7, 256) == (110, 256)  # int(3 * 256 / 7 + 0.5) = 110
    image = np.full((40, 64, 3), 100, dtype=np.uint8)
    canvas, hw = prepare_canvas(image, 256, "cpu")
    assert hw == (160, 256) and canvas.shape == (3, 256, 256)
    expected = (100 - torch.tensor(PIXEL_MEAN)) / torch.tensor(PIXEL_STD)
    assert torch.allclose(canvas[:, :160, :].mean(dim=(1, 2)), expected, atol=1e-4)
    assert torch.count_nonzero(canvas[:, 160:, :]) == 0  # zero padding below the image


def test_prompts_seeded_and_scaled():
    masks = np.zeros((2, 40, 64), dtype=bool)
    masks[0, 4:20, 10:30] = True
    masks[1, 22:30, 38:60] = True
    kwargs = dict(seed=1337, image_id=5, original_hw=(40, 64), resized_hw=(160, 256))
    points, labels = sample_prompts(masks, 2, **kwargs)
    again, _ = sample_prompts(masks, 2, **kwargs)
    other, _ = sample_prompts(masks, 2, **{**kwargs, "image_id": 6})
    assert points.shape == (2, 4, 2) and labels.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    assert torch.equal(points, again) and not torch.equal(points, other)
    negative_id, _ = sample_prompts(masks, 2, **{**kwargs, "image_id": -5})  # COCO allows negative ids
    assert torch.equal(negative_id, sample_prompts(masks, 2, **{**kwargs, "image_id": -5})[0])
    assert not torch.equal(negative_id, points)
    # Back on the original grid, positives fall inside and negatives outside their instance.
    original = points / torch.tensor([256 / 64, 160 / 40])
    for k in range(2):
        cols, rows = original[k, :, 0].floor().long(), original[k, :, 1].floor().long()
        inside = masks[k][rows.numpy(), cols.numpy()]
        assert inside.tolist() == [True, True, False, False]


def test_canvas_logits_map_back_to_original_grid():
    # GT of a 40 x 64 image drawn on the 160 x 256 area of a 256 canvas: mapping back recovers it.
    gt = torch.zeros(1, 40, 64, dtype=torch.bool)
    gt[0, 4:20, 10:30] = True
    canvas = torch.full((1, 256, 256), -5.0)
    canvas[0, 16:80, 40:120] = 5.0  # the same box, 4x larger
    canvas[0, 160:, :] = 5.0  # padding area: must be cropped away
    masks = canvas_logits_to_masks(canvas, (160, 256), (40, 64))
    assert masks.shape == (1, 40, 64)
    assert torch.equal(masks, gt)


def test_evaluate_model_deterministic_and_consistent(coco_set, tiny_model):
    gt_file, image_dir = coco_set
    split = CocoSplit(gt_file, image_dir)
    tiny_model.train()
    first = evaluate_model(tiny_model, split, num_points=1, batch_size=2, device="cpu", max_instances=1)
    assert tiny_model.training  # mode restored
    second = evaluate_model(tiny_model, split, num_points=1, batch_size=1, device="cpu", max_instances=50)
    assert first.scores["images"] == 2 and first.scores["instances"] == 3
    assert first.scores["skipped_images"] == 1
    for key in ("miou", "f1", "precision", "recall", "ap", "ap50", "ap75"):
        assert 0.0 <= first.scores[key] <= 1.0
        assert first.scores[key] == pytest.approx(second.scores[key], abs=1e-9)  # batching and chunking do not matter
    assert len(first.coco_results) == len(second.coco_results) == 3
    for one, two in zip(first.coco_results, second.coco_results):
        assert one["segmentation"] == two["segmentation"] and one["gt_id"] == two["gt_id"]
        assert one["score"] == pytest.approx(two["score"], abs=1e-5)
    assert sorted(r["gt_id"] for r in first.coco_results) == [100, 101, 102]
    assert [row["evaluated"] for row in first.per_image] == [True, True, False]
    assert first.per_image[2].keys() == first.per_image[0].keys()  # the same keys for skipped images
    assert (first.per_image[2]["tp"], first.per_image[2]["fp"], first.per_image[2]["fn"]) == (0, 0, 0)
    # Re-scoring the written RLE results (paired by gt_id) reproduces the model-mode scores.
    rescored = score_coco_results(gt_file, first.coco_results)
    for key in ("miou", "f1", "precision", "recall"):
        assert rescored.scores[key] == pytest.approx(first.scores[key], abs=1e-12)


def _config(tmp_path: Path, gt_file: Path, image_dir: Path) -> Path:
    raw = json.loads((REPO / "configs" / "demo.json").read_text())
    raw["data"]["test_annotations"] = str(gt_file)
    raw["data"]["test_images"] = str(image_dir)
    raw["model"] = {"name": "tiny", "checkpoint": None}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(raw))
    return path


def test_cli_model_mode_writes_all_keys(coco_set, tiny_model, tmp_path, capsys):
    gt_file, image_dir = coco_set
    config = _config(tmp_path, gt_file, image_dir)
    sam_file = tmp_path / "tiny_sam.pth"
    torch.save(tiny_model.state_dict(), sam_file)
    out = tmp_path / "scores.json"
    saved = tmp_path / "results.json"
    status = main(["--config", str(config), "--checkpoint", str(sam_file), "--points", "2",
                   "--out", str(out), "--save-results", str(saved), "--device", "cpu"])
    assert status == 0
    table = capsys.readouterr().out
    assert "mIoU" in table and "AP75" in table
    report = json.loads(out.read_text())
    for key in SCORE_KEYS:
        assert key in report["scores"], key
    assert report["scores"]["images"] == 2 and report["scores"]["instances"] == 3
    assert report["settings"]["num_points"] == 2 and report["settings"]["seed"] == 1337
    assert len(report["per_image"]) == 3
    # The saved results, scored in results mode, give the same mIoU.
    out2 = tmp_path / "scores2.json"
    assert main(["--gt", str(gt_file), "--pred", str(saved), "--out", str(out2)]) == 0
    report2 = json.loads(out2.read_text())
    assert report2["scores"]["miou"] == pytest.approx(report["scores"]["miou"], abs=1e-12)
    assert report2["scores"]["miou_instances"] == pytest.approx(report["scores"]["miou_instances"], abs=1e-12)
    assert "mIoU inst-mean" in table
    evaluated = [row for row in report["per_image"] if row["evaluated"]]
    assert report["scores"]["miou_instances"] == pytest.approx(
        sum(row["iou_instances"] for row in evaluated) / len(evaluated), abs=1e-12)
    assert report2["scores"]["ap"] == pytest.approx(report["scores"]["ap"], abs=1e-12)
    # A missing checkpoint is a clear error, not a traceback.
    assert main(["--config", str(config), "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    # So are counts out of range (--max-images 0 scored nothing and exited 0; -3 dropped the last 3)
    for flag, value, least in (("--max-images", "0", 1), ("--max-images", "-3", 1), ("--batch-size", "0", 1),
                               ("--seed", "-1", 0)):
        assert main(["--config", str(config), "--checkpoint", str(sam_file), flag, value]) == 2
        assert f"{flag} must be at least {least}, got {value}" in capsys.readouterr().err


def test_cli_loads_lora_adapter_from_run_dir(coco_set, tmp_path):
    from resam_dist.model.lora import apply_lora, save_adapter

    gt_file, image_dir = coco_set
    config = _config(tmp_path, gt_file, image_dir)
    train_seed = json.loads(config.read_text())["train"]["seed"]
    # As the trainer does: base = tiny SAM seeded with train.seed (no checkpoint), adapter exported
    # to <run>/export/adapter. A trained-looking adapter: non-zero B, so it changes the masks.
    adapted = apply_lora(build_sam("tiny", seed=train_seed), rank=4, alpha=4.0, dropout=0.1, start_block=0, seed=1)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)))
    run_dir = tmp_path / "run"
    save_adapter(adapted, run_dir / "export" / "adapter")
    split = CocoSplit(gt_file, image_dir)
    expected = evaluate_model(adapted, split, num_points=1, batch_size=4, device="cpu", image_ids=[1])
    out = tmp_path / "adapter_scores.json"
    adapter_results = tmp_path / "adapter_results.json"
    assert main(["--config", str(config), "--checkpoint", str(run_dir), "--out", str(out), "--device", "cpu",
                 "--save-results", str(adapter_results), "--max-images", "1"]) == 0
    report = json.loads(out.read_text())
    assert "adapter" in report["settings"]["model"]
    assert report["scores"]["images"] == 1 and report["scores"]["instances"] == 2
    assert report["scores"]["miou"] == pytest.approx(expected.scores["miou"], abs=1e-9)
    assert json.loads(adapter_results.read_text()) == json.loads(json.dumps(expected.coco_results))
    # load_model: the adapter on the trainer's base; without --checkpoint, that base alone.
    cfg = load_config(config)
    loaded, _ = load_model(cfg, run_dir)
    assert loaded.state_dict().keys() == adapted.state_dict().keys()
    assert all(torch.equal(value, adapted.state_dict()[key]) for key, value in loaded.state_dict().items())
    base, description = load_model(cfg)
    assert description == "base tiny"
    reference = build_sam("tiny", seed=train_seed).state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in base.state_dict().items())
    # A folder without an adapter is a clear error.
    (tmp_path / "empty_run").mkdir()
    assert main(["--config", str(config), "--checkpoint", str(tmp_path / "empty_run")]) == 2


def test_cli_results_mode_oracle_is_perfect(coco_set, tmp_path):
    gt_file, _ = coco_set
    gt = json.loads(gt_file.read_text())
    oracle = [{"image_id": ann["image_id"], "category_id": ann["category_id"],
               "segmentation": ann["segmentation"], "score": 1.0, "gt_id": ann["id"]}
              for ann in gt["annotations"]]
    pred = tmp_path / "oracle.json"
    pred.write_text(json.dumps(oracle))
    out = tmp_path / "oracle_scores.json"
    assert main(["--gt", str(gt_file), "--pred", str(pred), "--out", str(out)]) == 0
    scores = json.loads(out.read_text())["scores"]
    assert scores["miou"] == 1.0 and scores["f1"] == 1.0
    assert scores["ap"] == pytest.approx(1.0) and scores["ap50"] == pytest.approx(1.0)
    assert scores["images"] == 2 and scores["instances"] == 3
    # Without gt_id the results are paired by best IoU: still perfect.
    for entry in oracle:
        del entry["gt_id"]
    pred.write_text(json.dumps(oracle[::-1]))
    assert main(["--gt", str(gt_file), "--pred", str(pred), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["scores"]["miou"] == 1.0 and report["settings"]["matching"] == "best_iou"


def test_cli_results_mode_malformed_file(coco_set, tmp_path, capsys):
    gt_file, _ = coco_set
    pred = tmp_path / "broken.json"
    pred.write_text(json.dumps([{"image_id": 1, "category_id": 1, "score": 0.5}]))
    assert main(["--gt", str(gt_file), "--pred", str(pred)]) == 2
    assert "broken.json: result #0 lacks the key 'segmentation'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--gt", str(gt_file)])  # --pred missing: usage error
    # model-mode options are refused in results mode (they used to be ignored silently)
    with pytest.raises(SystemExit):
        main(["--gt", str(gt_file), "--pred", str(pred), "--save-results", str(tmp_path / "saved.json")])
    assert "--save-results: model-mode option(s)" in capsys.readouterr().err


def test_cli_report_is_written_atomically_and_write_errors_are_reported(coco_set, tmp_path, capsys):
    """--out goes through a temporary file: a failed write reports exit 2 and leaves an earlier
    report whole (before, it was truncated in place and the OSError escaped as a traceback)."""
    gt_file, _ = coco_set
    gt = json.loads(gt_file.read_text())
    pred = tmp_path / "oracle.json"
    pred.write_text(json.dumps([{"image_id": ann["image_id"], "category_id": ann["category_id"],
                                 "segmentation": ann["segmentation"], "score": 1.0} for ann in gt["annotations"]]))
    out = tmp_path / "scores.json"
    assert main(["--gt", str(gt_file), "--pred", str(pred), "--out", str(out)]) == 0
    earlier = out.read_text()
    assert json.loads(earlier)["scores"]["miou"] == 1.0 and sorted(p.name for p in tmp_path.iterdir()) == [
        "oracle.json", "scores.json"]  # no temporary file left
    (tmp_path / "a_file").write_text("")
    assert main(["--gt", str(gt_file), "--pred", str(pred), "--out", str(tmp_path / "a_file" / "x.json")]) == 2
    assert "resam-eval: error:" in capsys.readouterr().err
    out.chmod(0o444)  # the report stays replaceable (a rename), and is replaced whole
    assert main(["--gt", str(gt_file), "--pred", str(pred), "--out", str(out)]) == 0
    assert out.read_text() == earlier

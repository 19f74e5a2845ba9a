"""Micro-imagewise scores and COCO mask AP on hand-counted tiny cases."""

import json
import math
import re

import numpy as np
import pytest
import torch

from resam_dist.data.coco import masks_to_rle
from resam_dist.eval.metrics import (
    ImagewiseMeter, batch_image_counts, coco_mask_ap, image_scores, instance_counts, instance_means,
    micro_imagewise, score_coco_results, scores_from_counts,
)


def t(rows):
    return torch.tensor(rows, dtype=torch.bool)


# Image 1: two instances on a 2 x 2 image.
#   instance 0: gt [[1,1],[0,0]] pred [[1,0],[0,0]] -> tp 1 fp 0 fn 1
#   instance 1: gt [[0,0],[1,1]] pred [[1,0],[1,1]] -> tp 2 fp 1 fn 0
#   stack: tp 3 fp 1 fn 1 -> IoU 3/5, F1 6/8, P 3/4, R 3/4
GT1 = t([[[1, 1], [0, 0]], [[0, 0], [1, 1]]])
PRED1 = t([[[1, 0], [0, 0]], [[1, 0], [1, 1]]])
# Image 2: one instance covering the image, one pixel predicted -> tp 1 fp 0 fn 3
#   IoU 1/4, F1 2/5, P 1, R 1/4
GT2 = t([[[1, 1], [1, 1]]])
PRED2 = t([[[1, 0], [0, 0]]])


def test_image_scores_hand_counted():
    assert image_scores(PRED1, GT1) == (3, 1, 1)
    assert image_scores(PRED2, GT2) == (1, 0, 3)


def test_stack_counts_pixel_instance_pairs_not_union():
    # Two instances side by side, predictions swapped: the union is perfect, the stack is not.
    gt = t([[[1, 0]], [[0, 1]]])
    pred = t([[[0, 1]], [[1, 0]]])
    assert image_scores(pred, gt) == (0, 2, 2)


def test_mean_of_image_ious_not_pooled():
    meter = ImagewiseMeter()
    meter.update(PRED1, GT1)
    meter.update(PRED2, GT2)
    result = meter.compute()
    assert result["miou"] == pytest.approx((3 / 5 + 1 / 4) / 2)  # 0.425
    assert result["f1"] == pytest.approx((6 / 8 + 2 / 5) / 2)
    assert result["precision"] == pytest.approx((3 / 4 + 1.0) / 2)
    assert result["recall"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    pooled_iou = 4 / (4 + 1 + 4)
    assert abs(result["miou"] - pooled_iou) > 0.01
    assert result["images"] == 2 and result["instances"] == 3 and result["skipped_images"] == 0


def test_batched_update_with_padding_counts_and_logits():
    # Batch of the two images, K = 2, image 2's second instance is padding (garbage must be ignored).
    gt = torch.stack([GT1, torch.cat([GT2, t([[[1, 1], [1, 1]]])])])  # 2 x 2 x 2 x 2
    pred = torch.stack([PRED1, torch.cat([PRED2, t([[[1, 1], [1, 1]]])])])
    logits = torch.where(pred, torch.tensor(3.0), torch.tensor(-2.0))
    counts = torch.tensor([2, 1])
    assert batch_image_counts(logits, gt, counts).tolist() == [[3, 1, 1], [1, 0, 3]]
    meter = ImagewiseMeter()
    per_image = meter.update(logits, gt, counts)
    assert per_image.tolist() == [[3, 1, 1], [1, 0, 3]]
    assert meter.compute()["miou"] == pytest.approx(0.425)
    assert meter.compute()["instances"] == 3
    # Without counts the garbage instance would count.
    assert batch_image_counts(pred, gt)[1].tolist() == [5, 0, 3]


def test_perfect_and_empty_predictions():
    perfect = ImagewiseMeter()
    perfect.update(GT1, GT1)
    perfect.update(GT2, GT2)
    assert perfect.compute()["miou"] == 1.0
    assert perfect.compute()["f1"] == 1.0
    empty = ImagewiseMeter()
    empty.update(torch.zeros_like(GT1), GT1)
    result = empty.compute()
    # Empty prediction: TP + FP = 0 -> precision 0 by definition; IoU, F1, recall are 0.
    assert (result["miou"], result["f1"], result["precision"], result["recall"]) == (0.0, 0.0, 0.0, 0.0)
    assert result["images"] == 1


def test_images_without_gt_are_skipped():
    meter = ImagewiseMeter()
    meter.update(PRED2, GT2)
    meter.update(torch.ones(0, 2, 2, dtype=torch.bool), torch.zeros(0, 2, 2, dtype=torch.bool))  # K = 0
    meter.update(t([[[1, 1], [0, 0]]]), t([[[0, 0], [0, 0]]]))  # only an empty GT mask
    result = meter.compute()
    assert result["images"] == 1 and result["skipped_images"] == 2
    assert result["miou"] == pytest.approx(0.25)
    with pytest.warns(UserWarning, match="no image"):
        assert math.isnan(ImagewiseMeter().compute()["miou"])


def test_scores_from_counts_zero_division():
    scores = scores_from_counts(torch.tensor([[0, 0, 4], [2, 2, 0]]))
    assert scores["precision"].tolist() == [0.0, 0.5]
    assert scores["iou"].tolist() == [0.0, 0.5]
    assert scores["recall"].tolist() == [0.0, 1.0]


def test_instance_means_average_each_instance_not_the_stack():
    # A 10,000-pixel instance found exactly and a 100-pixel one missed: the pooled stack scores
    # 10000 / 10100, the mean of the two instances' own IoUs 0.5 (the public PointSAM code's metric).
    gt = torch.zeros(2, 120, 120, dtype=torch.bool)
    gt[0, :100, :100] = True
    gt[1, 110:120, 110:120] = True
    pred = gt.clone()
    pred[1] = False
    meter = ImagewiseMeter()
    meter.update(pred, gt)
    result = meter.compute()
    assert result["miou"] == pytest.approx(10000 / 10100)
    assert result["miou_instances"] == pytest.approx(0.5) and result["f1_instances"] == pytest.approx(0.5)
    # Hand-counted images: PRED1 instances IoU 1/2 and 2/3, F1 2/3 and 4/5; PRED2 IoU 1/4, F1 2/5
    meter = ImagewiseMeter()
    meter.update(PRED1, GT1)
    meter.update(PRED2, GT2)
    result = meter.compute()
    assert result["miou_instances"] == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1 / 4) / 2)
    assert result["f1_instances"] == pytest.approx(((2 / 3 + 4 / 5) / 2 + 2 / 5) / 2)


def test_instance_means_against_a_per_instance_loop_with_padding():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 9, 11, generator=generator)  # B x K x H x W
    gt = torch.rand(3, 5, 9, 11, generator=generator) > 0.6
    counts = torch.tensor([5, 2, 0])  # image 2 has no instance: not evaluated
    meter = ImagewiseMeter()
    meter.update(logits, gt, counts)
    expected_iou, expected_f1 = [], []
    for b in range(2):
        ious, f1s = [], []
        for k in range(int(counts[b])):
            pred, truth = logits[b, k] > 0, gt[b, k]
            tp = int((pred & truth).sum())
            fp, fn = int((pred & ~truth).sum()), int((~pred & truth).sum())
            ious.append(tp / (tp + fp + fn))
            f1s.append(2 * tp / (2 * tp + fp + fn))
        expected_iou.append(np.mean(ious))
        expected_f1.append(np.mean(f1s))
    result = meter.compute()
    assert result["images"] == 2 and result["skipped_images"] == 1
    assert result["miou_instances"] == pytest.approx(np.mean(expected_iou), abs=1e-12)
    assert result["f1_instances"] == pytest.approx(np.mean(expected_f1), abs=1e-12)
    # an instance with tp + fp + fn = 0 scores 1; a B x K x 3 / B x K shape mismatch is refused
    means = instance_means(torch.tensor([[[0, 0, 0], [1, 1, 0]]]), torch.tensor([[True, True]]))
    assert means.tolist() == [[pytest.approx(0.75), pytest.approx((1 + 2 / 3) / 2)]]
    with pytest.raises(ValueError, match="B x K x 3"):
        instance_means(torch.zeros(2, 3), torch.ones(2, dtype=torch.bool))


def test_image_counts_without_instance_scores_leave_the_instance_means_nan():
    meter = ImagewiseMeter()
    meter.update(PRED1, GT1)
    assert not math.isnan(meter.compute()["miou_instances"])
    meter.update_counts(torch.tensor([[1, 0, 3]]), torch.tensor([1]))
    result = meter.compute()
    assert result["miou"] == pytest.approx((3 / 5 + 1 / 4) / 2)
    assert math.isnan(result["miou_instances"]) and math.isnan(result["f1_instances"])


def test_micro_imagewise_from_triples():
    result = micro_imagewise([(3, 1, 1), (1, 0, 3)])
    assert result["miou"] == pytest.approx(0.425)
    assert result["images"] == 2


def test_meter_state_merge_and_round_trip():
    first, second, both = ImagewiseMeter(), ImagewiseMeter(), ImagewiseMeter()
    first.update(PRED1, GT1)
    second.update(PRED2, GT2)
    both.update(PRED1, GT1)
    both.update(PRED2, GT2)
    first.merge(second)
    assert torch.equal(first.state, both.state)
    restored = ImagewiseMeter()
    restored.load_state_dict(json.loads(json.dumps(both.state_dict())))
    assert restored.compute() == both.compute()
    with pytest.raises(ValueError, match="lacks fields"):
        restored.load_state_dict({"iou_sum": 1.0})
    # a state written before the instance means existed: its pooled scores, no instance means
    old = {name: value for name, value in both.state_dict().items() if not name.startswith("instance_")}
    restored.load_state_dict(old)
    assert restored.compute()["miou"] == both.compute()["miou"]
    assert math.isnan(restored.compute()["miou_instances"])
    first.all_reduce()  # not initialised: a no-op
    assert torch.equal(first.state, both.state)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="equal shapes"):
        batch_image_counts(torch.zeros(1, 2, 2, 2, dtype=torch.bool), torch.zeros(1, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool masks or float logits"):
        image_scores(torch.zeros(1, 2, 2, dtype=torch.int64), GT2)


# ----------------------------------------------------------------------------------------------
# COCO: one 8 x 8 image, two instances of category 1
# ----------------------------------------------------------------------------------------------

def _gt_masks():
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 0:2, 0:4] = True  # 8 pixels
    masks[1, 5:8, 4:8] = True  # 12 pixels
    return masks


def _gt_dict():
    masks = _gt_masks()
    rles = masks_to_rle(masks)
    annotations = [{"id": 10 + k, "image_id": 7, "category_id": 1, "segmentation": rle, "iscrowd": 0}
                   for k, rle in enumerate(rles)]
    return {"images": [{"id": 7, "file_name": "a.png", "height": 8, "width": 8}],
            "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}


def _results(masks, scores, gt_ids=None):
    out = []
    for k, rle in enumerate(masks_to_rle(masks)):
        entry = {"image_id": 7, "category_id": 1, "segmentation": rle, "score": scores[k]}
        if gt_ids is not None:
            entry["gt_id"] = gt_ids[k]
        out.append(entry)
    return out


def test_coco_ap_perfect(tmp_path):
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(_gt_dict()))
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(_results(_gt_masks(), [0.9, 0.8])))
    ap = coco_mask_ap(gt_file, results_file)
    assert ap == {"ap": pytest.approx(1.0), "ap50": pytest.approx(1.0), "ap75": pytest.approx(1.0)}


def test_coco_ap_of_perfect_results_on_a_dense_image_is_1():
    """150 instances on one image (HRSID has ~100 and more): COCOeval's default of 100 detections
    per image capped perfect results at AP 0.66; AP counts as many as the densest image has."""
    masks = np.zeros((150, 40, 40), dtype=bool)
    for k in range(150):
        masks[k, (k // 15) * 4:(k // 15) * 4 + 3, (k % 15) * 2 + 5] = True  # 150 separate 3-pixel bars
    rles = masks_to_rle(masks)
    gt = {"images": [{"id": 7, "file_name": "a.png", "height": 40, "width": 40}],
          "annotations": [{"id": 10 + k, "image_id": 7, "category_id": 1, "segmentation": rle, "iscrowd": 0}
                          for k, rle in enumerate(rles)],
          "categories": [{"id": 1, "name": "thing"}]}
    results = [{"image_id": 7, "category_id": 1, "segmentation": rle, "score": 1.0 - k / 1000}
               for k, rle in enumerate(rles)]
    assert coco_mask_ap(gt, results) == {"ap": pytest.approx(1.0), "ap50": pytest.approx(1.0),
                                         "ap75": pytest.approx(1.0)}


def test_coco_ap_known_partial_cases():
    # One of two instances found exactly: precision 1 up to recall 0.5 -> 51 of 101 recall points.
    ap = coco_mask_ap(_gt_dict(), _results(_gt_masks()[:1], [0.9]))
    for key in ("ap", "ap50", "ap75"):
        assert ap[key] == pytest.approx(51 / 101)
    # Single GT of 8 pixels, prediction covers 5 of them: IoU 0.625 matches at 0.50, 0.55, 0.60.
    gt = _gt_dict()
    gt["annotations"] = gt["annotations"][:1]
    pred = np.zeros((1, 8, 8), dtype=bool)
    pred[0, 0:2, 0:2] = True
    pred[0, 0, 2] = True
    ap = coco_mask_ap(gt, _results(pred, [0.7]))
    assert ap["ap50"] == pytest.approx(1.0)
    assert ap["ap75"] == pytest.approx(0.0)
    assert ap["ap"] == pytest.approx(0.3)


def test_coco_ap_empty_results_warns():
    with pytest.warns(UserWarning, match="no results"):
        assert coco_mask_ap(_gt_dict(), []) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}


def test_malformed_results_raise_clear_errors(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        coco_mask_ap(_gt_dict(), bad_json)
    not_list = tmp_path / "dict.json"
    not_list.write_text(json.dumps({"image_id": 7}))
    with pytest.raises(ValueError, match="dict.json.*JSON list"):
        coco_mask_ap(_gt_dict(), not_list)
    no_score = tmp_path / "no_score.json"
    entry = _results(_gt_masks()[:1], [0.9])[0]
    del entry["score"]
    no_score.write_text(json.dumps([entry]))
    with pytest.raises(ValueError, match="no_score.json: result #0 lacks the key 'score'"):
        coco_mask_ap(_gt_dict(), no_score)
    wrong_image = _results(_gt_masks()[:1], [0.9])
    wrong_image[0]["image_id"] = 99
    with pytest.raises(ValueError, match="image_id 99 is not in the ground truth"):
        coco_mask_ap(_gt_dict(), wrong_image)
    wrong_size = _results(np.zeros((1, 4, 8), dtype=bool), [0.9])
    with pytest.raises(ValueError, match=r"result #0 \(image 7\): RLE size \[4, 8\] differs from image size \[8, 8\]"):
        coco_mask_ap(_gt_dict(), wrong_size)
    with pytest.raises(ValueError, match="results file not found"):
        coco_mask_ap(_gt_dict(), tmp_path / "missing.json")


def test_coco_ap_with_an_annotation_id_zero_is_still_perfect_for_perfect_results():
    # COCOeval reads a matched id of 0 as "no match"; ids from 0 are common in converted datasets
    gt = _gt_dict()
    for k, ann in enumerate(gt["annotations"]):
        ann["id"] = k  # 0 and 1
    ap = coco_mask_ap(gt, _results(_gt_masks(), [0.9, 0.8]))
    assert ap == {"ap": pytest.approx(1.0), "ap50": pytest.approx(1.0), "ap75": pytest.approx(1.0)}
    assert coco_mask_ap(gt, _results(_gt_masks()[1:], [0.9]))["ap"] == pytest.approx(51 / 101)
    scored = score_coco_results(gt, _results(_gt_masks(), [0.9, 0.8], gt_ids=[0, 1]))
    assert scored.scores["miou"] == 1.0  # gt_id pairing keeps the file's ids


@pytest.mark.parametrize("counts, message", [
    ([3, 2], "uncompressed RLE counts sum to 5, expected 64"),
    ([0, 60, 10], "uncompressed RLE counts sum to 70, expected 64"),
    ("0`0", "compressed RLE counts sum to"),
    (7, "RLE needs 'counts' (list or string)"),
])
def test_results_whose_runs_do_not_cover_the_image_are_refused(counts, message):
    entry = _results(_gt_masks()[:1], [0.9])[0]
    entry["segmentation"] = {"size": [8, 8], "counts": counts}
    for evaluate in (coco_mask_ap, score_coco_results):
        with pytest.raises(ValueError, match=r"<results>: result #0 \(image 7\): " + re.escape(message)):
            evaluate(_gt_dict(), [entry])
    entry["segmentation"] = {"size": 8, "counts": [64]}
    with pytest.raises(ValueError, match=re.escape("result #0 (image 7): RLE needs 'size' [height, width]")):
        score_coco_results(_gt_dict(), [entry])


@pytest.mark.parametrize("edit, message", [
    (lambda gt: gt["annotations"][0].pop("id"), "gt.json: annotations[0] needs an integer 'id', got None"),
    (lambda gt: gt["annotations"][1].update(id=10), "gt.json: annotations[1]: duplicate annotation id 10"),
    (lambda gt: gt["annotations"][0].pop("segmentation"), "gt.json: annotations[0] (id 10) lacks 'segmentation'"),
    (lambda gt: gt["annotations"][0].update(iscrowd=None), "annotations[0] (id 10): 'iscrowd' must be 0 or 1, got None"),
    (lambda gt: gt["annotations"][0].update(image_id="7"), "annotations[0] needs an integer 'image_id', got '7'"),
    (lambda gt: gt["images"][0].pop("height"), "gt.json: images[0] needs an integer 'height', got None"),
    (lambda gt: gt["images"].append(dict(gt["images"][0])), "gt.json: images[1]: duplicate image id 7"),
    (lambda gt: gt["categories"].append("thing"), "gt.json: categories[1] must be an object, got str"),
])
def test_malformed_ground_truth_is_refused_by_entry(tmp_path, edit, message):
    gt = _gt_dict()
    edit(gt)
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(gt))
    with pytest.raises(ValueError, match=re.escape(message)):
        score_coco_results(gt_file, _results(_gt_masks(), [0.9, 0.8]))


def test_score_results_oracle_gt_id_and_best_iou():
    masks = _gt_masks()
    oracle = _results(masks, [0.9, 0.8], gt_ids=[10, 11])
    scored = score_coco_results(_gt_dict(), oracle)
    assert scored.matching == "gt_id"
    assert scored.scores["miou"] == 1.0 and scored.scores["instances"] == 2
    # Without gt_id, in reversed order: paired by best IoU, still perfect.
    scored = score_coco_results(_gt_dict(), _results(masks[::-1].copy(), [0.8, 0.9]))
    assert scored.matching == "best_iou"
    assert scored.scores["miou"] == 1.0


def test_score_results_partial_and_unpaired():
    masks = _gt_masks()
    # Instance 10 found exactly; a stray 4-pixel result overlaps nothing: 4 FP pixels, and
    # instance 11 (12 pixels) is missed: tp 8, fp 4, fn 12 -> IoU 8/24.
    stray = np.zeros((1, 8, 8), dtype=bool)
    stray[0, 3:5, 0:2] = True
    results = _results(np.concatenate([masks[:1], stray]), [0.9, 0.5])
    scored = score_coco_results(_gt_dict(), results)
    row = scored.per_image[0]
    assert (row["tp"], row["fp"], row["fn"]) == (8, 4, 12)
    assert scored.scores["miou"] == pytest.approx(8 / 24)
    # instance means: instance 10 IoU 1, instance 11 IoU 0, the stray result an instance of IoU 0
    assert row["iou_instances"] == pytest.approx(1 / 3)
    assert scored.scores["miou_instances"] == pytest.approx(1 / 3)
    # an empty result pairs with nothing and adds nothing: not an instance (an empty one would score 1)
    scored = score_coco_results(_gt_dict(), _results(np.concatenate([masks[:1], np.zeros_like(stray)]), [0.9, 0.5]))
    assert scored.scores["miou"] == pytest.approx(8 / 20)
    assert scored.scores["miou_instances"] == pytest.approx(1 / 2)
    # The same with gt_id: only instance 10 predicted, no stray -> tp 8 fp 0 fn 12.
    scored = score_coco_results(_gt_dict(), _results(masks[:1], [0.9], gt_ids=[10]))
    assert scored.scores["miou"] == pytest.approx(8 / 20)


def test_score_results_bad_pairing_raises():
    masks = _gt_masks()
    mixed = _results(masks, [0.9, 0.8], gt_ids=[10, 11])
    del mixed[1]["gt_id"]
    with pytest.raises(ValueError, match="either all or none"):
        score_coco_results(_gt_dict(), mixed)
    twice = _results(masks, [0.9, 0.8], gt_ids=[10, 10])
    with pytest.raises(ValueError, match="both name gt_id 10"):
        score_coco_results(_gt_dict(), twice)
    unknown = _results(masks[:1], [0.9], gt_ids=[55])
    with pytest.raises(ValueError, match="gt_id 55 is not an annotation id"):
        score_coco_results(_gt_dict(), unknown)


@pytest.mark.parametrize("height,width", [(1, 1), (37, 53), (4096, 4096), (4097, 4097)])
def test_instance_counts_are_exact(height, width):
    """Exact int64 counts, also for a full mask of 2^24 pixels and beyond (a float16 or float32
    accumulation would lose counts there)."""
    generator = torch.Generator().manual_seed(height)
    k = 3 if height * width < 10 ** 6 else 1
    pred = torch.rand(1, k, height, width, generator=generator) > 0.3
    gt = torch.rand(1, k, height, width, generator=generator) > 0.6
    if height == 4096:
        pred[0, 0] = True  # 2^24 foreground pixels
    expected = torch.stack([(pred & gt).flatten(2).sum(2), (pred & ~gt).flatten(2).sum(2),
                            (~pred & gt).flatten(2).sum(2)], dim=2)
    got = instance_counts(pred, gt)
    assert got.dtype == torch.int64 and torch.equal(got, expected)

import numpy as np
import torch

from resam_dist.resam.prompts import masks_to_boxes, sample_points


def test_points_inside_and_outside():
    mask = np.zeros((20, 30), bool)
    mask[5:9, 10:17] = True
    rng = np.random.default_rng(0)
    pos, neg = sample_points(mask, 3, rng)
    assert pos.shape == (3, 2) and neg.shape == (3, 2)
    for x, y in pos:
        assert mask[int(y), int(x)]
    for x, y in neg:
        assert not mask[int(y), int(x)]
    again = sample_points(mask, 3, np.random.default_rng(0))
    assert np.array_equal(again[0], pos) and np.array_equal(again[1], neg)


def test_single_pixel_mask_with_replacement():
    mask = np.zeros((4, 4), bool)
    mask[2, 1] = True
    pos, _ = sample_points(mask, 3, np.random.default_rng(1))
    assert np.allclose(pos, [[1.5, 2.5]] * 3)


def test_boxes_exclusive_and_empty():
    masks = torch.zeros(2, 3, 10, 12, dtype=torch.bool)
    masks[0, 0, 2, 3] = True
    masks[0, 1, 4:7, 1:11] = True
    boxes = masks_to_boxes(masks)
    assert boxes.shape == (2, 3, 4)
    assert boxes[0, 0].tolist() == [3, 2, 4, 3]
    assert boxes[0, 1].tolist() == [1, 4, 11, 7]
    assert boxes[1].abs().sum() == 0 and boxes[0, 2].abs().sum() == 0

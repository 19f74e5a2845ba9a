"""Reinforce losses on hand-built cases: focal, dice, IoU-MSE, box embeddings, SSA wrapper."""

import math

import pytest
import torch

from resam_dist.data.batch import valid_from_counts
from resam_dist.resam.losses import box_embeddings, dice_loss, focal_loss, iou_mse_loss, ssa_loss
from resam_kernels.mask_loss import mask_iou


def square(size: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_focal_loss_hand_values_and_instance_mean():
    # instance 0: logits 0 (p = 0.5), target all 1 -> alpha (1 - 0.5)^2 ln 2 per pixel
    # instance 1: logits 0, target half 1 / half 0 -> mean of 0.25 * 0.25 ln2 and 0.75 * 0.25 ln2
    # instance 2: padding with a huge wrong logit, must not count
    logits = torch.zeros(1, 3, 4, 4)
    logits[0, 2] = -50.0
    target = torch.zeros(1, 3, 4, 4, dtype=torch.bool)
    target[0, 0] = True
    target[0, 1, :2] = True
    target[0, 2] = True
    valid = valid_from_counts(torch.tensor([2]), 3)
    first = 0.25 * 0.25 * math.log(2.0)
    second = 0.5 * (0.25 * 0.25 + 0.75 * 0.25) * math.log(2.0)
    loss = focal_loss(logits, target, valid)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.5 * (first + second), rel=1e-6)


def test_focal_loss_matches_torchvision_per_instance():
    from torchvision.ops import sigmoid_focal_loss

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 5, generator=generator) * 3
    target = torch.rand(2, 3, 5, 5, generator=generator) > 0.5
    valid = torch.tensor([[True, False, True], [True, True, False]])
    expected = torch.stack([sigmoid_focal_loss(logits[b, k], target[b, k].float(), reduction="mean")
                            for b, k in valid.nonzero().tolist()]).mean()
    assert focal_loss(logits.bfloat16().float(), target, valid).item() == pytest.approx(
        focal_loss(logits.bfloat16(), target, valid).item(), rel=1e-6)
    assert focal_loss(logits, target, valid).item() == pytest.approx(expected.item(), rel=1e-5)


def test_dice_loss_hand_values():
    target = square(4, 0, 2, 0, 2).view(1, 1, 4, 4)  # 4 pixels
    perfect = torch.where(target, 30.0, -30.0)
    assert dice_loss(perfect, target, torch.ones(1, 1, dtype=torch.bool)).item() == pytest.approx(0.0, abs=1e-6)
    nothing = torch.full((1, 1, 4, 4), -30.0)
    # 1 - (0 + 1) / (0 + 4 + 1)
    assert dice_loss(nothing, target, torch.ones(1, 1, dtype=torch.bool)).item() == pytest.approx(0.8, abs=1e-6)
    # logits 0: p = 0.5 everywhere; |P| = 8, |P.T| = 2 -> 1 - 5 / 13
    half = torch.zeros(1, 1, 4, 4)
    assert dice_loss(half, target, torch.ones(1, 1, dtype=torch.bool)).item() == pytest.approx(1 - 5 / 13, rel=1e-6)


def test_iou_mse_hand_value_and_gradient_only_to_predicted_iou():
    predicted_mask = square(4, 0, 2, 0, 2)
    target = square(4, 0, 2, 0, 4)  # contains the prediction: IoU 4 / 8
    logits = torch.where(predicted_mask, 5.0, -5.0).view(1, 1, 4, 4).requires_grad_(True)
    pred_iou = torch.tensor([[0.7]], requires_grad=True)
    loss = iou_mse_loss(pred_iou, logits, target.view(1, 1, 4, 4), torch.ones(1, 1, dtype=torch.bool))
    assert loss.item() == pytest.approx((0.7 - 0.5) ** 2, rel=1e-6)
    loss.backward()
    assert pred_iou.grad.item() == pytest.approx(2 * (0.7 - 0.5), rel=1e-6)
    assert logits.grad is None


def test_mask_iou_empty_pair_is_one():
    empty = torch.zeros(1, 3, 3, dtype=torch.bool)
    assert mask_iou(empty, empty).tolist() == [1.0]
    assert mask_iou(empty, square(3, 0, 1, 0, 1).view(1, 3, 3)).tolist() == [0.0]


def test_all_invalid_batch_gives_connected_zero():
    logits = torch.randn(2, 2, 4, 4, requires_grad=True)
    pred_iou = torch.rand(2, 2, requires_grad=True)
    target = torch.ones(2, 2, 4, 4, dtype=torch.bool)
    none_valid = torch.zeros(2, 2, dtype=torch.bool)
    total = (focal_loss(logits, target, none_valid) + dice_loss(logits, target, none_valid)
             + iou_mse_loss(pred_iou, logits, target, none_valid))
    assert total.item() == 0.0 and total.requires_grad
    total.backward()
    assert torch.count_nonzero(logits.grad) == 0 and torch.count_nonzero(pred_iou.grad) == 0


def test_box_embeddings_hand_built_feature_map():
    # 4 x 4 cells of stride 4 (16 x 16 input): channel 0 holds the column index, channel 1 the row
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    features = torch.stack([cols, rows]).unsqueeze(0)  # 1 x 2 x 4 x 4
    boxes = torch.tensor([[
        [0.0, 0.0, 8.0, 8.0],    # cells with centres 2, 6 on both axes -> cols 0-1, rows 0-1
        [5.0, 9.0, 6.0, 10.0],   # smaller than a cell: the cell containing (5.5, 9.5) -> col 1, row 2
        [0.0, 0.0, 16.0, 4.0],   # the whole first row of cells
        [9.0, 0.0, 10.0, 16.0],  # one pixel wide, full height: column 2 over all rows
        [0.0, 0.0, 0.0, 0.0],    # empty box: the cell at its centre (0, 0)
    ]])
    embeddings = box_embeddings(features, boxes, stride=4)
    expected = torch.tensor([[[0.5, 0.5], [1.0, 2.0], [1.5, 0.0], [2.0, 1.5], [0.0, 0.0]]])
    assert embeddings.shape == (1, 5, 2)
    assert torch.allclose(embeddings, expected)


def test_box_embeddings_equal_slice_means():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 8, 6, 6, generator=generator).bfloat16()
    # boxes aligned to cell edges: cell ranges [r0, r1) x [c0, c1)
    cells = torch.tensor([[[0, 0, 6, 6], [1, 2, 3, 5]], [[4, 1, 6, 2], [0, 5, 1, 6]]])  # c0, r0, c1, r1
    embeddings = box_embeddings(features, cells.float() * 16, stride=16)
    assert embeddings.dtype == torch.float32
    for b in range(2):
        for k in range(2):
            c0, r0, c1, r1 = cells[b, k].tolist()
            expected = features[b, :, r0:r1, c0:c1].float().mean(dim=(1, 2))
            assert torch.allclose(embeddings[b, k], expected, atol=1e-5)


def test_ssa_wrapper_uses_valid_instances_only_and_sends_gradient():
    from resam_kernels.ssa import ssa_loss_reference

    generator = torch.Generator().manual_seed(2)
    student = torch.randn(2, 3, 8, generator=generator, requires_grad=True)
    weak = torch.randn(2, 3, 8, generator=generator)
    queue = torch.randn(5, 8, generator=generator)
    valid = torch.tensor([[True, False, True], [False, True, False]])
    for use_kernels in (False, True):
        student.grad = None
        loss = ssa_loss(student, weak, valid, queue, tau=0.07, use_kernels=use_kernels)
        expected = ssa_loss_reference(student[valid].detach(), weak[valid], queue, 0.07)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        loss.backward()
        row_norms = student.grad.norm(dim=-1)  # B x K
        assert bool((row_norms[valid] > 0).all()) and bool((row_norms[~valid] == 0).all())
    nothing = ssa_loss(student, weak, torch.zeros(2, 3, dtype=torch.bool), queue, tau=0.07, use_kernels=False)
    assert nothing.item() == 0.0 and nothing.requires_grad

"""Refine (entropy filter + overlap suppression) and the pseudo-labels of Requery on hand-built cases."""

import pytest
import torch

from resam_dist.resam.losses import dice_loss, focal_loss
from resam_dist.resam.refine import refine
from resam_dist.resam.requery import apply_empty_policy, pseudo_labels

SIZE = 8


def square(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


FIRST = square(0, 4, 0, 4)
SECOND = square(2, 6, 2, 6)  # shares rows 2-3, cols 2-3 with FIRST


def overlapping_logits(first_logit: float, second_logit: float) -> torch.Tensor:
    """1 x 3 x 8 x 8: two overlapping squares, then a padding slot that would claim every pixel."""
    logits = torch.full((1, 3, SIZE, SIZE), -10.0)
    logits[0, 0][FIRST] = first_logit
    logits[0, 1][SECOND] = second_logit
    logits[0, 2] = 10.0
    return logits


@pytest.mark.parametrize("use_kernels", [False, True])
def test_drop_removes_exactly_the_shared_pixels(use_kernels):
    result = refine(overlapping_logits(10.0, 10.0), torch.tensor([2]), eps=0.5, mode="drop",
                    use_kernels=use_kernels)
    assert torch.equal(result.masks[0, 0], FIRST & ~SECOND)
    assert torch.equal(result.masks[0, 1], SECOND & ~FIRST)
    assert not result.masks[0, 2].any()  # padding is excluded and does not suppress anything
    assert result.boxes[0].tolist() == [[0, 0, 4, 4], [2, 2, 6, 6], [0, 0, 0, 0]]
    assert result.empty.tolist() == [[False, False, False]]


@pytest.mark.parametrize("use_kernels", [False, True])
def test_argmax_gives_the_shared_pixels_to_the_more_confident(use_kernels):
    # logit 12 is more confident than logit 8 (both far above eps)
    result = refine(overlapping_logits(8.0, 12.0), torch.tensor([2]), eps=0.5, mode="argmax",
                    use_kernels=use_kernels)
    assert torch.equal(result.masks[0, 0], FIRST & ~SECOND)
    assert torch.equal(result.masks[0, 1], SECOND)
    swapped = refine(overlapping_logits(12.0, 8.0), torch.tensor([2]), eps=0.5, mode="argmax",
                     use_kernels=use_kernels)
    assert torch.equal(swapped.masks[0, 0], FIRST)
    assert torch.equal(swapped.masks[0, 1], SECOND & ~FIRST)


@pytest.mark.parametrize("use_kernels", [False, True])
def test_entropy_filter_thresholds_and_empty_flags(use_kernels):
    # confidence p (1 - H): logit 3 -> 0.69, logit 1 -> 0.12, logit 0 -> 0
    logits = torch.full((2, 2, SIZE, SIZE), -10.0)
    logits[0, 0][FIRST] = 3.0
    logits[0, 0][SECOND & ~FIRST] = 1.0
    logits[0, 1][SECOND] = 0.0   # uncertain everywhere: empty after the filter
    logits[1, 0][FIRST] = 3.0
    logits[1, 1] = 10.0          # padding (counts[1] = 1)
    counts = torch.tensor([2, 1])
    strict = refine(logits, counts, eps=0.5, mode="drop", use_kernels=use_kernels)
    assert torch.equal(strict.masks[0, 0], FIRST)
    assert strict.empty.tolist() == [[False, True], [False, False]]
    lenient = refine(logits, counts, eps=0.1, mode="drop", use_kernels=use_kernels)
    assert torch.equal(lenient.masks[0, 0], FIRST | SECOND)
    assert lenient.boxes[0, 0].tolist() == [0, 0, 6, 6]


def test_refine_rejects_unknown_mode():
    with pytest.raises(ValueError, match="overlap_mode"):
        refine(overlapping_logits(1.0, 1.0), torch.tensor([2]), eps=0.5, mode="vote", use_kernels=False)


def three_instances():
    """Point masks, requery logits and refined-empty flags of 3 real instances + 1 padding slot;
    the middle instance's refined mask is empty."""
    point_masks = torch.stack([square(0, 2, 0, 2), square(0, 3, 4, 8), square(5, 8, 0, 8), square(0, 8, 0, 8)])
    requery_masks = torch.stack([square(0, 3, 0, 3), square(0, 4, 4, 8), square(6, 8, 0, 8), square(0, 8, 0, 8)])
    requery_logits = torch.where(requery_masks, 6.0, -6.0).unsqueeze(0)  # 1 x 4 x 8 x 8
    refined_empty = torch.tensor([[False, True, False, False]])
    return point_masks.unsqueeze(0), requery_logits, refined_empty, torch.tensor([3])


def test_pseudo_labels_drop_keeps_instance_order():
    point_masks, requery_logits, refined_empty, counts = three_instances()
    pseudo, valid = pseudo_labels(point_masks, requery_logits, refined_empty, counts, empty_policy="drop")
    assert valid.tolist() == [[True, False, True, False]]
    assert torch.equal(pseudo[0, 0], requery_logits[0, 0] > 0)
    assert torch.equal(pseudo[0, 2], requery_logits[0, 2] > 0)  # still at index 2, not moved to 1
    assert not pseudo[0, 1].any() and not pseudo[0, 3].any()
    # the student reproducing every requery mask at its own index has (near) zero loss; a
    # compaction bug (targets [0, 2] paired with student masks [0, 1]) would not
    student_logits = requery_logits * 3
    assert dice_loss(student_logits, pseudo, valid).item() < 1e-3
    assert focal_loss(student_logits, pseudo, valid).item() < 1e-6
    compacted = torch.zeros_like(pseudo)
    compacted[0, :2] = pseudo[0, valid[0]]
    assert dice_loss(student_logits, compacted, torch.tensor([[True, True, False, False]])).item() > 0.2


def test_pseudo_labels_keep_point_mask():
    point_masks, requery_logits, refined_empty, counts = three_instances()
    pseudo, valid = pseudo_labels(point_masks, requery_logits, refined_empty, counts,
                                  empty_policy="keep_point_mask")
    assert valid.tolist() == [[True, True, True, False]]
    assert torch.equal(pseudo[0, 1], point_masks[0, 1])
    assert torch.equal(pseudo[0, 2], requery_logits[0, 2] > 0)
    with pytest.raises(ValueError, match="empty_policy"):
        apply_empty_policy(pseudo, point_masks, refined_empty, counts, empty_policy="skip")

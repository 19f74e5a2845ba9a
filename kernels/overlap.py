"""Refine, step 2: overlap suppression between the K instance masks of an image, plus their boxes.

Specification, per image b and pixel, over the valid instances k < counts[b]
(instances k >= counts[b] are padding: ignored, and their output mask is empty):
- mode "drop":   a pixel kept by more than one instance is removed from all of them (paper);
- mode "argmax": it stays only with the kept instance of highest confidence (ties -> lowest k).
Then the tight box (x0, y0, x1, y1) of every resulting mask, x1/y1 exclusive, (0, 0, 0, 0) when
empty: the same as `resam_dist.resam.prompts.masks_to_boxes`.

`suppress_overlap_reference` is the specification in torch. `suppress_overlap_triton` does it in
one kernel launch per call (grid: pixel blocks x images): a first loop over k counts (or finds
the most confident) kept instances per pixel, a second loop writes the suppressed masks and
folds each block's per-instance box into the B x K x 4 result with atomic min/max. The int32
boxes are turned into float32 (empty -> zeros) by a few elementwise torch ops: no host loop and
no device synchronisation. Counts larger than K mean all K instances are valid.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

MODES = ("drop", "argmax")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"overlap suppression mode must be one of {MODES}, got {mode!r}")


def tight_boxes_reference(masks: torch.Tensor) -> torch.Tensor:
    """masks: B x K x H x W bool -> B x K x 4 float32 (x0, y0, x1, y1), x1/y1 exclusive, empty -> 0."""
    height, width = masks.shape[-2:]
    any_row = masks.any(dim=-1)  # B x K x H
    any_col = masks.any(dim=-2)  # B x K x W
    rows = torch.arange(height, device=masks.device)
    cols = torch.arange(width, device=masks.device)
    big = max(height, width) + 1
    y0 = torch.where(any_row, rows, big).amin(dim=-1)  # B x K
    y1 = torch.where(any_row, rows + 1, 0).amax(dim=-1)
    x0 = torch.where(any_col, cols, big).amin(dim=-1)
    x1 = torch.where(any_col, cols + 1, 0).amax(dim=-1)
    boxes = torch.stack([x0, y0, x1, y1], dim=-1).to(torch.float32)  # B x K x 4
    empty = ~any_row.any(dim=-1)  # B x K
    return torch.where(empty.unsqueeze(-1), torch.zeros_like(boxes), boxes)


def suppress_overlap_reference(masks: torch.Tensor, confidence: torch.Tensor | None,
                               counts: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """masks B x K x H x W bool, confidence B x K x H x W float (only read in "argmax" mode; must
    not hold NaN), counts B int -> (masks B x K x H x W bool, boxes B x K x 4 float32)."""
    check_mode(mode)
    batch, num_instances = masks.shape[:2]
    instance_ids = torch.arange(num_instances, device=masks.device)  # K
    valid = instance_ids.unsqueeze(0) < counts.to(masks.device).unsqueeze(1)  # B x K
    kept = masks.bool() & valid[:, :, None, None]  # B x K x H x W
    if num_instances == 0:
        suppressed = kept
    elif mode == "drop":
        suppressed = kept & (kept.sum(dim=1, keepdim=True) == 1)
    else:
        scores = confidence.float().masked_fill(~kept, float("-inf"))  # B x K x H x W
        # torch.argmax returns the first maximal index: ties go to the lowest k.
        winner = scores.argmax(dim=1, keepdim=True)  # B x 1 x H x W
        suppressed = kept & (instance_ids[None, :, None, None] == winner)
    return suppressed, tight_boxes_reference(suppressed)


@triton.jit
def _suppress_overlap_kernel(masks_ptr, confidence_ptr, counts_ptr, out_ptr, boxes_ptr,
                             num_instances, height, width,
                             ARGMAX: tl.constexpr, BLOCK: tl.constexpr):
    # masks/out: B x K x H x W uint8, confidence: B x K x H x W float, boxes: B x K x 4 int32.
    block_id = tl.program_id(0)
    image = tl.program_id(1).to(tl.int64)
    num_pixels = height * width
    pixel = block_id * BLOCK + tl.arange(0, BLOCK)  # BLOCK
    in_range = pixel < num_pixels
    count = tl.minimum(tl.load(counts_ptr + image).to(tl.int32), num_instances)
    image_offset = image * num_instances * num_pixels  # int64: first pixel of instance 0

    # Pass 1 over the valid instances: how many keep each pixel / which one is most confident.
    # Pointers step by one instance plane per iteration (64-bit, so K x H x W may exceed 2^31).
    mask_ptrs = masks_ptr + image_offset + pixel  # BLOCK
    confidence_ptrs = confidence_ptr + image_offset + pixel
    kept_by = tl.zeros([BLOCK], dtype=tl.int32)
    best_score = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_instance = tl.full([BLOCK], -1, dtype=tl.int32)
    for k in range(0, count):
        kept = tl.load(mask_ptrs, mask=in_range, other=0) != 0
        if ARGMAX:
            score = tl.load(confidence_ptrs, mask=in_range, other=0.0).to(tl.float32)
            better = kept & ((score > best_score) | (best_instance < 0))  # strict: ties keep lower k
            best_score = tl.where(better, score, best_score)
            best_instance = tl.where(better, k, best_instance)
            confidence_ptrs += num_pixels
        else:
            kept_by += kept.to(tl.int32)
        mask_ptrs += num_pixels

    # Pass 2 over all instances: write the suppressed masks and this block's share of the boxes.
    row = pixel // width
    col = pixel - row * width
    mask_ptrs = masks_ptr + image_offset + pixel
    out_ptrs = out_ptr + image_offset + pixel
    box_ptr = boxes_ptr + image * num_instances * 4  # instance 0 of this image
    for k in range(0, num_instances):
        kept = tl.load(mask_ptrs, mask=in_range & (k < count), other=0) != 0
        if ARGMAX:
            survives = kept & (best_instance == k)
        else:
            survives = kept & (kept_by == 1)
        tl.store(out_ptrs, survives.to(tl.uint8), mask=in_range)
        if tl.max(survives.to(tl.int32), axis=0) > 0:
            tl.atomic_min(box_ptr + 0, tl.min(tl.where(survives, col, num_pixels), axis=0))
            tl.atomic_min(box_ptr + 1, tl.min(tl.where(survives, row, num_pixels), axis=0))
            tl.atomic_max(box_ptr + 2, tl.max(tl.where(survives, col + 1, 0), axis=0))
            tl.atomic_max(box_ptr + 3, tl.max(tl.where(survives, row + 1, 0), axis=0))
        mask_ptrs += num_pixels
        out_ptrs += num_pixels
        box_ptr += 4


_BLOCK = 1 << 16 if INTERPRET else 2048


def suppress_overlap_triton(masks: torch.Tensor, confidence: torch.Tensor | None,
                            counts: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `suppress_overlap_reference` (same outputs)."""
    check_mode(mode)
    batch, num_instances, height, width = masks.shape
    masks_u8 = masks.contiguous().view(torch.uint8)  # B x K x H x W
    argmax = mode == "argmax"
    if argmax:
        if confidence is None or confidence.shape != masks.shape:
            raise ValueError("argmax overlap suppression needs a confidence tensor shaped like masks "
                             f"{tuple(masks.shape)}, got "
                             f"{None if confidence is None else tuple(confidence.shape)}")
        confidence = confidence.contiguous()
    else:
        confidence = masks_u8  # not read in "drop" mode
    counts = counts.to(device=masks.device, dtype=torch.int64).contiguous()
    out = torch.empty_like(masks_u8)
    # Boxes as int32 (x0, y0, x1, y1): mins start above any pixel index, maxes at 0 (= empty).
    boxes = torch.zeros((batch, num_instances, 4), dtype=torch.int32, device=masks.device)
    boxes[:, :, :2] = height * width
    num_pixels = height * width
    if out.numel() > 0:
        grid = (triton.cdiv(num_pixels, _BLOCK), batch)
        _suppress_overlap_kernel[grid](masks_u8, confidence, counts, out, boxes,
                                       num_instances, height, width,
                                       ARGMAX=argmax, BLOCK=_BLOCK, num_warps=8)
    empty = boxes[:, :, 2:3] == 0  # B x K x 1
    boxes = torch.where(empty, torch.zeros_like(boxes), boxes).to(torch.float32)
    return out.view(torch.bool), boxes

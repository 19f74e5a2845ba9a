"""Refine, step 2: overlap suppression between the K instance masks of an image, plus their boxes.

Specification, per image b and pixel, over the valid instances k < counts[b]
(instances k >= counts[b] are padding: ignored, and their output mask is empty):
- mode "drop":   a pixel kept by more than one instance is removed from all of them (paper);
- mode "argmax": it stays only with the kept instance of highest confidence (ties -> lowest k).
Then the tight box (x0, y0, x1, y1) of every resulting mask, x1/y1 exclusive, (0, 0, 0, 0) when
empty: the same as `resam_dist.resam.prompts.masks_to_boxes`.

`suppress_overlap_reference` is the specification in torch. `suppress_overlap_triton` does it in
one kernel launch per call and one pass over the data (grid: pixel spans x images): a program
loads the K masks (and, in "argmax" mode, confidences) of a block of pixels as one
KP x BLOCK_P tile (KP = next power of two >= K), counts / picks the most confident kept
instance over the instance axis, writes the suppressed tile once, and reduces each instance's box
over the pixel axis; after its pixel blocks it folds the boxes into the B x K x 4 int32 result
with one masked vector atomic min/max per coordinate. The int32 boxes are turned into float32
(empty -> zeros) by a few elementwise torch ops: no host loop and no device synchronisation.
Counts larger than K mean all K instances are valid. Above MAX_INSTANCES instances the tile
would not fit in registers and the torch reference runs instead.

Mode "drop" with rows of a multiple of 4 pixels and K <= 64 (the usual case) runs
`_suppress_drop_words_kernel` instead: the same one-pass tile, but over int32 words of 4 pixels
(the per-pixel count is a byte lane of one int32 sum), so every operation handles 4 pixels. The
byte kernel spent about as many instructions per pixel as the SM can issue for the bandwidth
(16.7% of copy bandwidth at 2x50x1024x1024 on the H200); the word kernel needs about a quarter.
On CUDA both kernels' tile sizes and warps are autotuned (one pixel block per program).
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
    """masks: ... x H x W bool -> ... x 4 float32 (x0, y0, x1, y1), x1/y1 exclusive, empty -> 0."""
    height, width = masks.shape[-2:]
    any_row = masks.any(dim=-1)  # ... x H
    any_col = masks.any(dim=-2)  # ... x W
    rows = torch.arange(height, device=masks.device)
    cols = torch.arange(width, device=masks.device)
    big = max(height, width) + 1
    y0 = torch.where(any_row, rows, big).amin(dim=-1)  # ...
    y1 = torch.where(any_row, rows + 1, 0).amax(dim=-1)
    x0 = torch.where(any_col, cols, big).amin(dim=-1)
    x1 = torch.where(any_col, cols + 1, 0).amax(dim=-1)
    boxes = torch.stack([x0, y0, x1, y1], dim=-1).to(torch.float32)  # ... x 4
    empty = ~any_row.any(dim=-1)  # ...
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
def _fold_boxes(boxes_ptr, image, num_instances, instance, real, x0, y0, x1, y1):
    """Folds a program's boxes (KP each, x1 = 0: no surviving pixel) into boxes B x K x 4 int32:
    one vector atomic per coordinate, only for instances with a surviving pixel here (min/max
    are idempotent and order-free: the result does not depend on program order)."""
    touched = real & (x1 > 0)
    box_ptrs = boxes_ptr + (image * num_instances + instance) * 4  # KP
    tl.atomic_min(box_ptrs + 0, x0, mask=touched, sem="relaxed")
    tl.atomic_min(box_ptrs + 1, y0, mask=touched, sem="relaxed")
    tl.atomic_max(box_ptrs + 2, x1, mask=touched, sem="relaxed")
    tl.atomic_max(box_ptrs + 3, y1, mask=touched, sem="relaxed")


@triton.jit
def _suppress_overlap_kernel(masks_ptr, confidence_ptr, counts_ptr, out_ptr, boxes_ptr,
                             num_instances, width, num_pixels, blocks_per_program, pixels_bucket,
                             ARGMAX: tl.constexpr, KP: tl.constexpr, BLOCK_P: tl.constexpr):
    # masks/out: B x K x H x W uint8, confidence: B x K x H x W float, counts: B int64,
    # boxes: B x K x 4 int32 (x0, y0, x1, y1). One program: image program_id(1), pixels
    # [first, first + blocks_per_program * BLOCK_P), all K instances at once as a KP x BLOCK_P
    # tile (KP = next power of two >= K): masks (and confidences) read once, output written once.
    # pixels_bucket (log2 of pixels per image, rounded up) is only an autotuning key.
    image = tl.program_id(1).to(tl.int64)
    first = tl.program_id(0) * blocks_per_program * BLOCK_P
    count = tl.minimum(tl.load(counts_ptr + image), num_instances).to(tl.int32)
    instance = tl.arange(0, KP)  # KP
    valid = instance < count  # instances k >= count are padding: not read, written empty
    real = instance < num_instances
    # 64-bit offset of each instance plane of this image (B x K x H x W may exceed 2^31)
    plane = image * num_instances * num_pixels + instance.to(tl.int64) * num_pixels  # KP
    big = 1 << 30  # above any pixel coordinate
    x0 = tl.full([KP], big, dtype=tl.int32)
    y0 = tl.full([KP], big, dtype=tl.int32)
    x1 = tl.zeros([KP], dtype=tl.int32)  # 0: no surviving pixel yet
    y1 = tl.zeros([KP], dtype=tl.int32)
    for block in range(0, blocks_per_program):
        pixel = first + block * BLOCK_P + tl.arange(0, BLOCK_P)  # BLOCK_P
        in_range = pixel < num_pixels
        offsets = plane[:, None] + pixel[None, :]  # KP x BLOCK_P int64
        read = valid[:, None] & in_range[None, :]
        kept = tl.load(masks_ptr + offsets, mask=read, other=0) != 0  # KP x BLOCK_P
        if ARGMAX:
            score = tl.load(confidence_ptr + offsets, mask=read, other=0.0).to(tl.float32)
            score = tl.where(kept, score, float("-inf"))
            # first maximal index, as torch.argmax: ties go to the lowest k
            winner = tl.argmax(score, axis=0, tie_break_left=True)  # BLOCK_P
            survives = kept & (instance[:, None] == winner[None, :])
        else:
            kept_by = tl.sum(kept.to(tl.int32), axis=0)  # BLOCK_P
            survives = kept & (kept_by == 1)[None, :]
        tl.store(out_ptr + offsets, survives.to(tl.uint8), mask=real[:, None] & in_range[None, :])
        # this block's box of every instance (x1/y1 exclusive), folded into the running one
        row = pixel // width  # BLOCK_P
        col = pixel - row * width
        x0 = tl.minimum(x0, tl.min(tl.where(survives, col[None, :], big), axis=1))
        y0 = tl.minimum(y0, tl.min(tl.where(survives, row[None, :], big), axis=1))
        x1 = tl.maximum(x1, tl.max(tl.where(survives, col[None, :] + 1, 0), axis=1))
        y1 = tl.maximum(y1, tl.max(tl.where(survives, row[None, :] + 1, 0), axis=1))
    _fold_boxes(boxes_ptr, image, num_instances, instance, real, x0, y0, x1, y1)


@triton.jit
def _suppress_drop_words_kernel(words_ptr, counts_ptr, out_ptr, boxes_ptr, num_instances,
                                words_per_row, num_words, words_bucket,
                                KP: tl.constexpr, TILE: tl.constexpr):
    # "drop" mode on 32-bit words of 4 pixels (width % 4 == 0, so a word never straddles two
    # rows). words/out: B x K x (H W / 4) int32, each byte one pixel (0 = not kept),
    # counts: B int64, boxes: B x K x 4 int32. words_bucket is only an autotuning key.
    # One program: image program_id(1), BLOCK_W words of all KP instances as one KP x BLOCK_W
    # tile; the per-pixel counts are byte lanes of one int32 sum over the instance axis
    # (K < 256: no carry between lanes), so every operation handles 4 pixels at once.
    BLOCK_W: tl.constexpr = TILE // KP
    image = tl.program_id(1).to(tl.int64)
    word = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)  # BLOCK_W
    in_range = word < num_words
    count = tl.minimum(tl.load(counts_ptr + image), num_instances).to(tl.int32)
    instance = tl.arange(0, KP)  # KP
    valid = instance < count  # instances k >= count are padding: not read, written empty
    real = instance < num_instances
    # 64-bit offset of each instance plane of this image (B x K x H x W may exceed 2^31)
    plane = image * num_instances * num_words + instance.to(tl.int64) * num_words  # KP
    offsets = plane[:, None] + word[None, :]  # KP x BLOCK_W int64
    raw = tl.load(words_ptr + offsets, mask=valid[:, None] & in_range[None, :], other=0)
    # every non-zero byte -> 0x01: the low 7 bits of a byte plus 0x7F carry into its bit 7
    # exactly when they are non-zero (no carry leaves the byte), then or-ed with bit 7 itself
    kept = ((((raw & 0x7F7F7F7F) + 0x7F7F7F7F) | raw) >> 7) & 0x01010101  # KP x BLOCK_W
    kept_by = tl.sum(kept, axis=0)  # BLOCK_W, one count (< 256) per byte lane
    # byte lanes equal to 1 -> 0x01, the others -> 0 (same zero-byte test on kept_by ^ 0x01)
    other = kept_by ^ 0x01010101
    single = (~((((other & 0x7F7F7F7F) + 0x7F7F7F7F) | other) >> 7)) & 0x01010101  # BLOCK_W
    survives = kept & single[None, :]  # KP x BLOCK_W
    tl.store(out_ptr + offsets, survives, mask=real[:, None] & in_range[None, :])
    # box of every instance over this program's words (x1/y1 exclusive): the first and last
    # surviving byte of a word give its columns (byte 0 is the leftmost pixel)
    low_half = (survives & 0xFFFF) != 0
    first = tl.where(low_half, tl.where((survives & 0xFF) != 0, 0, 1),
                     tl.where((survives & 0xFF0000) != 0, 2, 3))
    high_half = (survives >> 16) != 0
    last = tl.where(high_half, tl.where((survives >> 24) != 0, 3, 2),
                    tl.where((survives & 0xFF00) != 0, 1, 0))
    row = word // words_per_row  # BLOCK_W
    col = (word - row * words_per_row) * 4  # column of the word's byte 0
    hit = survives != 0
    big = 1 << 30  # above any pixel coordinate
    x0 = tl.min(tl.where(hit, col[None, :] + first, big), axis=1)  # KP
    y0 = tl.min(tl.where(hit, row[None, :], big), axis=1)
    x1 = tl.max(tl.where(hit, col[None, :] + last + 1, 0), axis=1)
    y1 = tl.max(tl.where(hit, row[None, :] + 1, 0), axis=1)
    _fold_boxes(boxes_ptr, image, num_instances, instance, real, x0, y0, x1, y1)


# Tile elements (KP x BLOCK_P) per loop step: masks only in "drop" mode, masks + confidences in
# "argmax" mode. Every element of the tile stays live across the reduction over instances, so the
# tile sets the registers: sm_90 ptxas (triton 3.8, K = 50, 8 warps) gives 64 registers per thread
# for the 4096-element "drop" tile (4 programs per SM) and 116 for the 8192-element "argmax" tile
# (2 per SM), no spills. Above MAX_INSTANCES the tile would not fit in registers, and the torch
# reference runs instead.
_TILE = {"drop": 4096, "argmax": 8192}
_NUM_WARPS = 8
_MIN_BLOCK_P = 16
MAX_INSTANCES = 1024
# Enough programs to fill the GPU; beyond that, each program walks several pixel blocks so that
# fewer box atomics are issued.
_TARGET_PROGRAMS = 2048
_MAX_BLOCKS_PER_PROGRAM = 8


# "drop" mode on words of 4 pixels: KP x BLOCK_W tiles of TILE words (BLOCK_W = TILE / KP).
# On the GPU the tile and warps are tuned on first use per (KP, log2 of words per image); every
# config writes the same outputs and min/max box atomics are idempotent, so re-running one while
# tuning is harmless. Larger tiles put more bytes in flight per program, smaller ones more programs.
_WORD_CONFIGS = [triton.Config({"TILE": tile}, num_warps=warps)
                 for tile, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8),
                                     (8192, 8))]
_suppress_drop_words_kernel_tuned = triton.autotune(
    configs=_WORD_CONFIGS, key=["KP", "words_bucket"])(_suppress_drop_words_kernel)
# The byte kernel on the GPU with KP <= 64 and one pixel block per program (mode "argmax", or
# "drop" on rows that are not a multiple of 4 pixels): BLOCK_P and warps tuned per (KP, log2 of
# pixels per image, mode); KP x BLOCK_P stays <= 8192 (116 registers at 8 warps, see above).
_BYTE_CONFIGS = [triton.Config({"BLOCK_P": block_p}, num_warps=warps)
                 for block_p, warps in ((32, 4), (32, 8), (64, 4), (64, 8), (128, 8))]
_suppress_overlap_kernel_tuned = triton.autotune(
    configs=_BYTE_CONFIGS, key=["KP", "pixels_bucket", "ARGMAX"])(_suppress_overlap_kernel)
MAX_TUNED_INSTANCES = 64
# The tuned launch walks one pixel block per program. Once the fixed launch would walk more than
# this many blocks per program, it wins: fewer programs issue fewer box atomics. Measured on an
# H200 in "argmax" mode (K = 50): 8x50x256x256, tuned 0.175 ms vs fixed (2 blocks per program)
# 0.268 ms; 2x50x1024x1024, tuned 0.634 ms vs fixed (8 blocks per program) 0.440 ms.
_MAX_TUNED_WALK = 2
MAX_WORD_INSTANCES = 64  # KP <= 64: the smallest tile above still has 16 words per row
_INTERPRET_WORD_TILE = 1 << 14


def _use_words(masks_u8: torch.Tensor, out: torch.Tensor, mode: str) -> bool:
    """Whether "drop" mode can run on 4-pixel words: rows of a multiple of 4 pixels, at most
    MAX_WORD_INSTANCES instances, and 4-byte aligned storage."""
    num_instances, width = masks_u8.shape[1], masks_u8.shape[3]
    return (mode == "drop" and width % 4 == 0 and 0 < num_instances <= MAX_WORD_INSTANCES
            and masks_u8.data_ptr() % 4 == 0 and out.data_ptr() % 4 == 0)


def suppress_overlap_triton(masks: torch.Tensor, confidence: torch.Tensor | None,
                            counts: torch.Tensor, mode: str, *,
                            blocks_per_program: int | None = None, word_tile: int | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `suppress_overlap_reference` (same outputs). `blocks_per_program`
    (pixel blocks walked by one program of the byte kernel; given: the byte kernel runs) is
    chosen from the size unless given, and `word_tile` (words per program of the 4-pixel word
    kernel, a power of two >= KP) is tuned on the GPU unless given (tests)."""
    check_mode(mode)
    batch, num_instances, height, width = masks.shape
    argmax = mode == "argmax"
    if argmax and (confidence is None or confidence.shape != masks.shape):
        raise ValueError("argmax overlap suppression needs a confidence tensor shaped like masks "
                         f"{tuple(masks.shape)}, got "
                         f"{None if confidence is None else tuple(confidence.shape)}")
    if num_instances > MAX_INSTANCES:
        return suppress_overlap_reference(masks, confidence, counts, mode)
    masks_u8 = masks.contiguous().view(torch.uint8)  # B x K x H x W
    confidence = confidence.contiguous() if argmax else masks_u8  # not read in "drop" mode
    counts = counts.to(device=masks.device, dtype=torch.int64).contiguous()
    out = torch.empty_like(masks_u8)
    # Boxes as int32 (x0, y0, x1, y1): mins start above any pixel index, maxes at 0 (= empty).
    boxes = torch.zeros((batch, num_instances, 4), dtype=torch.int32, device=masks.device)
    num_pixels = height * width
    boxes[:, :, :2] = num_pixels
    if out.numel() > 0 and blocks_per_program is None and _use_words(masks_u8, out, mode):
        kp = triton.next_power_of_2(num_instances)
        num_words = num_pixels // 4
        args = (masks_u8.view(torch.int32), counts, out.view(torch.int32), boxes, num_instances,
                width // 4, num_words, (num_words - 1).bit_length())
        if INTERPRET or word_tile is not None:
            tile = word_tile if word_tile is not None else max(kp, _INTERPRET_WORD_TILE)
            grid = (triton.cdiv(num_words, tile // kp), batch)
            _suppress_drop_words_kernel[grid](*args, KP=kp, TILE=tile, num_warps=_NUM_WARPS)
        else:
            def grid(meta):
                return (triton.cdiv(num_words, meta["TILE"] // kp), batch)
            _suppress_drop_words_kernel_tuned[grid](*args, KP=kp)
    elif out.numel() > 0:
        kp = triton.next_power_of_2(num_instances)
        pixels_bucket = (num_pixels - 1).bit_length()
        block_p = min(max(_MIN_BLOCK_P, _TILE[mode] // kp),
                      max(_MIN_BLOCK_P, triton.next_power_of_2(num_pixels)))
        num_blocks = triton.cdiv(num_pixels, block_p)
        walk = min(_MAX_BLOCKS_PER_PROGRAM, max(1, num_blocks * batch // _TARGET_PROGRAMS))
        if (not INTERPRET and blocks_per_program is None and kp <= MAX_TUNED_INSTANCES
                and walk <= _MAX_TUNED_WALK):
            def grid(meta):
                return (triton.cdiv(num_pixels, meta["BLOCK_P"]), batch)
            _suppress_overlap_kernel_tuned[grid](masks_u8, confidence, counts, out, boxes,
                                                 num_instances, width, num_pixels, 1,
                                                 pixels_bucket, ARGMAX=argmax, KP=kp)
            return out.view(torch.bool), _boxes_float(boxes)
        if blocks_per_program is None:
            blocks_per_program = walk
        grid = (triton.cdiv(num_blocks, blocks_per_program), batch)
        _suppress_overlap_kernel[grid](masks_u8, confidence, counts, out, boxes,
                                       num_instances, width, num_pixels, blocks_per_program,
                                       pixels_bucket, ARGMAX=argmax, KP=kp, BLOCK_P=block_p,
                                       num_warps=_NUM_WARPS)
    return out.view(torch.bool), _boxes_float(boxes)


def _boxes_float(boxes: torch.Tensor) -> torch.Tensor:
    """B x K x 4 int32 boxes of the kernels -> float32, empty (x1 = 0) -> zeros."""
    empty = boxes[:, :, 2:3] == 0  # B x K x 1
    return torch.where(empty, torch.zeros_like(boxes), boxes).to(torch.float32)

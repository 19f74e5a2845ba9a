"""Refine, step 2: overlap suppression between the K instance masks of an image, plus their boxes.

Specification, per image b and pixel, over the valid instances k < counts[b]
(instances k >= counts[b] are padding: ignored, and their output mask is empty):
- mode "drop":   a pixel kept by more than one instance is removed from all of them (paper);
- mode "argmax": it stays only with the kept instance of highest confidence (ties -> lowest k).
Then the tight box (x0, y0, x1, y1) of every resulting mask, x1/y1 exclusive, (0, 0, 0, 0) when
empty: the same as `resam_dist.resam.prompts.masks_to_boxes`.

`suppress_overlap_reference` is the specification in torch. `suppress_overlap_triton` does it
in one kernel launch (on the GPU once its size class is tuned; on CPU, and inside CUDA graph
capture, after a memset of its box state), in one pass over the data (grid:
pixel spans x images), with no host loop and no device synchronisation. Three designs of the
byte kernel:
- tile: a program loads the K masks (and, in "argmax" mode, confidences) of a block of pixels as
  one KP x BLOCK_P tile (KP = next power of two >= K), counts / picks the most confident kept
  instance across the tile's rows, writes the suppressed tile once, and reduces each instance's
  box over the pixel axis;
- rows: a program loops over the instances, one contiguous row of pixels each (UNROLL rows
  loaded per step as separate 1-D loads, then folded in order, so the fold stays within each
  thread), keeping per pixel only its owner (first most confident kept instance; in "drop" mode
  the last keeper and the number of keepers), then writes the output rows a few instances at a
  time with their boxes. Its registers do not grow with K;
- strip (KP <= 64): the rows design over BLOCK_P columns of STRIP_ROWS image rows, with boxes
  from each pixel's owner as one bit of a 64-bit word, or-ed over the strip's rows (x, reduced
  once per program) and over each row's columns (y, one reduction of one word per row), instead
  of four reductions over every instance's pixels per output chunk. The box reductions, not the
  memory traffic, were what held the other designs back (H200 run 12: "argmax" at
  2 x 50 x 1024 x 1024 from 66-68% to 83.5% of the copy bandwidth as the benchmark then counted
  bytes, 78.6% counting only the planes read: benchmarks/results/gpu_nvidia-h200.md).
Mode "drop" with rows of a multiple of 4 pixels and K <= 64 (the usual case) runs
`_suppress_drop_words_kernel` instead: the tile design over int32 words of 4 pixels (one byte
lane per pixel; the per-pixel count is a byte lane of one int32 sum over a KP-row tile), so every
operation handles 4 pixels. Its box columns come from two reductions of keys packing each word's
column with its 4-bit mask of surviving lanes; tiles that lie in one image row (ROW_TILES) need no
row reduction; bool masks (bytes 0 or 1, as torch keeps them) skip the byte test (ZERO_ONE).
Other one-byte masks (uint8): any non-zero byte is kept. The word kernel's strip design
(STRIP_ROWS > 0) runs the same tile over TILE / KP word columns of STRIP_ROWS image rows, one row
at a time with the next rows' loads in flight (PREFETCH 1-2 rows in registers, or with PREFETCH 0
Triton's software pipeline through shared memory), and reduces its boxes once per program:
each element keeps the or of its surviving words (x) and a bit per row with a survivor (y).
(A rows design over words, with per-thread byte-lane counts and owners, never beat the tile on
an H200 in run 11, at either benchmark size or mask kind, and was removed.)

Boxes: every program folds its boxes into a zeroed B x K x 4 int32 state with vector atomic
maxima (order-free, so deterministic); the last program of each image to arrive (an atomic
counter) writes that image's float32 boxes (empty -> zeros) and zeroes the state again, so on
the GPU one state per device and stream is kept and reused (no memset launch per call).
On the GPU, KP <= 64: the word kernel's two designs and the byte kernel's three designs (tile sizes,
pixels per program, rows per step, strip rows, warps) are autotuned per size class (the
first call of a class; later ones launch the pick directly, past the autotuner); KP > 64
runs the rows design. Above MAX_INSTANCES instances, or MAX_PLANE_PIXELS pixels per mask, the torch
reference runs instead. Counts
larger than K mean all K instances are valid.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from resam_kernels.launch import refuse_tuning_while_capturing

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

MODES = ("drop", "argmax")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"overlap suppression mode must be one of {MODES}, got {mode!r}")


def check_counts(counts: torch.Tensor, batch: int) -> None:
    """counts: one integer per image (a kernel reads counts[b] for every image b)."""
    if tuple(counts.shape) != (batch,) or counts.is_floating_point() or counts.is_complex() \
            or counts.dtype == torch.bool:
        raise ValueError(f"overlap suppression needs integer counts of shape ({batch},) (one per image), got "
                         f"{counts.dtype} {tuple(counts.shape)}")


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
    check_counts(counts, batch)
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


# Boxes are accumulated in a zero-initialised int32 state, B x K x 4, as running maxima of
# (-x0 + BIG, -y0 + BIG, x1, y1): 0 means "no surviving pixel yet" for every coordinate, so one
# memset initialises it. BIG is above any pixel coordinate.
BIG = tl.constexpr(1 << 30)
# Stages of Triton's software pipeline of the word kernel's strip loop (PREFETCH 0). On an H200
# (run 19, benchmarks/results/h200_run19/), 32-row strips: 3 stages ran faster than 2, 4, 6 and 8;
# 16-row strips: 3 as fast as 6 alone and faster back to back, and faster than 4
PIPELINE_STAGES = tl.constexpr(3)


@triton.jit
def _fold_boxes(state_ptr, image, num_instances, instance, touched, x0, y0, x1, y1):
    """Folds boxes of a set of instances (vectors; `touched`: has a surviving pixel here) into
    the B x K x 4 int32 state: one vector atomic max per coordinate (order-free: the result does
    not depend on program order)."""
    ptrs = state_ptr + (image * num_instances + instance) * 4
    tl.atomic_max(ptrs + 0, -x0 + BIG, mask=touched, sem="relaxed")
    tl.atomic_max(ptrs + 1, -y0 + BIG, mask=touched, sem="relaxed")
    tl.atomic_max(ptrs + 2, x1, mask=touched, sem="relaxed")
    tl.atomic_max(ptrs + 3, y1, mask=touched, sem="relaxed")


@triton.jit
def _fold_box_rows(state_ptr, image, num_instances, instance, real, hit, x_first, x_last, row):
    """Boxes of a set of instances over one program's pixels, folded into the state. hit:
    instances x N (a surviving pixel, or a word with one), x_first / x_last: its first and last
    surviving column (instances x N), row: N."""
    x0 = tl.min(tl.where(hit, x_first, BIG), axis=1)  # instances
    y0 = tl.min(tl.where(hit, row[None, :], BIG), axis=1)
    x1 = tl.max(tl.where(hit, x_last + 1, 0), axis=1)
    y1 = tl.max(tl.where(hit, row[None, :] + 1, 0), axis=1)
    _fold_boxes(state_ptr, image, num_instances, instance, real & (x1 > 0), x0, y0, x1, y1)


@triton.jit
def _nonzero_bytes(words):
    """int32 words -> 0x01 in every byte lane that is non-zero, 0 in the others: the low 7 bits of
    a byte plus 0x7F carry into its bit 7 exactly when they are non-zero (no carry leaves the
    byte), then or-ed with bit 7 itself."""
    return ((((words & 0x7F7F7F7F) + 0x7F7F7F7F) | words) >> 7) & 0x01010101


@triton.jit
def _zero_bytes(words):
    """int32 words -> 0x01 in every byte lane that is zero, 0 in the others."""
    return (~_nonzero_bytes(words)) & 0x01010101


@triton.jit
def _finish_image(state_ptr, arrivals_ptr, boxes_ptr, image, num_instances, KP: tl.constexpr):
    """Called by every program after its folds; the image's programs: grid dim 0 (see
    `_finish_image_of`)."""
    _finish_image_of(state_ptr, arrivals_ptr, boxes_ptr, image, num_instances, tl.num_programs(0), KP)


@triton.jit
def _finish_image_of(state_ptr, arrivals_ptr, boxes_ptr, image, num_instances, programs, KP: tl.constexpr):
    """Called by every one of the image's `programs` after its folds. The image's last program to
    arrive (an atomic counter per image, arrivals: B int32) writes the image's float32 boxes
    (B x K x 4; empty -> zeros) from the state, then zeroes its state and counter, so a re-run
    (autotuning) starts clean. The barrier orders the program's box atomics before its arrival;
    the last program reads the state from L2 (".cg"), where the atomics were performed."""
    tl.debug_barrier()
    arrived = tl.atomic_add(arrivals_ptr + image, 1, sem="acq_rel")
    if arrived == programs - 1:
        instance = tl.arange(0, KP)  # KP
        real = instance < num_instances
        state = state_ptr + (image * num_instances + instance) * 4  # KP
        left = tl.load(state + 0, mask=real, other=0, cache_modifier=".cg")
        top = tl.load(state + 1, mask=real, other=0, cache_modifier=".cg")
        right = tl.load(state + 2, mask=real, other=0, cache_modifier=".cg")
        bottom = tl.load(state + 3, mask=real, other=0, cache_modifier=".cg")
        _write_boxes(boxes_ptr, image, num_instances, instance, real, left, top, right, bottom)
        for coordinate in tl.static_range(4):
            tl.store(state + coordinate, tl.zeros([KP], dtype=tl.int32), mask=real)
        tl.store(arrivals_ptr + image, 0)


@triton.jit
def _write_boxes(boxes_ptr, image, num_instances, instance, real, left, top, right, bottom):
    """An image's float32 boxes (B x K x 4) from its box state's four coordinates (KP each, as
    folded by `_fold_boxes`; empty -> zeros)."""
    empty = right == 0
    out = boxes_ptr + (image * num_instances + instance) * 4  # KP
    tl.store(out + 0, tl.where(empty, 0, -left + BIG).to(tl.float32), mask=real)
    tl.store(out + 1, tl.where(empty, 0, -top + BIG).to(tl.float32), mask=real)
    tl.store(out + 2, right.to(tl.float32), mask=real)
    tl.store(out + 3, bottom.to(tl.float32), mask=real)


@triton.jit
def _tile_design(masks_ptr, confidence_ptr, out_ptr, state_ptr, image, count, num_instances,
                 width, num_pixels, ARGMAX: tl.constexpr, KP: tl.constexpr,
                 BLOCK_P: tl.constexpr, WALK: tl.constexpr):
    """The pixels [first, first + WALK * BLOCK_P) of one image, all K instances at once as a
    KP x BLOCK_P tile (KP = next power of two >= K) per step: masks (and confidences) read once,
    output written once; the reduction over instances runs across the tile's rows."""
    first = tl.program_id(0) * WALK * BLOCK_P
    instance = tl.arange(0, KP)  # KP
    valid = instance < count  # instances k >= count are padding: not read, written empty
    real = instance < num_instances
    # 64-bit offset of each instance plane of this image (B x K x H x W may exceed 2^31)
    plane = image * num_instances * num_pixels + instance.to(tl.int64) * num_pixels  # KP
    x0 = tl.full([KP], BIG, dtype=tl.int32)
    y0 = tl.full([KP], BIG, dtype=tl.int32)
    x1 = tl.zeros([KP], dtype=tl.int32)  # 0: no surviving pixel yet
    y1 = tl.zeros([KP], dtype=tl.int32)
    for block in range(0, WALK):
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
        x0 = tl.minimum(x0, tl.min(tl.where(survives, col[None, :], BIG), axis=1))
        y0 = tl.minimum(y0, tl.min(tl.where(survives, row[None, :], BIG), axis=1))
        x1 = tl.maximum(x1, tl.max(tl.where(survives, col[None, :] + 1, 0), axis=1))
        y1 = tl.maximum(y1, tl.max(tl.where(survives, row[None, :] + 1, 0), axis=1))
    _fold_boxes(state_ptr, image, num_instances, instance, real & (x1 > 0), x0, y0, x1, y1)


@triton.jit
def _instance_row(masks_ptr, confidence_ptr, image_base, k, count, num_pixels, pixel, in_range,
                  ARGMAX: tl.constexpr):
    """Row k of one image's instances over `pixel` (BLOCK_P): kept (bool) and, in "argmax" mode,
    the score (confidence where kept, else -inf; drop mode: 0). Rows k >= count: not kept."""
    read = in_range & (k < count)
    offsets = image_base + tl.cast(k, tl.int64) * num_pixels + pixel  # int64: planes beyond 2^31
    kept = tl.load(masks_ptr + offsets, mask=read, other=0) != 0  # BLOCK_P
    if ARGMAX:
        score = tl.load(confidence_ptr + offsets, mask=read, other=0.0).to(tl.float32)
        score = tl.where(kept, score, float("-inf"))
    else:
        score = tl.zeros([pixel.shape[0]], dtype=tl.float32)
    return kept, score


@triton.jit
def _take_row(owner, best, keepers, kept, score, k, ARGMAX: tl.constexpr):
    """Folds row k into the running owner of every pixel. argmax: a strictly higher score takes
    the pixel (ties keep the lowest k, as torch.argmax); drop: the last keeper so far (the owner
    only matters where exactly one instance keeps the pixel) and the number of keepers."""
    if ARGMAX:
        better = score > best
        owner = tl.where(better, k, owner)
        best = tl.where(better, score, best)
        keepers = keepers | better.to(tl.int32)
    else:
        owner = tl.where(kept, k, owner)
        keepers += kept.to(tl.int32)
    return owner, best, keepers


@triton.jit
def _owners(masks_ptr, confidence_ptr, image_base, count, num_pixels, pixel, in_range,
            ARGMAX: tl.constexpr, UNROLL: tl.constexpr):
    """The owner of every pixel (BLOCK_P) by a loop over the valid instances, UNROLL (1, 2, 4 or
    8) rows a step: the step's rows are loaded first (separate 1-D loads, so more bytes are in
    flight), then folded one after the other (argmax: first most confident kept instance; drop:
    an instance that kept it). Every value has the pixel layout: the fold is thread-local.
    Returns (owner, owned): owned = the owner keeps the pixel (argmax: owner kept; drop: kept by
    exactly one instance)."""
    tl.static_assert((UNROLL == 1) | (UNROLL == 2) | (UNROLL == 4) | (UNROLL == 8))
    owner = tl.zeros([pixel.shape[0]], dtype=tl.int32)
    best = tl.full([pixel.shape[0]], float("-inf"), dtype=tl.float32)  # argmax only
    if ARGMAX:
        # owned (0/1). No kept score above -inf: the owner stays 0 and keeps the pixel only if
        # instance 0 kept it (as the reference's argmax over all -inf)
        keepers = (tl.load(masks_ptr + image_base + pixel, mask=in_range & (count > 0),
                           other=0) != 0).to(tl.int32)
    else:
        keepers = tl.zeros([pixel.shape[0]], dtype=tl.int32)  # instances that kept the pixel
    for k0 in range(0, count, UNROLL):
        kept0, score0 = _instance_row(masks_ptr, confidence_ptr, image_base, k0, count,
                                      num_pixels, pixel, in_range, ARGMAX)
        if UNROLL >= 2:
            kept1, score1 = _instance_row(masks_ptr, confidence_ptr, image_base, k0 + 1, count,
                                          num_pixels, pixel, in_range, ARGMAX)
        if UNROLL >= 4:
            kept2, score2 = _instance_row(masks_ptr, confidence_ptr, image_base, k0 + 2, count,
                                          num_pixels, pixel, in_range, ARGMAX)
            kept3, score3 = _instance_row(masks_ptr, confidence_ptr, image_base, k0 + 3, count,
                                          num_pixels, pixel, in_range, ARGMAX)
        if UNROLL == 8:
            kept4, score4 = _instance_row(masks_ptr, confidence_ptr, image_base, k0 + 4, count,
                                          num_pixels, pixel, in_range, ARGMAX)
            kept5, score5 = _instance_row(masks_ptr, confidence_ptr, image_base, k0 + 5, count,
                                          num_pixels, pixel, in_range, ARGMAX)
            kept6, score6 = _instance_row(masks_ptr, confidence_ptr, image_base, k0 + 6, count,
                                          num_pixels, pixel, in_range, ARGMAX)
            kept7, score7 = _instance_row(masks_ptr, confidence_ptr, image_base, k0 + 7, count,
                                          num_pixels, pixel, in_range, ARGMAX)
        owner, best, keepers = _take_row(owner, best, keepers, kept0, score0, k0, ARGMAX)
        if UNROLL >= 2:
            owner, best, keepers = _take_row(owner, best, keepers, kept1, score1, k0 + 1, ARGMAX)
        if UNROLL >= 4:
            owner, best, keepers = _take_row(owner, best, keepers, kept2, score2, k0 + 2, ARGMAX)
            owner, best, keepers = _take_row(owner, best, keepers, kept3, score3, k0 + 3, ARGMAX)
        if UNROLL == 8:
            owner, best, keepers = _take_row(owner, best, keepers, kept4, score4, k0 + 4, ARGMAX)
            owner, best, keepers = _take_row(owner, best, keepers, kept5, score5, k0 + 5, ARGMAX)
            owner, best, keepers = _take_row(owner, best, keepers, kept6, score6, k0 + 6, ARGMAX)
            owner, best, keepers = _take_row(owner, best, keepers, kept7, score7, k0 + 7, ARGMAX)
    return owner, (keepers == 1) & in_range


@triton.jit
def _store_owned_rows(out_ptr, image_base, start, num_instances, num_pixels, pixel, in_range,
                      owner, owned, CHUNK: tl.constexpr):
    """Writes the output rows of instances [start, start + CHUNK) over `pixel` (BLOCK_P):
    (instance == owner) & owned. Returns (instance, real, survives): CHUNK, CHUNK and
    CHUNK x BLOCK_P."""
    instance = start + tl.arange(0, CHUNK)  # CHUNK
    real = instance < num_instances
    survives = (instance[:, None] == owner[None, :]) & owned[None, :]  # CHUNK x BLOCK_P
    offsets = image_base + instance.to(tl.int64)[:, None] * num_pixels + pixel[None, :]
    tl.store(out_ptr + offsets, survives.to(tl.uint8), mask=real[:, None] & in_range[None, :])
    return instance, real, survives


@triton.jit
def _rows_design(masks_ptr, confidence_ptr, out_ptr, state_ptr, image, count, num_instances,
                 width, num_pixels, ARGMAX: tl.constexpr, BLOCK_P: tl.constexpr,
                 CHUNK: tl.constexpr, UNROLL: tl.constexpr):
    """The pixels [first, first + BLOCK_P) of one image in two phases:
    1. each pixel's owner (`_owners`, UNROLL instance rows a step);
    2. the output rows, CHUNK instances at a time: (instance == owner) & owned, and their boxes.
    Registers hold a few values per pixel and UNROLL loaded rows instead of a K x pixels tile,
    so K is not bounded by registers."""
    pixel = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # BLOCK_P
    in_range = pixel < num_pixels
    image_base = image * num_instances * num_pixels  # int64: first pixel of this image's planes
    owner, owned = _owners(masks_ptr, confidence_ptr, image_base, count, num_pixels, pixel,
                           in_range, ARGMAX, UNROLL)  # BLOCK_P, BLOCK_P
    row = pixel // width  # BLOCK_P
    col = pixel - row * width
    for start in range(0, num_instances, CHUNK):
        instance, real, survives = _store_owned_rows(out_ptr, image_base, start, num_instances,
                                                     num_pixels, pixel, in_range, owner, owned, CHUNK)
        _fold_box_rows(state_ptr, image, num_instances, instance, real, survives, col[None, :],
                       col[None, :], row)


@triton.jit
def _bitwise_or(a, b):
    return a | b


@triton.jit
def _strip_design(masks_ptr, confidence_ptr, out_ptr, state_ptr, image, count, num_instances,
                  width, num_pixels, KP: tl.constexpr, ARGMAX: tl.constexpr,
                  BLOCK_P: tl.constexpr, STRIP_ROWS: tl.constexpr, CHUNK: tl.constexpr,
                  UNROLL: tl.constexpr):
    """The rows design on a strip: BLOCK_P columns of STRIP_ROWS image rows, one image row at a
    time (its owners, then its output rows CHUNK instances at a time). Boxes without a
    reduction per instance and row: each pixel's owner as one bit of a 64-bit word (KP <= 64),
    or-ed over the strip's rows per column (x: reduced once per program) and over the row's
    columns per row (y: one reduction of one word per row)."""
    tl.static_assert(KP <= 64)
    height = num_pixels // width
    strips = tl.cdiv(width, BLOCK_P)
    first_row = (tl.program_id(0) // strips) * STRIP_ROWS
    col = (tl.program_id(0) % strips) * BLOCK_P + tl.arange(0, BLOCK_P)  # BLOCK_P
    image_base = image * num_instances * num_pixels  # int64: first pixel of this image's planes
    instance = tl.arange(0, KP)  # KP
    bit = instance.to(tl.int64)  # KP: instance k's bit in the owner words
    owned_in_column = tl.zeros([BLOCK_P], dtype=tl.int64)  # bit k: k owns a pixel of the column
    y0 = tl.full([KP], BIG, dtype=tl.int32)
    y1 = tl.zeros([KP], dtype=tl.int32)
    for step in range(0, STRIP_ROWS):
        row = first_row + step
        in_range = (col < width) & (row < height)  # BLOCK_P
        pixel = row * width + col
        owner, owned = _owners(masks_ptr, confidence_ptr, image_base, count, num_pixels, pixel,
                               in_range, ARGMAX, UNROLL)  # BLOCK_P, BLOCK_P
        for start in range(0, num_instances, CHUNK):
            _store_owned_rows(out_ptr, image_base, start, num_instances, num_pixels, pixel,
                              in_range, owner, owned, CHUNK)
        owner_bit = tl.where(owned, tl.full([BLOCK_P], 1, dtype=tl.int64) << owner.to(tl.int64), 0)
        owned_in_column = owned_in_column | owner_bit
        owned_in_row = tl.reduce(owner_bit, 0, _bitwise_or)  # scalar: bit k, k owns a pixel here
        here = ((owned_in_row >> bit) & 1) != 0  # KP
        y0 = tl.minimum(y0, tl.where(here, row, BIG))
        y1 = tl.maximum(y1, tl.where(here, row + 1, 0))
    has = ((owned_in_column[None, :] >> bit[:, None]) & 1) != 0  # KP x BLOCK_P
    x0 = tl.min(tl.where(has, col[None, :], BIG), axis=1)  # KP
    x1 = tl.max(tl.where(has, col[None, :] + 1, 0), axis=1)
    _fold_boxes(state_ptr, image, num_instances, instance, (instance < num_instances) & (x1 > 0),
                x0, y0, x1, y1)


@triton.jit
def _suppress_overlap_kernel(masks_ptr, confidence_ptr, counts_ptr, out_ptr, state_ptr,
                             arrivals_ptr, boxes_ptr, num_instances, width, num_pixels,
                             pixels_bucket, batch_bucket, ARGMAX: tl.constexpr, KP: tl.constexpr,
                             BLOCK_P: tl.constexpr, WALK: tl.constexpr, ROWS: tl.constexpr,
                             CHUNK: tl.constexpr, UNROLL: tl.constexpr,
                             STRIP_ROWS: tl.constexpr = 0):
    # masks/out: B x K x H x W uint8, confidence: B x K x H x W float (read in "argmax" mode),
    # counts: B int64, state: B x K x 4 int32 + arrivals: B int32 (zeroed), boxes: B x K x 4
    # float32. Grid: (pixel spans, images). ROWS picks the design (`_rows_design`, else
    # `_tile_design`); pixels_bucket and batch_bucket (log2 of pixels per image and of images,
    # rounded up) are only autotuning keys.
    image = tl.program_id(1).to(tl.int64)
    count = tl.maximum(tl.minimum(tl.load(counts_ptr + image), num_instances), 0).to(tl.int32)
    if STRIP_ROWS > 0:
        _strip_design(masks_ptr, confidence_ptr, out_ptr, state_ptr, image, count, num_instances,
                      width, num_pixels, KP, ARGMAX, BLOCK_P, STRIP_ROWS, CHUNK, UNROLL)
    elif ROWS:
        _rows_design(masks_ptr, confidence_ptr, out_ptr, state_ptr, image, count, num_instances,
                     width, num_pixels, ARGMAX, BLOCK_P, CHUNK, UNROLL)
    else:
        _tile_design(masks_ptr, confidence_ptr, out_ptr, state_ptr, image, count, num_instances,
                     width, num_pixels, ARGMAX, KP, BLOCK_P, WALK)
    _finish_image(state_ptr, arrivals_ptr, boxes_ptr, image, num_instances, KP)


@triton.jit
def _single_keeper_lanes(raw, ZERO_ONE: tl.constexpr):
    """KP x BLOCK_W words of 4 pixels -> 0x01 in the byte lanes kept by exactly one instance of
    the column, 0 elsewhere. The per-pixel counts are byte lanes of one int32 sum over the
    instance axis (K < 256: no carry between lanes)."""
    if ZERO_ONE:
        kept = raw  # KP x BLOCK_W, 0x01 per kept pixel
    else:
        kept = _nonzero_bytes(raw)
    kept_by = tl.sum(kept, axis=0)  # BLOCK_W, one count (< 256) per byte lane
    single = _zero_bytes(kept_by ^ 0x01010101)  # BLOCK_W: 0x01 in the lanes equal to 1
    return kept & single[None, :]  # KP x BLOCK_W


@triton.jit
def _word_tile_design(words_ptr, out_ptr, state_ptr, image, count, num_instances, words_per_row,
                      num_words, KP: tl.constexpr, TILE: tl.constexpr, ZERO_ONE: tl.constexpr,
                      ROW_TILES: tl.constexpr):
    """BLOCK_W = TILE / KP words of all KP instances as one KP x BLOCK_W tile; the per-pixel
    counts are byte lanes of one int32 sum over the instance axis (K < 256: no carry between
    lanes), so every operation handles 4 pixels at once. ZERO_ONE: every byte is 0 or 1 (bool
    storage), so the words are the kept lanes as loaded. ROW_TILES: every tile lies in one image
    row (words_per_row is a multiple of BLOCK_W), so a touched instance's y0 / y1 are that row's."""
    BLOCK_W: tl.constexpr = TILE // KP
    first_word = tl.program_id(0) * BLOCK_W
    word = first_word + tl.arange(0, BLOCK_W)  # BLOCK_W
    in_range = word < num_words
    instance = tl.arange(0, KP)  # KP
    valid = instance < count  # instances k >= count are padding: not read, written empty
    real = instance < num_instances
    # 64-bit offset of each instance plane of this image (B x K x H x W may exceed 2^31)
    plane = image * num_instances * num_words + instance.to(tl.int64) * num_words  # KP
    offsets = plane[:, None] + word[None, :]  # KP x BLOCK_W int64
    raw = tl.load(words_ptr + offsets, mask=valid[:, None] & in_range[None, :], other=0)
    survives = _single_keeper_lanes(raw, ZERO_ONE)  # KP x BLOCK_W
    tl.store(out_ptr + offsets, survives, mask=real[:, None] & in_range[None, :])
    # Box of every instance over this tile. Columns: per word, a 4-bit lane mask (bit i: byte i,
    # the word's i-th pixel from the left, survives) packed under the word's column in the row,
    # so one min gives the leftmost surviving word and, within it, its lowest lane (the lowest
    # set bit, lanes & -lanes), and one max the rightmost word and its highest lane.
    lanes = (survives | (survives >> 7) | (survives >> 14) | (survives >> 21)) & 0xF  # KP x BLOCK_W
    hit = lanes != 0
    row = word // words_per_row  # BLOCK_W
    column = word - row * words_per_row  # word column within its row
    left_key = tl.min(tl.where(hit, (column[None, :] << 4) | (lanes & -lanes), BIG), axis=1)  # KP
    right_key = tl.max(tl.where(hit, ((column[None, :] + 1) << 4) | lanes, 0), axis=1)  # KP; 0: none
    touched = real & (right_key > 0)
    x0 = (left_key >> 4) * 4 + _highest_lane(left_key & 15)  # left_key & 15: one bit, the lowest lane
    x1 = ((right_key >> 4) - 1) * 4 + _highest_lane(right_key & 15) + 1
    if ROW_TILES:
        y0 = tl.zeros([KP], dtype=tl.int32) + first_word // words_per_row
        y1 = y0 + 1
    else:
        y0 = tl.min(tl.where(hit, row[None, :], BIG), axis=1)
        y1 = tl.max(tl.where(hit, row[None, :] + 1, 0), axis=1)
    _fold_boxes(state_ptr, image, num_instances, instance, touched, x0, y0, x1, y1)


@triton.jit
def _bit_index(value):
    """Index of the highest set bit of each non-zero int32 (bit 31 included): the exponent of the
    float64 value of its 32 bits read unsigned (exact)."""
    exact = value.to(tl.uint32, bitcast=True).to(tl.float64).to(tl.int64, bitcast=True)
    return (((exact >> 52) & 0x7FF) - 1023).to(tl.int32)


@triton.jit
def _word_strip_load(words_ptr, plane, row, column, in_columns, valid, height, words_per_row,
                     STREAM: tl.constexpr):
    """One image row of a strip: KP x BLOCK_W words (0 outside the image and for padding).
    STREAM: the words are read once, so the L2 may evict them first."""
    in_range = in_columns & (row < height)  # BLOCK_W
    offsets = plane[:, None] + (row * words_per_row + column)[None, :]  # KP x BLOCK_W int64
    read = valid[:, None] & in_range[None, :]
    if STREAM:
        return tl.load(words_ptr + offsets, mask=read, other=0, eviction_policy="evict_first")
    return tl.load(words_ptr + offsets, mask=read, other=0)


@triton.jit
def _word_strip_store(out_ptr, raw, plane, row, column, in_columns, real, height, words_per_row,
                      ZERO_ONE: tl.constexpr, STREAM: tl.constexpr):
    """The surviving lanes of one loaded strip row (the counting of `_word_tile_design`),
    stored and returned (KP x BLOCK_W)."""
    survives = _single_keeper_lanes(raw, ZERO_ONE)  # KP x BLOCK_W
    in_range = in_columns & (row < height)  # BLOCK_W
    offsets = plane[:, None] + (row * words_per_row + column)[None, :]  # KP x BLOCK_W int64
    written = real[:, None] & in_range[None, :]
    if STREAM:  # streaming stores: not kept in the caches for a re-read
        tl.store(out_ptr + offsets, survives, mask=written, cache_modifier=".cs")
    else:
        tl.store(out_ptr + offsets, survives, mask=written)
    return survives


@triton.jit
def _strip_place(words_per_row, num_words, BLOCK_W: tl.constexpr, STRIP_ROWS: tl.constexpr):
    """The strip of the word kernel's program (grid dim 0: BLOCK_W word columns of STRIP_ROWS
    image rows, column strips fastest): (first_row, end_row (the image's last row + 1 at most),
    column: BLOCK_W word columns, in_columns: column < words_per_row)."""
    height = num_words // words_per_row
    strips = tl.cdiv(words_per_row, BLOCK_W)
    first_row = (tl.program_id(0) // strips) * STRIP_ROWS
    end_row = tl.minimum(first_row + STRIP_ROWS, height)
    column = (tl.program_id(0) % strips) * BLOCK_W + tl.arange(0, BLOCK_W)  # BLOCK_W
    return first_row, end_row, column, column < words_per_row


@triton.jit
def _word_strip_design(words_ptr, out_ptr, state_ptr, image, count, num_instances, words_per_row,
                       num_words, KP: tl.constexpr, TILE: tl.constexpr, ZERO_ONE: tl.constexpr,
                       STRIP_ROWS: tl.constexpr, PREFETCH: tl.constexpr, STREAM: tl.constexpr):
    """The word tile over a strip: BLOCK_W = TILE / KP word columns of STRIP_ROWS image rows,
    one row at a time. No reduction per row for the boxes: each element keeps the or of its
    surviving words over the strip's rows (x) and a bit per row with a survivor (y), reduced
    across the columns once per program. STREAM: streaming stores and, with the register
    prefetch (PREFETCH 1-2), loads marked evict-first (every byte is read once and written once;
    the pipelined loads of PREFETCH 0 become cp.async, whose PTX carries no eviction hint in
    triton 3.8)."""
    tl.static_assert(STRIP_ROWS <= 32)  # one bit per row in an int32
    BLOCK_W: tl.constexpr = TILE // KP
    first_row, end_row, column, in_columns = _strip_place(words_per_row, num_words, BLOCK_W, STRIP_ROWS)
    instance = tl.arange(0, KP)  # KP
    valid = instance < count  # instances k >= count are padding: not read, written empty
    real = instance < num_instances
    plane = image * num_instances * num_words + instance.to(tl.int64) * num_words  # KP
    surviving_words = tl.zeros([KP, BLOCK_W], dtype=tl.int32)  # or over rows of surviving lanes
    surviving_rows = tl.zeros([KP, BLOCK_W], dtype=tl.int32)  # bit r: a survivor on row r
    if PREFETCH == 0:
        # Triton's software pipeline: the loads of the next PIPELINE_STAGES - 1 rows go to shared
        # memory (cp.async on sm_80+), not to registers, so more rows' bytes are in flight at the
        # same registers and occupancy (H200 run 19: the register prefetch's kernel was
        # latency-bound, 0.55 eligible warps a scheduler at 4 programs an SM)
        for step in tl.range(0, STRIP_ROWS, num_stages=PIPELINE_STAGES):
            row = first_row + step
            raw = _word_strip_load(words_ptr, plane, row, column, in_columns, valid, end_row,
                                   words_per_row, STREAM)  # KP x BLOCK_W
            survives = _word_strip_store(out_ptr, raw, plane, row, column, in_columns, real,
                                         end_row, words_per_row, ZERO_ONE, STREAM)
            surviving_words = surviving_words | survives
            surviving_rows = surviving_rows | tl.where(survives != 0, 1 << step, 0)
    else:
        # PREFETCH rows ahead of the one being counted have their loads in flight in registers
        # (1 or 2; without, every config ran slower on an H200 in run 13)
        tl.static_assert((PREFETCH == 1) | (PREFETCH == 2))
        raw = _word_strip_load(words_ptr, plane, first_row, column, in_columns, valid, end_row,
                               words_per_row, STREAM)  # KP x BLOCK_W
        if PREFETCH == 2:
            ahead = _word_strip_load(words_ptr, plane, first_row + 1, column, in_columns, valid,
                                     end_row, words_per_row, STREAM)
        else:
            ahead = raw  # (unused)
        for step in range(0, STRIP_ROWS):
            row = first_row + step
            if PREFETCH == 1:
                next_raw = _word_strip_load(words_ptr, plane, row + 1, column, in_columns, valid,
                                            end_row, words_per_row, STREAM)
                survives = _word_strip_store(out_ptr, raw, plane, row, column, in_columns, real,
                                             end_row, words_per_row, ZERO_ONE, STREAM)
                raw = next_raw
            else:
                next_ahead = _word_strip_load(words_ptr, plane, row + 2, column, in_columns, valid,
                                              end_row, words_per_row, STREAM)
                survives = _word_strip_store(out_ptr, raw, plane, row, column, in_columns, real,
                                             end_row, words_per_row, ZERO_ONE, STREAM)
                raw = ahead
                ahead = next_ahead
            surviving_words = surviving_words | survives
            surviving_rows = surviving_rows | tl.where(survives != 0, 1 << step, 0)
    _fold_strip_boxes(state_ptr, image, num_instances, instance, real, column, first_row,
                      surviving_words, surviving_rows)


@triton.jit
def _fold_strip_boxes(state_ptr, image, num_instances, instance, real, column, first_row,
                      surviving_words, surviving_rows):
    """A strip's boxes (`_strip_boxes`), folded into the state once per program."""
    touched, x0, y0, x1, y1 = _strip_boxes(real, column, first_row, surviving_words, surviving_rows)
    _fold_boxes(state_ptr, image, num_instances, instance, touched, x0, y0, x1, y1)


@triton.jit
def _strip_boxes(real, column, first_row, surviving_words, surviving_rows):
    """A strip's boxes from its KP x BLOCK_W accumulators: surviving_words (the or of each
    element's surviving lanes over the strip's rows) and surviving_rows (bit r: a survivor on row
    first_row + r); column: BLOCK_W word columns. The box keys of `_word_tile_design`. -> (touched:
    a real instance with a survivor in the strip, x0, y0, x1, y1), KP each."""
    lanes = (surviving_words | (surviving_words >> 7) | (surviving_words >> 14)
             | (surviving_words >> 21)) & 0xF  # KP x BLOCK_W
    hit = lanes != 0
    left_key = tl.min(tl.where(hit, (column[None, :] << 4) | (lanes & -lanes), BIG), axis=1)  # KP
    right_key = tl.max(tl.where(hit, ((column[None, :] + 1) << 4) | lanes, 0), axis=1)  # KP
    touched = real & (right_key > 0)
    x0 = (left_key >> 4) * 4 + _highest_lane(left_key & 15)
    x1 = ((right_key >> 4) - 1) * 4 + _highest_lane(right_key & 15) + 1
    rows = tl.reduce(surviving_rows, 1, _bitwise_or)  # KP: bit r, a survivor on row first_row + r
    rows = tl.where(touched, rows, 1)  # (untouched instances are not folded)
    y0 = first_row + _bit_index(rows & -rows)
    y1 = first_row + _bit_index(rows) + 1
    return touched, x0, y0, x1, y1


@triton.jit
def _highest_lane(nibble):
    """Index of the highest set bit of a non-zero 4-bit value (0 to 3)."""
    return (nibble >= 2).to(tl.int32) + (nibble >= 4).to(tl.int32) + (nibble >= 8).to(tl.int32)


@triton.jit
def _suppress_drop_words_jit(words_ptr, counts_ptr, out_ptr, state_ptr, arrivals_ptr,
                             boxes_ptr, num_instances, words_per_row, num_words, words_bucket,
                             KP: tl.constexpr, TILE: tl.constexpr, ZERO_ONE: tl.constexpr,
                             ROW_TILES: tl.constexpr, STRIP_ROWS: tl.constexpr = 0,
                             PREFETCH: tl.constexpr = 1, STREAM: tl.constexpr = False):
    # "drop" mode on 32-bit words of 4 pixels (width % 4 == 0, so a word never straddles two
    # rows). words/out: B x K x (H W / 4) int32, each byte one pixel (0 = not kept),
    # counts: B int64, state/arrivals/boxes as in `_suppress_overlap_kernel`. Grid: (word spans
    # of TILE / KP words, images). words_bucket (`_words_bucket`) is only an autotuning key;
    # ROW_TILES is set by the heuristic below from words_per_row and the tile.
    image = tl.program_id(1).to(tl.int64)
    count = tl.maximum(tl.minimum(tl.load(counts_ptr + image), num_instances), 0).to(tl.int32)
    if STRIP_ROWS > 0:
        _word_strip_design(words_ptr, out_ptr, state_ptr, image, count, num_instances,
                           words_per_row, num_words, KP, TILE, ZERO_ONE, STRIP_ROWS, PREFETCH,
                           STREAM)
    else:
        _word_tile_design(words_ptr, out_ptr, state_ptr, image, count, num_instances,
                          words_per_row, num_words, KP, TILE, ZERO_ONE, ROW_TILES)
    _finish_image(state_ptr, arrivals_ptr, boxes_ptr, image, num_instances, KP)


# The tile design: tile elements (KP x BLOCK_P) per step: masks only in "drop" mode, masks +
# confidences in "argmax" mode. Every element of the tile stays live across the reduction over
# instances, so the tile sets the registers. The rows design holds a few values per pixel instead
# and runs on the GPU above KP = 64 (where tiles would spill) and under the autotuner.
_TILE = {"drop": 4096, "argmax": 8192}
_NUM_WARPS = 8
_MIN_BLOCK_P = 16
MAX_INSTANCES = 1024
# Pixel indices within one plane are int32 (plane and image offsets are int64): larger planes
# (over 32768 x 32768) run the torch reference.
MAX_PLANE_PIXELS = 1 << 30
# Fixed launch of the tile design: enough programs to fill the GPU; beyond that, each program
# walks several pixel blocks so that fewer box atomics are issued.
_TARGET_PROGRAMS = 2048
_MAX_BLOCKS_PER_PROGRAM = 8
# Fixed launch of the rows design (GPU above KP = 64; interpreter tests): pixels per program,
# instances per output chunk, instance rows loaded per step, warps.
_ROWS_BLOCK_P, _ROWS_CHUNK, _ROWS_UNROLL, _ROWS_WARPS = 1024, 8, 4, 8


# "drop" mode on words of 4 pixels: KP x BLOCK_W tiles of TILE words (BLOCK_W = TILE / KP).
# On the GPU the tile and warps are tuned on first use per (KP, log2 of words per image); every
# config writes the same outputs and leaves the box state zeroed, so re-running one while
# tuning is harmless. Larger tiles put more bytes in flight per program, smaller ones more
# programs. sm_90 ptxas (triton 3.8, KP = 64, without divisibility hints): 48-255 registers a
# thread; no spills (tests/unit/test_kernel_resources.py) except TILE 8192 with 4 warps on
# tiles that straddle rows (a 328-376-byte stack; on uint8 masks with one-row tiles it takes all
# 255 registers), so the autotuner tries that config only on bool masks with one-row tiles (216
# registers; on an H200, 72% of the copy bandwidth at 2 x 50 x 1024 x 1024 in run 12's
# experiment). The strip design (words, rows per program, rows in flight, warps): on an H200 in
# run 13 at 2 x 50 x 1024 x 1024, (2048, 32, 2, 4) reaches 81.4-82.0% of the copy bandwidth in a
# CUDA graph against 75.0% for the tile design (percentages of runs 1-17 count the padding planes
# as read: x 0.965 for "drop", x 0.942 for "argmax" at that shape), and (2048, 16, 2, 4) wins at 8 x 50 x 256 x 256.
# Strips of 24 rows ran at 70%, 8 warps and 1-row prefetch below the chosen ones
# (benchmarks/results/h200_run13/README.md). 118-124 registers with the hints below, no spills.
# In sm_90 SASS (triton 3.8 here) the pick's row loop sums the instances of a row across its four
# warps through shared memory, with two barriers a row; one-warp strips ((256-1024, 16-32, 1-2, 1))
# have no barrier there and do not spill. STREAM (the fifth field): streaming stores and (with the
# register prefetch) evict-first loads, same registers in sm_90 SASS. H200 run 18 (`benchmarks/bench_overlap_configs.py`,
# benchmarks/results/h200_run18/): at 2 x 50 x 1024 x 1024 no one-warp strip, wide strip or
# STREAM variant beat the pick (0.0636 ms alone; the best of them 0.0657, one-warp strips
# 0.068-0.22); at 8 x 50 x 256 x 256 the 16-row strip with STREAM ran back to back in 0.0179 ms
# against 0.0220 without STREAM and 0.0222 for the best tile (alone, where timings of one config
# vary between about 0.02 and 0.08 ms at this size: 0.0242 against 0.0261 for the best other), so
# it is tuned here and was the autotuner's pick there. PREFETCH 0: the row loop software-pipelined
# by Triton (PIPELINE_STAGES), the rows in flight in shared memory. H200 run 19
# (benchmarks/results/h200_run19/), kernel launches at 2 x 50 x 1024 x 1024: (2048, 32, 0, 4)
# 0.0619-0.0626 ms alone and 0.0593-0.0594 back to back, against 0.0638 and 0.0611-0.0613 for
# (2048, 32, 2, 4) on the same machine; (2048, 16, 0, 4) 0.0632 and 0.0590; triton 3.6: 126-128
# registers, 16.9 KB of shared memory, no spills. In run 19's config sweep (call 5) the
# 16-row pipelined strip with STREAM ran 8 x 50 x 256 x 256 back to back in 0.0143 ms (random
# masks) and 0.0151 (compact) against 0.0180 and 0.0198 for the best tuned config (the best other
# extra, the 8-row pipelined strip: 0.0175 on both); the autotuner
# picks (2048, 32, 0, 4) at 1024 x 1024 and a 16-row pipelined strip at 256 x 256.
_WORD_CONFIGS = ([triton.Config({"TILE": tile}, num_warps=warps)
                  for tile, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8),
                                      (8192, 4), (8192, 8))]
                 + [triton.Config({"TILE": tile, "STRIP_ROWS": strip_rows, "PREFETCH": prefetch,
                                   **({"STREAM": True} if stream else {})}, num_warps=warps)
                    for tile, strip_rows, prefetch, warps, stream in (
                        (1024, 32, 2, 2, 0), (2048, 16, 2, 4, 0), (2048, 32, 1, 4, 0), (2048, 32, 2, 4, 0),
                        (2048, 16, 2, 4, 1), (2048, 32, 0, 4, 0), (2048, 16, 0, 4, 0), (2048, 16, 0, 4, 1))])
# The strip design's 64-bit offsets of every element cost registers unless the compiler knows
# the row length and the pointers are multiples of 16 words / bytes (it specialises on that):
# without, sm_90 ptxas spills several of its configs (336-376 bytes), so they run only there.
_STRIP_ALIGNMENT = 16


def _strip_aligned(words_per_row: int, *buffers) -> bool:
    """Whether the strip design runs on these rows and buffers without spilling: rows of a multiple
    of 16 words, buffers 16-byte aligned (tensors; other values are not checked)."""
    return words_per_row % _STRIP_ALIGNMENT == 0 and all(
        not hasattr(buffer, "data_ptr") or buffer.data_ptr() % _STRIP_ALIGNMENT == 0 for buffer in buffers)


def _one_row_8192_tiles(words_per_row: int, kp: int) -> bool:
    """Whether every tile of TILE 8192 (8192 / KP words) lies in one image row."""
    return words_per_row % (8192 // kp) == 0


def _words_bucket(num_words: int, words_per_row: int, kp: int, aligned: bool) -> int:
    """The word kernel's size class (with KP and ZERO_ONE, its autotuning key and pick key): log2
    of words per image rounded up, and the two facts the pruner decides by, so that a pick is
    never reused where the pruner would have dropped it (it would spill there): whether the
    strip design is aligned, and whether TILE 8192 has one-row tiles."""
    return 4 * (num_words - 1).bit_length() + 2 * aligned + _one_row_8192_tiles(words_per_row, kp)


def _prune_word_configs(configs, named_args, **kwargs):
    """Drops TILE 8192 with 4 warps unless the masks are bool and every tile lies in one row, and
    the strip design unless rows are a multiple of 16 words and both buffers 16-byte aligned."""
    args = {**named_args, **kwargs}
    words_per_row, kp, zero_one = args["words_per_row"], args["KP"], args["ZERO_ONE"]
    aligned = _strip_aligned(words_per_row, args.get("words_ptr"), args.get("out_ptr"))
    one_row_bool_tiles = zero_one and _one_row_8192_tiles(words_per_row, kp)

    def runs_here(config) -> bool:
        if "STRIP_ROWS" in config.kwargs:
            return aligned
        return not (config.kwargs["TILE"] == 8192 and config.num_warps == 4) or one_row_bool_tiles
    return [config for config in configs if runs_here(config)]


# The byte kernel on the GPU with KP <= 64 (mode "argmax", or "drop" on rows that are not a
# multiple of 4 pixels): the three designs compete per (KP, log2 of pixels per image, log2 of
# images, mode). Tile design: BLOCK_P and the blocks walked per program (walking issues fewer box
# atomics). Rows design: pixels per program, instances per output chunk and instance rows
# loaded per step. sm_90 ptxas (triton 3.8, KP = 64, both modes; 16-byte aligned arguments /
# without divisibility hints): tile configs 46-102 / 72-254 registers a thread, rows configs
# 93-184 / 71-255, the fixed rows launch at KP = 1024 103-128 (no hints); no spills. Since the
# rows of a step are separate 1-D loads (as one UNROLL x BLOCK_P tile, Triton's layout split the
# rows across warps, so the fold went through shared memory), the H200 autotuner picks rows with
# 4 rows a step for "argmax" (run 11: (1024, 8, 4, 4), and (256, 4, 4, 2) on compact 1024 x 1024
# masks; before, 1 row a step won).
# Rows (1024, 16, 1, 8) spilled 8 bytes in "drop" mode and is gone. Walking 128-pixel blocks
# spilled (2 blocks: 380-492 bytes), as did stop 12's runtime-walk launch at BLOCK_P = 128.
# Strip design: pixels per program row, image rows per program, warps (8 instance rows a step,
# 8 instances per output chunk); 180-185 registers without hints, no spills. H200 run 12: the
# autotuner picks (512, 8 rows, 4 warps) for "argmax" at 2 x 50 x 1024 x 1024 (83.5% of the
# copy bandwidth; an experiment on the same machine: 84.3%, against 81.3% with 4 rows and 80.0%
# for (1024, 8 rows, 8 warps)) and rows (1024, 8, 4, 4) at 8 x 50 x 256 x 256.
_BYTE_CONFIGS = (
    [triton.Config({"BLOCK_P": block_p, "WALK": walk, "ROWS": False, "CHUNK": 1, "UNROLL": 1},
                   num_warps=warps)
     for block_p, walk, warps in ((32, 1, 4), (64, 1, 8), (128, 1, 8), (64, 4, 8))]
    + [triton.Config({"BLOCK_P": block_p, "WALK": 1, "ROWS": True, "CHUNK": chunk, "UNROLL": unroll},
                     num_warps=warps)
       for block_p, chunk, unroll, warps in ((512, 8, 1, 4), (1024, 8, 1, 4), (2048, 8, 1, 8),
                                             (512, 8, 4, 4), (1024, 8, 4, 4), (1024, 8, 4, 8),
                                             (2048, 8, 2, 8), (512, 8, 2, 4), (1024, 8, 2, 8),
                                             (256, 4, 4, 2))]
    + [triton.Config({"BLOCK_P": block_p, "WALK": 1, "ROWS": True, "CHUNK": 8, "UNROLL": 8,
                      "STRIP_ROWS": strip_rows}, num_warps=warps)
       for block_p, strip_rows, warps in ((512, 8, 4), (512, 4, 4), (1024, 8, 8), (256, 8, 2))])
MAX_TUNED_INSTANCES = 64
MAX_WORD_INSTANCES = 64  # KP <= 64: the smallest tile above still has 16 words per row
_INTERPRET_WORD_TILE = 1 << 14
DESIGNS = ("tile", "rows")


def _use_words(masks: torch.Tensor, mode: str) -> bool:
    """Whether "drop" mode can run on 4-pixel words: rows of a multiple of 4 pixels, at most
    MAX_WORD_INSTANCES instances, and 4-byte aligned storage (the output, freshly allocated, is)."""
    num_instances, width = masks.shape[1], masks.shape[3]
    return (mode == "drop" and width % 4 == 0 and 0 < num_instances <= MAX_WORD_INSTANCES
            and masks.data_ptr() % 4 == 0)


def _row_tiles(words_per_row: int, tile: int, kp: int) -> bool:
    """The word kernel's ROW_TILES: every tile of TILE / KP words lies in one image row."""
    return words_per_row % (tile // kp) == 0


_suppress_drop_words_kernel = triton.heuristics(
    {"ROW_TILES": lambda args: _row_tiles(args["words_per_row"], args["TILE"], args["KP"])}
)(_suppress_drop_words_jit)
_suppress_drop_words_kernel_tuned = triton.autotune(
    configs=_WORD_CONFIGS, key=["KP", "words_bucket", "ZERO_ONE"],
    prune_configs_by={"early_config_prune": _prune_word_configs})(_suppress_drop_words_kernel)
_suppress_overlap_kernel_tuned = triton.autotune(
    configs=_BYTE_CONFIGS, key=["KP", "pixels_bucket", "batch_bucket", "ARGMAX"]
)(_suppress_overlap_kernel)

# No config has a pre_hook (the direct launches below would skip it).
# The autotuners' picks, per autotuning key (the byte kernel's also per confidence dtype, as the
# autotuner keys it): once a key is tuned, its calls launch the picked config directly, without
# the autotuner's and heuristics' Python layers (host time a call, which bounded a plain call of
# "drop" at 1024 x 1024 on run 13's slow host, 121 us a call).
_WORD_PICKS: dict[tuple, triton.Config] = {}
_BYTE_PICKS: dict[tuple, triton.Config] = {}


def clear_tuning() -> None:
    """Forgets every tuned pick: the next call of each size class is tuned again."""
    for tuned in (_suppress_drop_words_kernel_tuned, _suppress_overlap_kernel_tuned):
        tuned.cache.clear()
    _WORD_PICKS.clear()
    _BYTE_PICKS.clear()


def byte_kernel_grid(meta: dict, batch: int, height: int, width: int) -> tuple[int, int]:
    """The byte kernel's grid for launch parameters `meta`: (programs per image, images). The strip
    design: one program per BLOCK_P columns of STRIP_ROWS rows; the others: pixel spans of
    BLOCK_P x WALK."""
    if meta.get("STRIP_ROWS", 0) > 0:
        return (triton.cdiv(width, meta["BLOCK_P"]) * triton.cdiv(height, meta["STRIP_ROWS"]), batch)
    return (triton.cdiv(height * width, meta["BLOCK_P"] * meta["WALK"]), batch)


def word_kernel_grid(meta: dict, batch: int, kp: int, height: int, words_per_row: int
                     ) -> tuple[int, int]:
    """The word kernel's grid for launch parameters `meta`: (programs per image, images). The strip
    design: one program per TILE / KP word columns of STRIP_ROWS rows; the tile design: spans of
    TILE / KP words."""
    block_w = meta["TILE"] // kp
    if meta.get("STRIP_ROWS", 0) > 0:
        return (triton.cdiv(words_per_row, block_w) * triton.cdiv(height, meta["STRIP_ROWS"]), batch)
    return (triton.cdiv(height * words_per_row, block_w), batch)


# The kernels' box state, kept zeroed by every launch, per (CUDA device, stream): one memset
# (a launch) less per call. Never created or used while a CUDA graph is captured (its memset would
# run only in replays). Each entry: the buffer, and its (state, arrivals) views per (images,
# instances), so that a call of a size seen before makes no tensor for them.
_BOX_STATES: dict[tuple[int, int], tuple[torch.Tensor, dict]] = {}


def _zeroed_box_state(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The zeroed box state of B x K masks, which the kernels leave zeroed: (state B K 4 int32,
    arrivals B int32). Fresh tensors on CPU and while capturing a CUDA graph, else views of the
    device and stream's kept buffer (grown as needed)."""
    batch, num_instances = masks.shape[:2]
    split = batch * num_instances * 4
    if not masks.is_cuda or torch.cuda.is_current_stream_capturing():
        state = torch.zeros(split + batch, dtype=torch.int32, device=masks.device)
        return state[:split], state[split:]
    device_index = masks.get_device()
    # the raw stream handle, as Triton reads it at launch (no Stream object built)
    key = (device_index, torch._C._cuda_getCurrentRawStream(device_index))
    entry = _BOX_STATES.get(key)
    if entry is not None:
        views = entry[1].get((batch, num_instances))
        if views is not None:
            return views
    if entry is None or entry[0].numel() < split + batch:
        entry = (torch.zeros(max(split + batch, 4096), dtype=torch.int32, device=masks.device), {})
        _BOX_STATES[key] = entry
    views = entry[0][:split], entry[0][split:split + batch]
    entry[1][(batch, num_instances)] = views
    return views


def _pick_or_tune(tuned, picks: dict, key: tuple, grid, args: tuple, **constexprs) -> triton.Config | None:
    """The recorded pick of size class `key`; or, the first time, None after launching through the
    autotuner `tuned` (which tunes, then runs its pick) and recording that pick in `picks`."""
    config = picks.get(key)
    if config is None:
        refuse_tuning_while_capturing("suppress_overlap", key)
        tuned[grid](*args, **constexprs)
        picks[key] = tuned.best_config
    return config


def _launch_words(config: triton.Config, args: tuple, batch: int, kp: int, height: int,
                  words_per_row: int, zero_one: bool) -> None:
    """The word kernel with one of `_WORD_CONFIGS`, as the autotuner launches it (every launch
    option of the config, and the heuristic's ROW_TILES)."""
    grid = word_kernel_grid(config.kwargs, batch, kp, height, words_per_row)
    _suppress_drop_words_jit[grid](*args, KP=kp, ZERO_ONE=zero_one,
                                   ROW_TILES=_row_tiles(words_per_row, config.kwargs["TILE"], kp),
                                   **config.all_kwargs())


def _launch_bytes(config: triton.Config, args: tuple, batch: int, height: int, width: int,
                  kp: int, argmax: bool) -> None:
    """The byte kernel with one of `_BYTE_CONFIGS`, as the autotuner launches it."""
    grid = byte_kernel_grid(config.kwargs, batch, height, width)
    _suppress_overlap_kernel[grid](*args, ARGMAX=argmax, KP=kp, **config.all_kwargs())


def suppress_overlap_triton(masks: torch.Tensor, confidence: torch.Tensor | None,
                            counts: torch.Tensor, mode: str, *, design: str | None = None,
                            blocks_per_program: int | None = None, word_tile: int | None = None,
                            config: triton.Config | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `suppress_overlap_reference` (same outputs), in one kernel launch.
    Overrides for tests (each makes the byte or word kernel run with a fixed launch):
    `design` ("tile" or "rows") with `blocks_per_program` (pixel blocks walked by one program of
    the tile design), or `word_tile` (words per program of the 4-pixel word kernel, a power of two
    >= KP), or `config`: one of the autotuner's configs (`_WORD_CONFIGS` runs the word kernel,
    `_BYTE_CONFIGS` the byte kernel). Otherwise the launch is chosen from the sizes, and tuned on
    the GPU (once per size class: later calls launch the pick directly)."""
    check_mode(mode)
    batch, num_instances, height, width = masks.shape
    check_counts(counts, batch)
    argmax = mode == "argmax"
    if argmax and (confidence is None or confidence.shape != masks.shape):
        raise ValueError("argmax overlap suppression needs a confidence tensor shaped like masks "
                         f"{tuple(masks.shape)}, got "
                         f"{None if confidence is None else tuple(confidence.shape)}")
    if design is not None and design not in DESIGNS:
        raise ValueError(f"overlap suppression design must be one of {DESIGNS}, got {design!r}")
    if masks.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"overlap suppression needs bool or uint8 masks, got {masks.dtype}")
    if num_instances > MAX_INSTANCES or height * width > MAX_PLANE_PIXELS:
        return suppress_overlap_reference(masks, confidence, counts, mode)
    if masks.numel() == 0:  # (the reference fails on H or W = 0; here: empty masks, zero boxes)
        boxes = torch.zeros((batch, num_instances, 4), dtype=torch.float32, device=masks.device)
        return torch.zeros_like(masks, dtype=torch.bool), boxes
    # Host time matters here (a plain call at 1024 x 1024 takes about as long on the host as
    # on the device), so a call makes only the tensors it needs: no-op conversions are skipped.
    if not masks.is_contiguous():
        masks = masks.contiguous()
    if counts.dtype != torch.int64 or counts.get_device() != masks.get_device():
        counts = counts.to(device=masks.device, dtype=torch.int64)
    if not counts.is_contiguous():
        counts = counts.contiguous()
    out = torch.empty_like(masks, dtype=torch.bool)  # B x K x H x W, bytes 0 / 1
    state, arrivals = _zeroed_box_state(masks)  # B K 4 and B int32, zeroed; left zeroed
    boxes = torch.empty((batch, num_instances, 4), dtype=torch.float32, device=masks.device)
    num_pixels = height * width
    kp = triton.next_power_of_2(num_instances)
    overridden = (design is not None or blocks_per_program is not None or word_tile is not None
                  or config is not None)
    words = word_tile is not None or (config is not None and "TILE" in config.kwargs)
    if word_tile is not None and (word_tile < kp or word_tile & (word_tile - 1)):
        raise ValueError(f"word_tile must be a power of two >= {kp} (KP), got {word_tile}")
    if words and not _use_words(masks, mode):
        raise ValueError("word_tile and word configs need mode 'drop', rows of a multiple of 4 "
                         f"pixels and at most {MAX_WORD_INSTANCES} instances, got mode {mode!r} "
                         f"and masks {tuple(masks.shape)}")
    if config is not None and not words and kp > MAX_TUNED_INSTANCES:
        raise ValueError(f"byte kernel configs are tuned for at most {MAX_TUNED_INSTANCES} "
                         f"instances, got {num_instances}")
    if words or (not overridden and _use_words(masks, mode)):
        words_per_row, num_words = width // 4, num_pixels // 4
        zero_one = masks.dtype == torch.bool  # bool storage: every byte 0 or 1
        words_bucket = _words_bucket(num_words, words_per_row, kp, _strip_aligned(words_per_row, masks, out))
        # flat int32 views: a contiguous tensor may carry any stride on a size-1 dimension,
        # which a dtype view refuses
        args = (masks.view(-1).view(torch.int32), counts, out.view(-1).view(torch.int32), state,
                arrivals, boxes, num_instances, words_per_row, num_words, words_bucket)
        if config is None and not INTERPRET and word_tile is None:
            config = _pick_or_tune(
                _suppress_drop_words_kernel_tuned, _WORD_PICKS, (kp, words_bucket, zero_one),
                lambda meta: word_kernel_grid(meta, batch, kp, height, words_per_row), args,
                KP=kp, ZERO_ONE=zero_one)
            if config is None:  # the autotuner ran it
                return out, boxes
        if config is None:  # the interpreter, or a fixed word tile
            tile = word_tile if word_tile is not None else max(kp, _INTERPRET_WORD_TILE)
            config = triton.Config({"TILE": tile}, num_warps=_NUM_WARPS)
        _launch_words(config, args, batch, kp, height, words_per_row, zero_one)
        return out, boxes
    masks_u8 = masks if masks.dtype == torch.uint8 else masks.view(torch.uint8)
    confidence = confidence.contiguous() if argmax else masks_u8  # not read in "drop" mode
    pixels_bucket, batch_bucket = (num_pixels - 1).bit_length(), (batch - 1).bit_length()
    args = (masks_u8, confidence, counts, out.view(torch.uint8), state, arrivals, boxes,
            num_instances, width, num_pixels, pixels_bucket, batch_bucket)
    if config is None and not INTERPRET and not overridden and kp <= MAX_TUNED_INSTANCES:
        pick_key = (kp, pixels_bucket, batch_bucket, argmax, confidence.dtype)
        config = _pick_or_tune(
            _suppress_overlap_kernel_tuned, _BYTE_PICKS, pick_key,
            lambda meta: byte_kernel_grid(meta, batch, height, width), args, ARGMAX=argmax, KP=kp)
        if config is None:  # the autotuner ran it
            return out, boxes
    if config is not None:
        _launch_bytes(config, args, batch, height, width, kp, argmax)
    elif design == "rows" or (design is None and blocks_per_program is None and not INTERPRET):
        # the GPU above KP = 64
        block_p = min(_ROWS_BLOCK_P, max(_MIN_BLOCK_P, triton.next_power_of_2(num_pixels)))
        grid = (triton.cdiv(num_pixels, block_p), batch)
        _suppress_overlap_kernel[grid](*args, ARGMAX=argmax, KP=kp, BLOCK_P=block_p, WALK=1,
                                       ROWS=True, CHUNK=_ROWS_CHUNK, UNROLL=_ROWS_UNROLL,
                                       num_warps=_ROWS_WARPS)
    else:
        block_p = min(max(_MIN_BLOCK_P, _TILE[mode] // kp),
                      max(_MIN_BLOCK_P, triton.next_power_of_2(num_pixels)))
        num_blocks = triton.cdiv(num_pixels, block_p)
        if blocks_per_program is None:
            blocks_per_program = min(_MAX_BLOCKS_PER_PROGRAM,
                                     max(1, num_blocks * batch // _TARGET_PROGRAMS))
        grid = (triton.cdiv(num_blocks, blocks_per_program), batch)
        _suppress_overlap_kernel[grid](*args, ARGMAX=argmax, KP=kp, BLOCK_P=block_p,
                                       WALK=blocks_per_program, ROWS=False, CHUNK=1, UNROLL=1,
                                       num_warps=_NUM_WARPS)
    return out, boxes

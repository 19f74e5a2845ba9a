"""Experiment: how close can "drop" overlap suppression on 4-pixel words get to copy bandwidth?
Variants, all on B=2, K=50, 1024x1024 (the benchmark's shape), counts (43, 50):
  flat_copy      1-D Triton copy of the same bytes (what Triton reaches on a plain copy)
  tile_copy      KP x BW tile load/store of the valid rows, no compute (the access pattern's ceiling)
  current        kernels.overlap word tile, autotuned (the baseline: stop 17's kernel in calls 1-3;
                 run today, whatever kernels/overlap.py holds)
  nobox          current minus the box fold (what the boxes cost)
  word2          the word kernel with packed box keys (x), one-row tiles (y), bool masks
  argmax strip2  the rows design over strips of rows, owner bits for the boxes
(calls 1-2 also ran K split in row groups, persistent and TMA versions, and a first strip design:
their kernels were dropped from this copy)
Run: python .exp/overlap_exp.py [--interpret-small]"""
import os
import sys
import time

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.getcwd())
from resam_kernels import overlap as ov  # noqa: E402

SMALL = "--small" in sys.argv
dev = "cuda" if torch.cuda.is_available() else "cpu"
BIG = ov.BIG


@triton.jit
def flat_copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = off < n
    tl.store(dst + off, tl.load(src + off, mask=m), mask=m)


@triton.jit
def tile_copy_kernel(src, dst, counts_ptr, K, num_words, KP: tl.constexpr, TILE: tl.constexpr):
    BW: tl.constexpr = TILE // KP
    image = tl.program_id(1).to(tl.int64)
    count = tl.minimum(tl.load(counts_ptr + image), K).to(tl.int32)
    word = tl.program_id(0) * BW + tl.arange(0, BW)
    inst = tl.arange(0, KP)
    offs = image * K * num_words + inst.to(tl.int64)[:, None] * num_words + word[None, :]
    inr = (word < num_words)[None, :]
    x = tl.load(src + offs, mask=(inst < count)[:, None] & inr, other=0)
    tl.store(dst + offs, x, mask=(inst < K)[:, None] & inr)


@triton.jit
def nobox_kernel(src, dst, counts_ptr, K, num_words, KP: tl.constexpr, TILE: tl.constexpr):
    BW: tl.constexpr = TILE // KP
    image = tl.program_id(1).to(tl.int64)
    count = tl.minimum(tl.load(counts_ptr + image), K).to(tl.int32)
    word = tl.program_id(0) * BW + tl.arange(0, BW)
    inst = tl.arange(0, KP)
    offs = image * K * num_words + inst.to(tl.int64)[:, None] * num_words + word[None, :]
    inr = (word < num_words)[None, :]
    raw = tl.load(src + offs, mask=(inst < count)[:, None] & inr, other=0)
    kept = ov._nonzero_bytes(raw)
    single = ov._zero_bytes(tl.sum(kept, axis=0) ^ 0x01010101)
    tl.store(dst + offs, kept & single[None, :], mask=(inst < K)[:, None] & inr)



@triton.jit
def _or(a, b):
    return a | b



@triton.jit
def word2_kernel(words_ptr, counts_ptr, out_ptr, state_ptr, arrivals_ptr, boxes_ptr, num_instances,
                 words_per_row, num_words, KP: tl.constexpr, TILE: tl.constexpr, ZERO_ONE: tl.constexpr,
                 ALIGNED: tl.constexpr = False):
    BW: tl.constexpr = TILE // KP
    image = tl.program_id(1).to(tl.int64)
    count = tl.minimum(tl.load(counts_ptr + image), num_instances).to(tl.int32)
    first_word = tl.program_id(0) * BW
    word = first_word + tl.arange(0, BW)
    in_range = word < num_words
    instance = tl.arange(0, KP)
    valid = instance < count
    real = instance < num_instances
    plane = image * num_instances * num_words + instance.to(tl.int64) * num_words
    offsets = plane[:, None] + word[None, :]
    raw = tl.load(words_ptr + offsets, mask=valid[:, None] & in_range[None, :], other=0)
    if ZERO_ONE:
        kept = raw
    else:
        kept = ov._nonzero_bytes(raw)
    single = ov._zero_bytes(tl.sum(kept, axis=0) ^ 0x01010101)
    survives = kept & single[None, :]
    tl.store(out_ptr + offsets, survives, mask=real[:, None] & in_range[None, :])
    lanes = (survives | (survives >> 7) | (survives >> 14) | (survives >> 21)) & 0xF
    hit = lanes != 0
    row = word // words_per_row
    column = word - row * words_per_row
    key_first = tl.min(tl.where(hit, (column[None, :] << 4) | (lanes & -lanes), BIG), axis=1)
    key_last = tl.max(tl.where(hit, ((column[None, :] + 1) << 4) | lanes, 0), axis=1)
    touched = real & (key_last > 0)
    low = key_first & 15
    high = key_last & 15
    x0 = (key_first >> 4) * 4 + (low >= 2).to(tl.int32) + (low >= 4).to(tl.int32) + (low >= 8).to(tl.int32)
    x1 = ((key_last >> 4) - 1) * 4 + (high >= 2).to(tl.int32) + (high >= 4).to(tl.int32) + (high >= 8).to(tl.int32) + 1
    top_row = first_word // words_per_row
    last_row = (tl.minimum(first_word + BW, num_words) - 1) // words_per_row
    if ALIGNED:
        y0 = tl.zeros([KP], dtype=tl.int32) + top_row
        y1 = y0 + 1
    elif top_row == last_row:
        y0 = tl.zeros([KP], dtype=tl.int32) + top_row
        y1 = y0 + 1
    else:
        y0 = tl.min(tl.where(hit, row[None, :], BIG), axis=1)
        y1 = tl.max(tl.where(hit, row[None, :] + 1, 0), axis=1)
    ov._fold_boxes(state_ptr, image, num_instances, instance, touched, x0, y0, x1, y1)
    ov._finish_image(state_ptr, arrivals_ptr, boxes_ptr, image, num_instances, KP)


@triton.jit
def argmax_strip2_kernel(masks, conf, dst, counts_ptr, state, arrivals, boxes, K, width, height,
                         KP: tl.constexpr, BP: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr,
                         UNROLL: tl.constexpr):
    image = tl.program_id(1).to(tl.int64)
    count = tl.minimum(tl.load(counts_ptr + image), K).to(tl.int32)
    strips = tl.cdiv(width, BP)
    strip = tl.program_id(0) % strips
    row0 = (tl.program_id(0) // strips) * ROWS
    num_pixels = height * width
    image_base = image * K * num_pixels
    col = strip * BP + tl.arange(0, BP)
    incol = col < width
    inst = tl.arange(0, KP)
    union = tl.zeros([BP], dtype=tl.int64)
    y0 = tl.full([KP], BIG, dtype=tl.int32)
    y1 = tl.zeros([KP], dtype=tl.int32)
    for r in tl.range(0, ROWS):
        row = row0 + r
        in_range = incol & (row < height)
        pixel = row * width + col
        owner = tl.zeros([BP], dtype=tl.int32)
        best = tl.full([BP], float("-inf"), dtype=tl.float32)
        keepers = (tl.load(masks + image_base + pixel, mask=in_range & (count > 0), other=0) != 0).to(tl.int32)
        for k0 in range(0, count, UNROLL):
            kept0, score0 = ov._instance_row(masks, conf, image_base, k0, count, num_pixels, pixel, in_range, True)
            kept1, score1 = ov._instance_row(masks, conf, image_base, k0 + 1, count, num_pixels, pixel, in_range, True)
            kept2, score2 = ov._instance_row(masks, conf, image_base, k0 + 2, count, num_pixels, pixel, in_range, True)
            kept3, score3 = ov._instance_row(masks, conf, image_base, k0 + 3, count, num_pixels, pixel, in_range, True)
            if UNROLL == 8:
                kept4, score4 = ov._instance_row(masks, conf, image_base, k0 + 4, count, num_pixels, pixel, in_range, True)
                kept5, score5 = ov._instance_row(masks, conf, image_base, k0 + 5, count, num_pixels, pixel, in_range, True)
                kept6, score6 = ov._instance_row(masks, conf, image_base, k0 + 6, count, num_pixels, pixel, in_range, True)
                kept7, score7 = ov._instance_row(masks, conf, image_base, k0 + 7, count, num_pixels, pixel, in_range, True)
            owner, best, keepers = ov._take_row(owner, best, keepers, kept0, score0, k0, True)
            owner, best, keepers = ov._take_row(owner, best, keepers, kept1, score1, k0 + 1, True)
            owner, best, keepers = ov._take_row(owner, best, keepers, kept2, score2, k0 + 2, True)
            owner, best, keepers = ov._take_row(owner, best, keepers, kept3, score3, k0 + 3, True)
            if UNROLL == 8:
                owner, best, keepers = ov._take_row(owner, best, keepers, kept4, score4, k0 + 4, True)
                owner, best, keepers = ov._take_row(owner, best, keepers, kept5, score5, k0 + 5, True)
                owner, best, keepers = ov._take_row(owner, best, keepers, kept6, score6, k0 + 6, True)
                owner, best, keepers = ov._take_row(owner, best, keepers, kept7, score7, k0 + 7, True)
        owned = (keepers == 1) & in_range
        for start in range(0, K, CHUNK):
            instance = start + tl.arange(0, CHUNK)
            survives = (instance[:, None] == owner[None, :]) & owned[None, :]
            offsets = image_base + instance.to(tl.int64)[:, None] * num_pixels + pixel[None, :]
            tl.store(dst + offsets, survives.to(tl.uint8), mask=(instance < K)[:, None] & in_range[None, :])
        ownbit = tl.where(owned, tl.full([BP], 1, dtype=tl.int64) << owner.to(tl.int64), 0)
        union = union | ownbit
        present = tl.reduce(ownbit, 0, _or)
        here = ((present >> inst.to(tl.int64)) & 1) != 0
        y0 = tl.minimum(y0, tl.where(here, row, BIG))
        y1 = tl.maximum(y1, tl.where(here, row + 1, 0))
    has = ((union[None, :] >> inst.to(tl.int64)[:, None]) & 1) != 0
    x0 = tl.min(tl.where(has, col[None, :], BIG), axis=1)
    x1 = tl.max(tl.where(has, col[None, :] + 1, 0), axis=1)
    ov._fold_boxes(state, image, K, inst, (inst < K) & (x1 > 0), x0, y0, x1, y1)
    ov._finish_image(state, arrivals, boxes, image, K, KP)


def argmax_main(keep, confidence, counts, copy_bw, nsm, bench_fn):
    B, K, H, W = keep.shape
    KP, NP = 64, H * W
    ref_masks, ref_boxes = ov.suppress_overlap_reference(keep, confidence, counts, "argmax")
    res = ov.suppress_overlap_triton(keep, confidence, counts, "argmax")
    print("argmax current autotuned correct:", torch.equal(res[0], ref_masks) and torch.equal(res[1], ref_boxes))
    bench_fn("argmax current autotuned", lambda: ov.suppress_overlap_triton(keep, confidence, counts, "argmax"))
    masks_u8 = keep.view(torch.uint8)
    out = torch.empty_like(masks_u8)
    state = torch.zeros(B * K * 4 + B, dtype=torch.int32, device=dev)
    arrivals = state[B * K * 4:]
    boxes = torch.empty(B, K, 4, device=dev)

    def check_full():
        assert torch.equal(out.view(torch.bool), ref_masks), "masks differ"
        assert torch.equal(boxes, ref_boxes), "boxes differ"
        assert not state.any(), "state not re-zeroed"
    for bp in ((64, 128) if SMALL else (512, 1024, 2048)):
        for rows in ((1, 2) if SMALL else (1, 2, 4, 8)):
            for warps in ((4,) if SMALL else (4, 8)):
                for unroll in (4, 8):
                    if bp == 2048 and warps == 4:
                        continue
                    grid = (triton.cdiv(W, bp) * triton.cdiv(H, rows), B)

                    def run(bp=bp, rows=rows, warps=warps, unroll=unroll, grid=grid):
                        argmax_strip2_kernel[grid](masks_u8, confidence, out, counts, state, arrivals, boxes,
                                                   K, W, H, KP=KP, BP=bp, ROWS=rows, CHUNK=8, UNROLL=unroll,
                                                   num_warps=warps)
                    bench_fn(f"argmax strip2 BP {bp} R{rows} w{warps} u{unroll}", run, check=check_full)


def main():
    B, K = 2, 50
    H = 64 if SMALL else 1024
    W = int(os.environ.get('EXP_W', 64 if SMALL else 1024))
    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(B, K, H, W, device=dev, generator=g) * 4
    keep = torch.sigmoid(logits) > 0.93  # scattered masks, some overlaps
    confidence = torch.rand(B, K, H, W, device=dev, generator=g)
    del logits
    counts = torch.tensor([K - 7, K], device=dev)
    ref_masks, ref_boxes = ov.suppress_overlap_reference(keep, None, counts, "drop")
    words = keep.view(torch.uint8).view(torch.int32)  # B x K x H x W/4
    NW = H * W // 4
    KP = 64
    out = torch.empty_like(words)
    state = torch.zeros(B * K * 4 + B, dtype=torch.int32, device=dev)
    arrivals = state[B * K * 4:]
    boxes = torch.empty(B, K, 4, device=dev)
    nbytes = 2 * keep.numel() + B * K * 16
    if dev == "cuda":
        src = torch.empty(1 << 28, device=dev)
        dst = torch.empty_like(src)
        copy_ms = triton.testing.do_bench(lambda: dst.copy_(src))
        copy_bw = 2 * src.numel() * 4 / copy_ms / 1e6
        del src, dst
        print(f"{torch.cuda.get_device_name()}: copy {copy_bw:.1f} GB/s", flush=True)
        nsm = torch.cuda.get_device_properties(0).multi_processor_count
    else:
        copy_bw, nsm = 1.0, 4

    def bench(name, fn, check=None, nbytes=nbytes):
        try:
            fn()
            if check is not None:
                check()
            if dev == "cuda":
                ms = triton.testing.do_bench(fn, warmup=25, rep=100)
                print(f"{name:44s} {ms:8.4f} ms {100 * nbytes / ms / 1e6 / copy_bw:6.1f}% copy",
                      flush=True)
            else:
                print(f"{name:44s} ok", flush=True)
        except Exception as error:  # keep going: an experiment
            print(f"{name:44s} FAILED {type(error).__name__}: {str(error)[:300]}", flush=True)

    def check_full():
        assert torch.equal(out.view(torch.bool).view(B, K, H, W), ref_masks), "masks differ"
        assert torch.equal(boxes, ref_boxes), "boxes differ"
        assert not state.any(), "state not re-zeroed"

    def check_masks():
        assert torch.equal(out.view(torch.bool).view(B, K, H, W), ref_masks), "masks differ"

    if "--argmax-first" in sys.argv:
        argmax_main(keep, confidence, counts, copy_bw, nsm,
                    lambda name, fn, check=None: bench(name, fn, check, nbytes=6 * keep.numel() + B * K * 16))
    flat_src = words.reshape(-1)
    flat_dst = out.view(-1)
    bench("torch copy same bytes (src->dst)", lambda: flat_dst.copy_(flat_src))
    for block, warps in ((1024, 4),):
        bench(f"flat_copy BLOCK {block} w{warps}", lambda block=block, warps=warps: flat_copy_kernel[
            (triton.cdiv(flat_src.numel(), block),)](flat_src, flat_dst, flat_src.numel(), BLOCK=block,
                                                    num_warps=warps))
    tiles = (1024, 2048, 4096, 8192) if not SMALL else (1024,)
    for tile in (4096,):
        for warps in (4, 8):
            bench(f"tile_copy TILE {tile} w{warps}", lambda tile=tile, warps=warps: tile_copy_kernel[
                (triton.cdiv(NW, tile // KP), B)](words, out, counts, K, NW, KP=KP, TILE=tile,
                                                  num_warps=warps))
    for cfg in ov._WORD_CONFIGS[1:2]:
        bench(f"current TILE {cfg.kwargs['TILE']} w{cfg.num_warps}",
              lambda cfg=cfg: ov.suppress_overlap_triton(keep, None, counts, "drop", config=cfg),
              check=lambda: None)
    res = ov.suppress_overlap_triton(keep, None, counts, "drop")
    print("current autotuned correct:", torch.equal(res[0], ref_masks) and torch.equal(res[1], ref_boxes))
    bench("current autotuned", lambda: ov.suppress_overlap_triton(keep, None, counts, "drop"))
    for tile in (4096,):
        for warps in (4,):
            bench(f"nobox TILE {tile} w{warps}", lambda tile=tile, warps=warps: nobox_kernel[
                (triton.cdiv(NW, tile // KP), B)](words, out, counts, K, NW, KP=KP, TILE=tile,
                                                  num_warps=warps), check=check_masks)
    for tile in ((512, 1024) if SMALL else (2048, 4096, 8192)):
        for warps in (4, 8):
            for zero_one, aligned in ((True, False), (False, False), (True, True)):
                if SMALL and aligned and W % (4 * tile // KP):
                    continue
                def run(tile=tile, warps=warps, zero_one=zero_one, aligned=aligned):
                    word2_kernel[(triton.cdiv(NW, tile // KP), B)](words, counts, out, state, arrivals, boxes, K,
                                                                   W // 4, NW, KP=KP, TILE=tile, ZERO_ONE=zero_one,
                                                                   ALIGNED=aligned, num_warps=warps)
                bench(f"word2 TILE {tile} w{warps} {'bool' if zero_one else 'bytes'}{' aligned' if aligned else ''}",
                      run, check=check_full)
    if "--argmax-first" not in sys.argv:
        argmax_main(keep, confidence, counts, copy_bw, nsm,
                    lambda name, fn, check=None: bench(name, fn, check, nbytes=6 * keep.numel() + B * K * 16))


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"done in {time.time() - t0:.1f} s")

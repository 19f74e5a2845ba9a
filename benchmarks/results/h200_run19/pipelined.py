"""H200 run 19, calls 3-4's experiment: the word kernel's strip design with its row loop software-pipelined
by Triton (`tl.range(..., num_stages=STAGES)`: the loads of the next STAGES - 1 rows go to shared
memory by cp.async, not to registers) instead of the product's prefetch of 1-2 rows in registers.
Call 2's Nsight Compute profile of the pick: 128 registers a thread (4 programs an SM, 25%
occupancy), 0.55 eligible warps a scheduler, and a pure copy in the strip's pattern at 78.5-79.3% of
the copy bandwidth alone: too few bytes in flight. Each variant is checked against the reference
(masks and boxes), then timed as a kernel launch on preallocated buffers, alone and back to back.
python3 benchmarks/results/h200_run19/pipelined.py OUT_DIR [--cpu-smoke]"""

from __future__ import annotations

import json
import os
import sys

if "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from resam_kernels import overlap  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from resam_kernels.overlap import _finish_image, _fold_strip_boxes, _single_keeper_lanes, _strip_place  # noqa: E402


@triton.jit
def _pipelined_kernel(words_ptr, counts_ptr, out_ptr, state_ptr, arrivals_ptr, boxes_ptr, batch, num_instances,
                      words_per_row, num_words, KP: tl.constexpr, TILE: tl.constexpr,
                      STRIP_ROWS: tl.constexpr, STAGES: tl.constexpr, PACKED: tl.constexpr,
                      IMAGES: tl.constexpr, FINISH: tl.constexpr):
    """The strip design with the row loop software-pipelined by Triton (tl.range num_stages: the
    loads of later rows go to shared memory by cp.async) instead of a prefetch in registers.
    IMAGES: images per program (grid dim 1: cdiv(B, IMAGES)), one after the other, so that every
    program moves the planes of the same images (balanced when an image has fewer valid planes).
    FINISH 0: no last-program box finish (boxes wrong: timing only)."""
    BLOCK_W: tl.constexpr = TILE // KP
    first_row, end_row, column, in_columns = _strip_place(words_per_row, num_words, BLOCK_W, STRIP_ROWS)
    instance = tl.arange(0, KP)
    real = instance < num_instances
    first_image = tl.program_id(1) * IMAGES
    for image_index in range(0, tl.minimum(IMAGES, batch - first_image)):
        image = (first_image + image_index).to(tl.int64)
        count = tl.maximum(tl.minimum(tl.load(counts_ptr + image), num_instances), 0).to(tl.int32)
        valid = instance < count
        plane = image * num_instances * num_words + instance.to(tl.int64) * num_words  # KP
        surviving_words = tl.zeros([KP, BLOCK_W], dtype=tl.int32)
        surviving_rows = tl.zeros([KP, BLOCK_W], dtype=tl.int32)
        for step in tl.range(0, STRIP_ROWS, num_stages=STAGES):
            row = first_row + step
            in_range = in_columns & (row < end_row)
            offsets = plane[:, None] + (row * words_per_row + column)[None, :]
            raw = tl.load(words_ptr + offsets, mask=valid[:, None] & in_range[None, :], other=0)
            survives = _single_keeper_lanes(raw, True)
            tl.store(out_ptr + offsets, survives, mask=real[:, None] & in_range[None, :])
            if PACKED:
                surviving_words = surviving_words | survives | tl.where(survives != 0, 1 << (1 + step + step // 7), 0)
            else:
                surviving_words = surviving_words | survives
                surviving_rows = surviving_rows | tl.where(survives != 0, 1 << step, 0)
        if PACKED:
            lane_words = surviving_words & 0x01010101
            surviving_rows = harness.packed_rows(surviving_words)
        else:
            lane_words = surviving_words
        _fold_strip_boxes(state_ptr, image, num_instances, instance, real, column, first_row, lane_words,
                          surviving_rows)
        if FINISH:
            _finish_image(state_ptr, arrivals_ptr, boxes_ptr, image, num_instances, KP)


def main() -> int:
    smoke, out_dir, run = harness.start(sys.argv)
    device, name, timed, copy_gbps = run.device, run.name, run.timed, run.copy_gbps
    batch, num_instances, height, width = run.shape
    buffers = harness.buffers(run)
    masks, out, state, boxes = buffers.masks, buffers.out, buffers.state, buffers.boxes
    kp, words_per_row, num_words = buffers.kp, buffers.words_per_row, buffers.num_words
    counts_list = [num_instances - 7, num_instances]
    counts = torch.tensor(counts_list, device=device)
    num_bytes = (sum(counts_list) + batch * num_instances) * height * width + batch * num_instances * 16
    want_out, want_boxes = overlap.suppress_overlap_reference(masks, None, counts, "drop")
    result = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
              "copy_gbps": copy_gbps, "shape": list(masks.shape), "counts": counts_list, "rows": []}
    same = torch.ones(num_bytes // 8, dtype=torch.int32, device=device)
    same_out = torch.empty_like(same)
    pick = triton.Config({"TILE": 2048, "STRIP_ROWS": 32, "PREFETCH": 2}, num_warps=4)
    rows = [("torch copy of the same bytes", lambda: same_out.copy_(same)),
            ("product pick (2048, 32, 2, 4)",
             lambda: overlap.suppress_overlap_triton(masks, None, counts, "drop", config=pick))]
    # (TILE, warps, strip rows, stages, packed, images per program, finish)
    variants = [(2048, 4, 32, 3, 0, 1, 1), (2048, 4, 32, 3, 0, 1, 0), (2048, 4, 16, 3, 0, 2, 1),
                (2048, 4, 16, 3, 0, 2, 0), (2048, 4, 16, 2, 0, 2, 1), (2048, 4, 16, 4, 0, 2, 1),
                (2048, 4, 8, 3, 0, 2, 1), (2048, 4, 32, 3, 0, 2, 1), (2048, 4, 16, 3, 1, 2, 1),
                (1024, 2, 16, 3, 0, 2, 1), (4096, 8, 16, 3, 0, 2, 1)]
    for tile, warps, strip_rows, stages, packed, images, finish in variants:
        if smoke:
            tile = max(kp, tile // 32)
        grid = (triton.cdiv(words_per_row, tile // kp) * triton.cdiv(height, strip_rows), triton.cdiv(batch, images))

        def launch(grid=grid, tile=tile, warps=warps, strip_rows=strip_rows, stages=stages, packed=packed,
                   images=images, finish=finish):
            return _pipelined_kernel[grid](masks.view(-1).view(torch.int32), counts, out.view(-1).view(torch.int32),
                                           state[:-batch], state[-batch:], boxes, batch, num_instances,
                                           words_per_row, num_words, KP=kp, TILE=tile, STRIP_ROWS=strip_rows,
                                           STAGES=stages, PACKED=packed, IMAGES=images, FINISH=finish,
                                           num_warps=warps, num_stages=stages)
        boxes.fill_(-1.0)
        compiled = launch()
        if not torch.equal(out, want_out) or (finish and not torch.equal(boxes, want_boxes)):
            raise AssertionError(f"variant {tile, warps, strip_rows, stages, packed, images} differs from the reference")
        if not finish:
            state.zero_()  # (left with the folds)
        label = (f"pipelined TILE {tile} warps {warps} rows {strip_rows} stages {stages} packed {packed} "
                 f"images/program {images} finish {finish}")
        if not smoke:
            ptx = compiled.asm["ptx"]
            label += f" (regs {compiled.n_regs}, spills {compiled.n_spills}, smem {compiled.metadata.shared}, " \
                     f"cp.async {ptx.count('cp.async')})"
        rows.append((label, launch))
    for label, fn in rows:
        alone, together = timed(fn)
        state.zero_()
        pct = lambda ms: 100 * num_bytes / (ms * 1e-3) / 1e9 / copy_gbps if ms else 0.0  # noqa: E731
        result["rows"].append({"variant": label, "alone_ms": alone, "alone_pct": pct(alone),
                               "b2b_ms": together, "b2b_pct": pct(together)})
        print(f"{label:110s} alone {alone:.4f} ms {pct(alone):5.1f}% | b2b {together:.4f} ms {pct(together):5.1f}%",
              flush=True)
        with open(os.path.join(out_dir, "pipelined.json"), "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

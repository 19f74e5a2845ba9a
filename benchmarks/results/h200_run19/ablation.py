"""H200 run 19's experiment: where the time of "drop" overlap suppression goes at 2 x 50 x 1024 x 1024
(bool masks), for the word kernel's strip design (the pick, TILE 2048, 32 rows, 2 rows in flight,
4 warps). A copy of that design with switches, each variant timed as a kernel launch on
preallocated buffers, alone (`do_bench`: L2 cleared before every call) and back to back
(`do_bench_cudagraph`):
- COUNT=0: the strip reads and writes the same bytes without counting (a copy in its pattern);
- BOXES=0: no box work; 1: the boxes accumulated and folded, no last-program finish; 2: all of it
  (the product's kernel); 3: no accumulation a row, the epilogue (reductions and folds) on the last
  row only (boxes wrong: timing only);
- PACKED=1: one accumulator per element instead of two: the rows with a survivor as bits in the
  7 free bits of each byte lane of the surviving words (at most 28 rows);
- counts (43, 50), the benchmark's, and (50, 50): the cost of one image having fewer planes to read.
Variants with BOXES=2 are checked against the reference first (masks and boxes). A copy of the
same bytes (torch) is timed both ways too. Run from the repository root with resam_kernels
importable (gpu_checks.sh's PYTHONPATH): python3 benchmarks/results/h200_run19/ablation.py OUT_DIR
(--cpu-smoke: tiny masks in the interpreter, to test this script)."""

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
from resam_kernels.overlap import (_finish_image, _fold_strip_boxes, _single_keeper_lanes, _strip_place,  # noqa: E402
                                   _word_strip_load)


@triton.jit
def _ablation_kernel(words_ptr, counts_ptr, out_ptr, state_ptr, arrivals_ptr, boxes_ptr, num_instances,
                     words_per_row, num_words, KP: tl.constexpr, TILE: tl.constexpr,
                     STRIP_ROWS: tl.constexpr, COUNT: tl.constexpr, BOXES: tl.constexpr,
                     PACKED: tl.constexpr):
    image = tl.program_id(1).to(tl.int64)
    count = tl.maximum(tl.minimum(tl.load(counts_ptr + image), num_instances), 0).to(tl.int32)
    BLOCK_W: tl.constexpr = TILE // KP
    first_row, end_row, column, in_columns = _strip_place(words_per_row, num_words, BLOCK_W, STRIP_ROWS)
    instance = tl.arange(0, KP)  # KP
    valid = instance < count
    real = instance < num_instances
    plane = image * num_instances * num_words + instance.to(tl.int64) * num_words  # KP
    surviving_words = tl.zeros([KP, BLOCK_W], dtype=tl.int32)
    surviving_rows = tl.zeros([KP, BLOCK_W], dtype=tl.int32)
    raw = _word_strip_load(words_ptr, plane, first_row, column, in_columns, valid, end_row,
                           words_per_row, False)
    ahead = _word_strip_load(words_ptr, plane, first_row + 1, column, in_columns, valid, end_row,
                             words_per_row, False)
    survives = raw  # (the last row's survivors after the loop)
    for step in range(0, STRIP_ROWS):
        row = first_row + step
        next_ahead = _word_strip_load(words_ptr, plane, row + 2, column, in_columns, valid, end_row,
                                      words_per_row, False)
        if COUNT:
            survives = _single_keeper_lanes(raw, True)
        else:
            survives = raw
        in_range = in_columns & (row < end_row)
        offsets = plane[:, None] + (row * words_per_row + column)[None, :]
        tl.store(out_ptr + offsets, survives, mask=real[:, None] & in_range[None, :])
        raw = ahead
        ahead = next_ahead
        if (BOXES > 0) & (BOXES < 3):
            if PACKED:
                row_bit = 1 << (1 + step + step // 7)
                surviving_words = surviving_words | survives | tl.where(survives != 0, row_bit, 0)
            else:
                surviving_words = surviving_words | survives
                surviving_rows = surviving_rows | tl.where(survives != 0, 1 << step, 0)
    if BOXES == 3:  # the epilogue on the last row's survivors only (no accumulation a row)
        surviving_words = survives
        surviving_rows = tl.where(survives != 0, 1, 0)
    if BOXES > 0:
        if PACKED:
            lane_words = surviving_words & 0x01010101
            surviving_rows = harness.packed_rows(surviving_words)
        else:
            lane_words = surviving_words
        _fold_strip_boxes(state_ptr, image, num_instances, instance, real, column, first_row, lane_words,
                          surviving_rows)
    if BOXES == 2:
        _finish_image(state_ptr, arrivals_ptr, boxes_ptr, image, num_instances, KP)


def main() -> int:
    smoke, out_dir, run = harness.start(sys.argv)
    device, name, timed, copy_gbps = run.device, run.name, run.timed, run.copy_gbps
    batch, num_instances, height, width = run.shape
    buffers = harness.buffers(run)
    masks, out, state, boxes = buffers.masks, buffers.out, buffers.state, buffers.boxes
    kp, words_per_row, num_words = buffers.kp, buffers.words_per_row, buffers.num_words
    tile = 2048 if not smoke else 64
    out = torch.empty_like(masks)
    state = torch.zeros(batch * num_instances * 4 + batch, dtype=torch.int32, device=device)
    boxes = torch.empty(batch, num_instances, 4, dtype=torch.float32, device=device)
    result = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
              "copy_gbps": copy_gbps, "shape": list(masks.shape), "rows": []}
    for counts_list in ([num_instances - 7, num_instances], [num_instances, num_instances]):
        counts = torch.tensor(counts_list, device=device)
        # valid planes read, every plane written, boxes written (bench_kernels.overlap_bytes)
        num_bytes = (sum(counts_list) + batch * num_instances) * height * width + batch * num_instances * 16
        same = torch.ones(num_bytes // 8, dtype=torch.int32, device=device)
        same_out = torch.empty_like(same)
        rows = [("torch copy of the same bytes", lambda: same_out.copy_(same))]
        for strip_rows, count, boxes_level, packed in ((32, 0, 0, 0), (32, 1, 0, 0), (32, 1, 3, 0), (32, 1, 1, 0),
                                                       (32, 1, 2, 0), (28, 1, 2, 1), (16, 1, 2, 1),
                                                       (28, 1, 2, 0), (16, 1, 2, 0), (16, 1, 0, 0)):
            grid = (triton.cdiv(words_per_row, tile // kp) * triton.cdiv(height, strip_rows), batch)

            def launch(grid=grid, strip_rows=strip_rows, count=count, boxes_level=boxes_level, packed=packed):
                _ablation_kernel[grid](masks.view(-1).view(torch.int32), counts, out.view(-1).view(torch.int32),
                                       state[:-batch], state[-batch:], boxes, num_instances, words_per_row,
                                       num_words, KP=kp, TILE=tile, STRIP_ROWS=strip_rows, COUNT=count,
                                       BOXES=boxes_level, PACKED=packed, num_warps=4)
            if boxes_level == 2:
                state.zero_()  # (BOXES=1 leaves its folds there)
                launch()
                want_out, want_boxes = overlap.suppress_overlap_reference(masks, None, counts, "drop")
                if not (torch.equal(out, want_out) and torch.equal(boxes, want_boxes)):
                    raise AssertionError(f"variant {strip_rows, count, boxes_level, packed} differs")
            rows.append((f"strip {strip_rows} rows COUNT={count} BOXES={boxes_level} PACKED={packed}", launch))
        for label, fn in rows:
            alone, together = timed(fn)
            pct = lambda ms: 100 * num_bytes / (ms * 1e-3) / 1e9 / copy_gbps if ms else 0.0  # noqa: E731
            result["rows"].append({"counts": counts_list, "variant": label, "alone_ms": alone,
                                   "alone_pct": pct(alone), "b2b_ms": together, "b2b_pct": pct(together)})
            print(f"counts {counts_list} {label:50s} alone {alone:.4f} ms {pct(alone):5.1f}% | "
                  f"b2b {together:.4f} ms {pct(together):5.1f}%", flush=True)
            with open(os.path.join(out_dir, "ablation.json"), "w") as handle:
                json.dump(result, handle, indent=2)
        state.zero_()
    return 0


if __name__ == "__main__":
    sys.exit(main())

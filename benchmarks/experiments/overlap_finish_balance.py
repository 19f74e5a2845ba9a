"""Prepared for the next GPU run (written in stop 34 on a CPU machine, not yet run on a GPU): the two
candidates H200 run 19 left for a plain "drop" call at 2 x 50 x 1024 x 1024 (76.5% of the copy
bandwidth; 80% needs 0.0597 ms), on the product's pick, the pipelined strip (TILE 2048, 32 rows,
3 stages, 4 warps):

- FINISH: how a program tells the image's last one that its boxes are folded. 1 is the product's
  (`_finish_image`: a barrier, then an acquire-release arrival; the release waits until every
  store of the program, its masks included, is performed, and run 19 measured the finish at
  1.9 us). 2 orders only what the finish needs: the arrival's address depends on the values the
  program's box atomics returned (a reduction over the whole program, so every thread's atomics
  have been performed at L2 before the one arrival is issued), the arrival is relaxed, and the
  last program reads and zeroes the state with atomic exchanges (performed at L2 too). 0: no
  finish (boxes not written; the floor). 2 relies on the hardware's ordering of a dependent
  atomic after the atomics it depends on, which the PTX memory model does not promise for relaxed
  operations. Its fold is one atomic over the KP x 4 coordinates (the product's fold is four,
  whose returned values it does not use).
- BALANCE: run 19 measured 2 points lost because image 0 has 7 fewer planes to read (counts 43
  and 50) while every program moves one image's strip of 32 rows: the image-0 programs end first.
  BALANCE 1 gives each image a share of R programs a column strip in proportion to the planes it
  moves (its valid planes read + all K written), computed on the device from the counts (no
  host sync), every image keeping cdiv(H, STRIP_ROWS) places at least so that no program has more
  than STRIP_ROWS rows (at most 32: one bit a row in the box fold), and each program floor(u H / n)
  to floor((u + 1) H / n) rows of its image. At this shape R = 64 places a column strip are the
  product's 512 programs; 66 fill the 528 program slots of a 132-SM H100/H200 at 4 programs an SM.

Every variant is checked against `suppress_overlap_reference` (masks and, with a finish, boxes and
the state left zeroed) after its first launch, then timed as a kernel launch on preallocated buffers, alone
(`do_bench`) and back to back (`do_bench_cudagraph`), with run 19's harness; then each variant with
a finish is launched RACE_LAUNCHES more times on two mask sets in turn (the masks and their mirror
image), each launch checked, which can catch a race of the finish but not prove there is none. Registers and spills
come from the compiled kernel on the GPU. Run from the repository root with resam_kernels
importable (as run 19's run.sh does): python3 benchmarks/experiments/overlap_finish_balance.py
OUT_DIR [--cpu-smoke] (--cpu-smoke: tiny masks in Triton's interpreter, to test this script)."""

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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "results", "h200_run19"))
import harness  # noqa: E402
from resam_kernels.overlap import (BIG, _finish_image_of, _fold_strip_boxes, _strip_boxes,  # noqa: E402
                                   _word_strip_load, _word_strip_store, _write_boxes)


@triton.jit
def _fold_boxes_returning(state_ptr, image, num_instances, instance, touched, x0, y0, x1, y1, KP: tl.constexpr):
    """`overlap._fold_boxes` as one atomic max over the KP x 4 coordinates, returning a token (an
    int32 >= 0: the state holds no negative value) that depends on every value it returned,
    reduced over the whole program: it exists only once every thread's atomics are back."""
    # join(join(a, c), join(b, d))[k, i, j] is the (2 i + j)-th of a, b, c, d
    coordinates = tl.reshape(tl.join(tl.join(-x0 + BIG, x1), tl.join(-y0 + BIG, y1)), [KP, 4])  # KP x 4
    ptrs = state_ptr + (image * num_instances + instance)[:, None] * 4 + tl.arange(0, 4)[None, :]  # KP x 4
    old = tl.atomic_max(ptrs, coordinates, mask=touched[:, None], sem="relaxed")
    return tl.min(tl.min(tl.where(touched[:, None], old, BIG), axis=1), axis=0)


@triton.jit
def _fold_rows(state_ptr, image, num_instances, instance, real, column, first_row, surviving_words,
               surviving_rows, DEPENDENT: tl.constexpr, KP: tl.constexpr):
    """`overlap._fold_strip_boxes`; with DEPENDENT, through `_fold_boxes_returning` (-> token)."""
    if DEPENDENT:
        touched, x0, y0, x1, y1 = _strip_boxes(real, column, first_row, surviving_words, surviving_rows)
        return _fold_boxes_returning(state_ptr, image, num_instances, instance, touched, x0, y0, x1, y1, KP)
    _fold_strip_boxes(state_ptr, image, num_instances, instance, real, column, first_row, surviving_words,
                      surviving_rows)
    return 0


@triton.jit
def _finish_dependent(state_ptr, arrivals_ptr, boxes_ptr, image, num_instances, expected, token,
                      KP: tl.constexpr):
    """FINISH 2: the arrival's address depends on `token` (never negative, so always the image's
    counter); the last of `expected` programs reads and zeroes the state by atomic exchange and
    writes the float32 boxes (empty -> zeros)."""
    arrived = tl.atomic_add(arrivals_ptr + image + tl.where(token < 0, 1, 0), 1, sem="relaxed")
    if arrived == expected - 1:
        instance = tl.arange(0, KP)  # KP
        real = instance < num_instances
        state = state_ptr + (image * num_instances + instance) * 4  # KP
        zero = tl.zeros([KP], dtype=tl.int32)
        left = tl.atomic_xchg(state + 0, zero, mask=real, sem="relaxed")
        top = tl.atomic_xchg(state + 1, zero, mask=real, sem="relaxed")
        right = tl.atomic_xchg(state + 2, zero, mask=real, sem="relaxed")
        bottom = tl.atomic_xchg(state + 3, zero, mask=real, sem="relaxed")
        _write_boxes(boxes_ptr, image, num_instances, instance, real, left, top, right, bottom)
        tl.atomic_xchg(arrivals_ptr + image, 0, sem="relaxed")


@triton.jit
def _balanced_place(counts_ptr, batch, num_instances, programs_per_column, height, position,
                    STRIP_ROWS: tl.constexpr, BP: tl.constexpr):
    """BALANCE 1: the (image, first row, end row, programs of the image a column strip) of place
    `position` of a column strip. Every image has m = cdiv(H, STRIP_ROWS) places at least (so no
    program has more than STRIP_ROWS rows); the E = R - B m others (R = programs_per_column) go to
    the images in proportion to the planes they move (valid planes read + K written; W_i: those
    of the images before image i): image i gets E_i = floor(E W_(i+1) / W) - floor(E W_i / W) more.
    Its u-th of n = m + E_i places: the rows floor(u H / n) to floor((u + 1) H / n). BP: B rounded
    up to a power of two. (Scalar loops over the images with loads in them crash triton 3.8's
    coalescing pass for sm_90, hence vectors; an outer loop over 32-row chunks, for places of more
    rows, took 128-134 registers and spilled, sm_90 ptxas.)"""
    image_index = tl.arange(0, BP)  # BP
    is_image = image_index < batch
    counts = tl.load(counts_ptr + image_index, mask=is_image, other=0)
    weights = tl.where(is_image, tl.maximum(tl.minimum(counts, num_instances), 0).to(tl.int32) + num_instances, 0)
    after = tl.cumsum(weights, 0)  # BP: W_(i+1)
    total = tl.sum(weights, 0)
    least = tl.cdiv(height, STRIP_ROWS)
    extra = programs_per_column - batch * least
    first = image_index * least + (extra * (after - weights)) // total  # BP
    last = (image_index + 1) * least + (extra * after) // total
    mine = is_image & (position >= first) & (position < last)  # one image
    image = tl.sum(tl.where(mine, image_index, 0), 0)
    begin = tl.sum(tl.where(mine, first, 0), 0)
    share = tl.sum(tl.where(mine, last - first, 0), 0)
    index = position - begin
    return image, (index * height) // share, ((index + 1) * height) // share, share


@triton.jit
def _strip_rows(words_ptr, out_ptr, state_ptr, image, num_instances, plane, first_row, end_row, column, in_columns,
                valid, real, words_per_row, KP: tl.constexpr, BLOCK_W: tl.constexpr, STAGES: tl.constexpr,
                DEPENDENT: tl.constexpr, STRIP_ROWS: tl.constexpr):
    """The rows first_row to end_row (at most STRIP_ROWS <= 32) of a strip, pipelined
    (`overlap._word_strip_design` with PREFETCH 0 on 0/1 masks), and their boxes folded (->
    `_fold_rows`'s token). The loop runs STRIP_ROWS steps, those past end_row masked: a trip count
    known at compile time (a count from end_row took 123 registers against 108, sm_90 ptxas)."""
    surviving_words = tl.zeros([KP, BLOCK_W], dtype=tl.int32)
    surviving_rows = tl.zeros([KP, BLOCK_W], dtype=tl.int32)
    for step in tl.range(0, STRIP_ROWS, num_stages=STAGES):
        row = first_row + step
        raw = _word_strip_load(words_ptr, plane, row, column, in_columns, valid, end_row, words_per_row,
                               False)  # KP x BLOCK_W
        survives = _word_strip_store(out_ptr, raw, plane, row, column, in_columns, real, end_row,
                                     words_per_row, True, False)
        surviving_words = surviving_words | survives
        surviving_rows = surviving_rows | tl.where(survives != 0, 1 << step, 0)
    return _fold_rows(state_ptr, image, num_instances, instance_range(KP), real, column, first_row,
                      surviving_words, surviving_rows, DEPENDENT, KP)


@triton.jit
def instance_range(KP: tl.constexpr):
    return tl.arange(0, KP)


@triton.jit
def _experiment_kernel(words_ptr, counts_ptr, out_ptr, state_ptr, arrivals_ptr, boxes_ptr, batch, num_instances,
                       words_per_row, num_words, programs_per_column, KP: tl.constexpr, TILE: tl.constexpr,
                       STRIP_ROWS: tl.constexpr, STAGES: tl.constexpr, BALANCE: tl.constexpr,
                       FINISH: tl.constexpr, BP: tl.constexpr):
    """Grid: (column strips x places, images): BALANCE 0, the product's (places: the cdiv(H,
    STRIP_ROWS) row strips of the image, column strips fastest); BALANCE 1, (column strips x
    programs_per_column, 1), the places shared by the images (`_balanced_place`)."""
    tl.static_assert(STRIP_ROWS <= 32)
    BLOCK_W: tl.constexpr = TILE // KP
    height = num_words // words_per_row
    strips = tl.cdiv(words_per_row, BLOCK_W)
    column = (tl.program_id(0) % strips) * BLOCK_W + tl.arange(0, BLOCK_W)  # BLOCK_W
    in_columns = column < words_per_row
    if BALANCE:
        image, row_begin, row_end, share = _balanced_place(counts_ptr, batch, num_instances, programs_per_column,
                                                           height, tl.program_id(0) // strips, STRIP_ROWS, BP)
        image = image.to(tl.int64)
        expected = share * strips  # the image's programs
    else:
        image = tl.program_id(1).to(tl.int64)
        row_begin = (tl.program_id(0) // strips) * STRIP_ROWS
        row_end = tl.minimum(row_begin + STRIP_ROWS, height)
        expected = tl.num_programs(0)
    count = tl.maximum(tl.minimum(tl.load(counts_ptr + image), num_instances), 0).to(tl.int32)
    instance = tl.arange(0, KP)  # KP
    valid = instance < count
    real = instance < num_instances
    plane = image * num_instances * num_words + instance.to(tl.int64) * num_words  # KP
    token = _strip_rows(words_ptr, out_ptr, state_ptr, image, num_instances, plane, row_begin, row_end, column,
                        in_columns, valid, real, words_per_row, KP, BLOCK_W, STAGES, FINISH == 2, STRIP_ROWS)
    if FINISH == 1:
        _finish_image_of(state_ptr, arrivals_ptr, boxes_ptr, image, num_instances, expected, KP)
    elif FINISH == 2:
        _finish_dependent(state_ptr, arrivals_ptr, boxes_ptr, image, num_instances, expected, token, KP)


RACE_LAUNCHES = 64


def main() -> int:
    smoke, out_dir, run = harness.start(sys.argv)
    batch, num_instances, height, width = run.shape
    held = harness.buffers(run)  # (preallocated)
    masks, out, state, boxes, kp = held.masks, held.out, held.state, held.boxes, held.kp
    counts_list = [num_instances - (7 if not smoke else 2), num_instances]
    counts = torch.tensor(counts_list, device=run.device)
    num_bytes = (sum(counts_list) + batch * num_instances) * height * width + batch * num_instances * 16
    mirrored = masks.flip(3).contiguous()  # the race check's second mask set
    mask_sets = [(source.view(-1).view(torch.int32), *overlap.suppress_overlap_reference(source, None, counts, "drop"))
                 for source in (masks, mirrored)]  # (words, masks, boxes)
    result = {"device": run.name, "torch": torch.__version__, "triton": triton.__version__,
              "copy_gbps": run.copy_gbps, "shape": list(masks.shape), "counts": counts_list, "rows": []}
    same = torch.ones(num_bytes // 8, dtype=torch.int32, device=run.device)
    same_out = torch.empty_like(same)
    rows = [("torch copy of the same bytes", lambda: same_out.copy_(same), None, None),
            ("product (autotuned)", lambda: overlap.suppress_overlap_triton(masks, None, counts, "drop"), None, None)]
    # (strip rows, stages, balance, programs a column strip (balance), finish)
    row_strips = triton.cdiv(height, 32)
    # 2 x 50 x 1024 x 1024: 64 places a column strip are the product's 512 programs, 66 the 528 that
    # 132 SMs hold at 4 programs an SM (116 registers, sm_90 ptxas, triton 3.8)
    variants = [(32, 3, 0, 0, 1), (32, 3, 0, 0, 2), (32, 3, 0, 0, 0),
                (32, 3, 1, batch * row_strips, 1), (32, 3, 1, batch * row_strips + 2, 1),
                (32, 3, 1, batch * row_strips + 2, 2), (32, 3, 1, batch * row_strips + 2, 0),
                (32, 3, 1, batch * row_strips + 4, 1), (32, 3, 1, batch * row_strips + 4, 2),
                (16, 3, 1, 2 * batch * row_strips + 4, 1), (16, 3, 1, 2 * batch * row_strips + 4, 2)]
    tile, warps = (2048, 4) if not smoke else (kp * 4, 4)
    column_strips = triton.cdiv(held.words_per_row, tile // kp)
    if num_instances == 0:
        raise ValueError("the balanced places need K > 0")
    for strip_rows, stages, balance, per_column, finish in variants:
        # (fewer places would give some more than strip_rows rows, of which only strip_rows are moved)
        if balance and per_column < batch * triton.cdiv(height, strip_rows):
            raise ValueError(f"{per_column} places a column strip: fewer than cdiv(H, {strip_rows}) an image")
        grid = ((column_strips * per_column, 1) if balance
                else (column_strips * triton.cdiv(height, strip_rows), batch))

        def launch(words=mask_sets[0][0], grid=grid, strip_rows=strip_rows, stages=stages, balance=balance,
                   per_column=per_column, finish=finish):
            return _experiment_kernel[grid](words, counts, out.view(-1).view(torch.int32),
                                            state[:-batch], state[-batch:], boxes, batch, num_instances,
                                            held.words_per_row, held.num_words, per_column, KP=kp, TILE=tile,
                                            STRIP_ROWS=strip_rows, STAGES=stages, BALANCE=balance, FINISH=finish,
                                            BP=triton.next_power_of_2(batch),
                                            num_warps=warps, num_stages=stages)
        label = f"rows {strip_rows} stages {stages} balance {balance} programs/column {per_column} finish {finish}"

        def check(want_out=mask_sets[0][1], want_boxes=mask_sets[0][2], finish=finish, label=label):
            if not torch.equal(out, want_out) or (finish and not torch.equal(boxes, want_boxes)):
                raise AssertionError(f"{label}: differs from the reference")
            if finish and (state.count_nonzero() > 0):
                raise AssertionError(f"{label}: the box state was not left zeroed")
            if not finish:
                state.zero_()  # (left with the folds)
        out.fill_(7)
        boxes.fill_(-1.0)
        compiled = launch()
        check()
        if not smoke:
            ptx = compiled.asm["ptx"]
            label += (f" (regs {compiled.n_regs}, spills {compiled.n_spills}, smem {compiled.metadata.shared}, "
                      f"cp.async {ptx.count('cp.async')}, bar.sync {ptx.count('bar.sync')}, "
                      f"atom {ptx.count('atom.')}, red {ptx.count('red.')})")
        rows.append((label, launch, check, finish))
    for label, fn, check, finish in rows:
        alone, together = run.timed(fn)
        pct = lambda ms: 100 * num_bytes / (ms * 1e-3) / 1e9 / run.copy_gbps if ms else 0.0  # noqa: E731
        checked = 0
        if finish:
            for launch_index in range(RACE_LAUNCHES if not smoke else 2):
                words, want_out, want_boxes = mask_sets[launch_index % 2]
                boxes.fill_(-1.0)
                fn(words)
                check(want_out, want_boxes)
                checked += 1
        result["rows"].append({"variant": label, "alone_ms": alone, "alone_pct": pct(alone),
                               "b2b_ms": together, "b2b_pct": pct(together), "launches_checked": checked})
        print(f"{label:150s} alone {alone:.4f} ms {pct(alone):5.1f}% | b2b {together:.4f} ms {pct(together):5.1f}%"
              f"{f' | {checked} launches checked' if checked else ''}", flush=True)
        with open(os.path.join(out_dir, "finish_balance.json"), "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

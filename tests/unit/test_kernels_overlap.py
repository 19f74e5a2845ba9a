"""Overlap suppression + boxes: Triton kernel against the torch reference and masks_to_boxes."""

import pytest
import torch
import triton

import resam_kernels
from resam_dist.resam.prompts import masks_to_boxes
from resam_kernels import overlap
from resam_kernels.overlap import (_BYTE_CONFIGS, _WORD_CONFIGS, MAX_INSTANCES,
                                    suppress_overlap_reference, suppress_overlap_triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_instances(batch, num_instances, height, width, seed):
    """Overlapping rectangles with holes, and confidences quantised to force argmax ties."""
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(batch, num_instances, height, width, dtype=torch.bool)
    for b in range(batch):
        for k in range(num_instances):
            y0 = int(torch.randint(0, height, (1,), generator=generator))
            x0 = int(torch.randint(0, width, (1,), generator=generator))
            y1 = y0 + 1 + int(torch.randint(0, max(1, height // 2), (1,), generator=generator))
            x1 = x0 + 1 + int(torch.randint(0, max(1, width // 2), (1,), generator=generator))
            masks[b, k, y0:y1, x0:x1] = True
    masks &= torch.rand(masks.shape, generator=generator) > 0.1
    confidence = torch.randint(0, 4, masks.shape, generator=generator).float() / 4  # many ties
    return masks, confidence


# (B, K, H, W, counts): every K in {0, 1, 7, 50} and H, W in {1, 63, 256, 257}; counts < K, = K,
# 0 and > K; 257 x 257 crosses the GPU block of 2048 pixels and the interpreter's of 65536.
CASES = [
    (2, 0, 63, 63, [0, 0]),
    (2, 1, 1, 1, [1, 0]),
    (1, 1, 257, 256, [1]),
    (2, 7, 63, 257, [7, 3]),
    (1, 7, 256, 1, [9]),
    (1, 50, 257, 257, [37]),
    (2, 50, 63, 63, [50, 0]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: "x".join(map(str, case[:4])))
@pytest.mark.parametrize("mode", ["drop", "argmax"])
def test_triton_matches_reference(case, mode):
    batch, num_instances, height, width, counts = case
    masks, confidence = random_instances(batch, num_instances, height, width, seed=sum(case[:4]))
    masks, confidence = masks.to(DEVICE), confidence.to(DEVICE)
    counts = torch.tensor(counts, dtype=torch.int64, device=DEVICE)
    assert resam_kernels.runs_triton(masks)
    out, boxes = resam_kernels.suppress_overlap(masks, confidence, counts, mode)
    out_ref, boxes_ref = suppress_overlap_reference(masks, confidence, counts, mode)
    assert out.dtype == torch.bool and out.shape == masks.shape
    assert boxes.dtype == torch.float32 and boxes.shape == (batch, num_instances, 4)
    assert torch.equal(out, out_ref)
    assert torch.equal(boxes, boxes_ref)
    assert torch.equal(boxes, masks_to_boxes(out))
    # invariants of the result: at most one instance per pixel, padding instances empty
    assert (out.sum(dim=1) <= 1).all()
    padding = torch.arange(num_instances, device=DEVICE)[None, :] >= counts[:, None]
    assert not out[padding].any()


def test_hand_example_both_modes():
    # three instances on a 2 x 3 image; instance 2 is padding (counts = 2)
    masks = torch.tensor([[[[1, 1, 0], [0, 1, 0]],
                           [[0, 1, 1], [0, 1, 0]],
                           [[1, 1, 1], [1, 1, 1]]]], dtype=torch.bool, device=DEVICE)
    confidence = torch.tensor([[[[0.9, 0.5, 0.0], [0.0, 0.7, 0.0]],
                                [[0.0, 0.5, 0.8], [0.0, 0.8, 0.0]],
                                [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]]], device=DEVICE)
    counts = torch.tensor([2], device=DEVICE)
    for use_triton in (True, False):
        out, boxes = resam_kernels.suppress_overlap(masks, confidence, counts, "drop",
                                                    use_triton=use_triton)
        assert out[0, 0].int().tolist() == [[1, 0, 0], [0, 0, 0]]
        assert out[0, 1].int().tolist() == [[0, 0, 1], [0, 0, 0]]
        assert not out[0, 2].any()
        assert boxes[0].tolist() == [[0, 0, 1, 1], [2, 0, 3, 1], [0, 0, 0, 0]]
        out, boxes = resam_kernels.suppress_overlap(masks, confidence, counts, "argmax",
                                                    use_triton=use_triton)
        # (0, 1) ties at 0.5 -> instance 0; (1, 1) goes to the more confident instance 1
        assert out[0, 0].int().tolist() == [[1, 1, 0], [0, 0, 0]]
        assert out[0, 1].int().tolist() == [[0, 0, 1], [0, 1, 0]]
        assert boxes[0].tolist() == [[0, 0, 2, 1], [1, 0, 3, 2], [0, 0, 0, 0]]


def test_drop_mode_accepts_no_confidence_and_bad_mode_is_rejected():
    masks, _ = random_instances(1, 3, 8, 8, seed=3)
    counts = torch.tensor([3])
    out, _ = resam_kernels.suppress_overlap(masks.to(DEVICE), None, counts.to(DEVICE), "drop")
    out_ref, _ = suppress_overlap_reference(masks, None, counts, "drop")
    assert torch.equal(out.cpu(), out_ref)
    with pytest.raises(ValueError, match="mode"):
        resam_kernels.suppress_overlap(masks, None, counts, "union")
    with pytest.raises(ValueError, match="confidence"):
        resam_kernels.suppress_overlap(masks.to(DEVICE), None, counts.to(DEVICE), "argmax")


def check_against_reference(masks, confidence, counts, mode, **kwargs):
    out, boxes = suppress_overlap_triton(masks, confidence, counts, mode, **kwargs)
    out_ref, boxes_ref = suppress_overlap_reference(masks, confidence, counts, mode)
    assert torch.equal(out, out_ref)
    assert torch.equal(boxes, boxes_ref)


# K around the powers of two that set the tile height (63 -> 64 rows, 65 -> 128, 129 -> 256) and
# K = 300 (512 rows: the pixel block shrinks to its 16-pixel minimum); pixel counts not multiples
# of the pixel block.
@pytest.mark.parametrize("case", [(2, 63, 31, 67, [63, 40]), (1, 65, 33, 65, [70]),
                                  (1, 129, 17, 23, [100]), (1, 300, 37, 29, [250])],
                         ids=lambda case: "x".join(map(str, case[:4])))
@pytest.mark.parametrize("mode", ["drop", "argmax"])
def test_tile_heights(case, mode):
    batch, num_instances, height, width, counts = case
    masks, confidence = random_instances(batch, num_instances, height, width, seed=num_instances)
    counts = torch.tensor(counts, device=DEVICE)
    check_against_reference(masks.to(DEVICE), confidence.to(DEVICE), counts, mode)


@pytest.mark.parametrize("blocks_per_program", [1, 2, 3, 50])
@pytest.mark.parametrize("mode", ["drop", "argmax"])
def test_pixel_blocks_per_program(blocks_per_program, mode):
    # one program walking several pixel blocks (the last span partial, or past the image end):
    # its running boxes must combine blocks from different rows
    masks, confidence = random_instances(2, 7, 61, 129, seed=blocks_per_program)
    counts = torch.tensor([7, 5], device=DEVICE)
    check_against_reference(masks.to(DEVICE), confidence.to(DEVICE), counts, mode,
                            blocks_per_program=blocks_per_program)


def test_argmax_ties_and_negative_infinity():
    # equal confidences go to the lowest kept k; a kept instance at -inf loses to a lower k that
    # is not kept (both score -inf in the reference), so nobody keeps that pixel
    masks = torch.tensor([[[[1, 0, 0, 1]], [[1, 1, 1, 1]], [[1, 1, 1, 0]]]], dtype=torch.bool)
    confidence = torch.tensor([[[[0.5, 0.9, 0.0, -float("inf")]],
                                [[0.5, 0.5, 0.7, -float("inf")]],
                                [[0.5, 0.5, 0.7, 0.1]]]])
    counts = torch.tensor([3])
    masks, confidence, counts = masks.to(DEVICE), confidence.to(DEVICE), counts.to(DEVICE)
    out, _ = resam_kernels.suppress_overlap(masks, confidence, counts, "argmax")
    assert out[0, :, 0].int().tolist() == [[1, 0, 0, 1], [0, 1, 1, 0], [0, 0, 0, 0]]
    check_against_reference(masks, confidence, counts, "argmax")
    masks[0, 0, 0, 3] = False
    out, _ = resam_kernels.suppress_overlap(masks, confidence, counts, "argmax")
    assert out[0, :, 0, 3].int().tolist() == [0, 0, 0]
    check_against_reference(masks, confidence, counts, "argmax")


def test_many_instances_fall_back_to_reference():
    masks, confidence = random_instances(1, MAX_INSTANCES + 1, 5, 6, seed=1)
    counts = torch.tensor([MAX_INSTANCES], device=DEVICE)
    check_against_reference(masks.to(DEVICE), confidence.to(DEVICE), counts, "argmax")


def test_large_planes_fall_back_to_reference(monkeypatch):
    """Pixel indices within a plane are int32: planes above MAX_PLANE_PIXELS run the reference."""
    masks, confidence = random_instances(2, 3, 5, 8, seed=2)
    counts = torch.tensor([3, 2], device=DEVICE)
    monkeypatch.setattr(overlap, "MAX_PLANE_PIXELS", 39)
    calls = []
    monkeypatch.setattr(overlap, "suppress_overlap_reference",
                        lambda *args: calls.append(args) or suppress_overlap_reference(*args))
    check_against_reference(masks.to(DEVICE), confidence.to(DEVICE), counts, "argmax")
    assert len(calls) == 1


@pytest.mark.parametrize("mode", ["drop", "argmax"])
@pytest.mark.parametrize("width", [8, 7])  # the word kernel ("drop", width % 4 == 0) and the byte kernel
def test_counts_far_below_zero_keep_nothing(mode, width):
    """A count below -2^31 is no instance: it is clamped before the kernels' int32 cast."""
    masks, confidence = random_instances(2, 3, 4, width, seed=3)
    counts = torch.tensor([-(2 ** 32) + 2, -(2 ** 40) + 3], device=DEVICE)
    out, boxes = suppress_overlap_triton(masks.to(DEVICE), confidence.to(DEVICE), counts, mode)
    assert masks.any() and not out.any() and not boxes.any()
    check_against_reference(masks.to(DEVICE), confidence.to(DEVICE), counts, mode)


@pytest.mark.parametrize("layout", ["leading", "column"])
def test_contiguous_masks_with_odd_strides_on_size_one_dimensions(layout):
    """torch calls these contiguous although a size-1 dimension's stride is not a multiple of 4
    (a dtype view of the whole tensor refuses them); the word kernel takes them."""
    if layout == "leading":  # B = 1 with stride 1 in front
        masks = (torch.rand(3, 4, 8, 1, generator=torch.Generator().manual_seed(0)) < 0.5).permute(3, 0, 1, 2)
    else:  # H = 1 with stride 1
        masks = (torch.rand(1, 3, 8, 1, generator=torch.Generator().manual_seed(1)) < 0.5).transpose(2, 3)
    assert masks.is_contiguous()
    with pytest.raises(RuntimeError, match="stride"):
        masks.view(torch.int32)
    masks = masks.to(DEVICE)
    check_against_reference(masks, None, torch.tensor([3], device=DEVICE), "drop")


# "drop" mode on words of 4 pixels (width % 4 == 0, K <= 64): tiles of TILE words, BLOCK_W =
# TILE / KP words per instance row. Word counts below, at and above one BLOCK_W, and not
# multiples of it; K not a multiple of the tile height (KP), K = KP, and counts < K, = K, > K.
@pytest.mark.parametrize("case", [(2, 50, 5, 12, [50, 13], 128),  # 15 words, BLOCK_W 2
                                  (1, 7, 9, 16, [9], 32),          # 36 words, BLOCK_W 4
                                  (2, 64, 3, 20, [64, 0], 64),     # 15 words, BLOCK_W 1
                                  (1, 33, 17, 8, [20], 512),       # 34 words, BLOCK_W 8
                                  (1, 1, 4, 4, [1], 4)],           # 4 words, BLOCK_W 4
                         ids=lambda case: "x".join(map(str, case[:4])) + f"-tile{case[5]}")
def test_drop_words_tiles(case):
    batch, num_instances, height, width, counts, tile = case
    masks, _ = random_instances(batch, num_instances, height, width, seed=tile + num_instances)
    counts = torch.tensor(counts, device=DEVICE)
    check_against_reference(masks.to(DEVICE), None, counts, "drop", word_tile=tile)


def test_drop_words_box_columns_within_a_word():
    # one pixel per instance at every byte position of a word and on two rows: the word kernel's
    # first/last surviving byte sets x0/x1; instances 4 and 5 overlap at (1, 6): both dropped there
    masks = torch.zeros(1, 6, 2, 8, dtype=torch.bool)
    for k in range(4):
        masks[0, k, k % 2, k] = True  # byte k of word 0 on row k % 2
    masks[0, 4, 1, 5:8] = True
    masks[0, 5, 1, 6] = True
    masks[0, 5, 0, 4] = True
    counts = torch.tensor([6])
    out, boxes = suppress_overlap_triton(masks.to(DEVICE), None, counts.to(DEVICE), "drop",
                                         word_tile=8)
    assert boxes.cpu().tolist() == [[[0, 0, 1, 1], [1, 1, 2, 2], [2, 0, 3, 1], [3, 1, 4, 2],
                                     [5, 1, 8, 2], [4, 0, 5, 1]]]
    assert out[0, 4, 1].cpu().int().tolist() == [0, 0, 0, 0, 0, 1, 0, 1]
    check_against_reference(masks.to(DEVICE), None, counts.to(DEVICE), "drop", word_tile=8)


# one 32-row strip config of each row-loop kind: the register prefetch of 1 and 2 rows, and Triton's
# software pipeline (PREFETCH 0)
STRIPS_32 = list({config.kwargs["PREFETCH"]: config for config in _WORD_CONFIGS
                  if config.kwargs.get("STRIP_ROWS") == 32}.values())


@pytest.mark.parametrize("strip", STRIPS_32, ids=lambda config: f"prefetch{config.kwargs['PREFETCH']}")
def test_drop_words_strip_rows_at_the_strip_edges(strip):
    # the strip design's y bounds come from one bit per row of a 32-row strip: survivors only on
    # row 31 (bit 31, the int32 sign bit), on rows 0 and 31, across two strips (rows 30-33), and
    # on the last row of a partial strip
    assert sorted(config.kwargs["PREFETCH"] for config in STRIPS_32) == [0, 1, 2]
    masks = torch.zeros(1, 4, 45, 8, dtype=torch.bool)
    masks[0, 0, 31, 5] = True
    masks[0, 1, 0, 1] = masks[0, 1, 31, 2] = True
    masks[0, 2, 30:34, 7] = True
    masks[0, 3, 44, 0:3] = True
    out, boxes = suppress_overlap_triton(masks.to(DEVICE), None, torch.tensor([4]).to(DEVICE), "drop",
                                         config=strip)
    assert boxes.cpu().tolist() == [[[5, 31, 6, 32], [1, 0, 3, 32], [7, 30, 8, 34], [0, 44, 3, 45]]]
    assert torch.equal(out.cpu(), masks)


@pytest.mark.parametrize("word_tile", [16, 32])  # 2 / 4 words a row of the tile: ROW_TILES off / on
def test_drop_words_treat_any_nonzero_byte_as_kept(word_tile):
    # uint8 masks holding bytes other than 0/1: every non-zero byte is a kept pixel, as in the
    # reference's masks.bool() (bool masks hold 0/1 bytes, as torch keeps them, and are read as is)
    generator = torch.Generator().manual_seed(5)
    raw = torch.randint(0, 256, (1, 5, 4, 16), generator=generator, dtype=torch.uint8)
    raw[raw < 160] = 0  # about 40% of the pixels kept
    counts = torch.tensor([5])
    out, boxes = suppress_overlap_triton(raw.to(DEVICE), None, counts.to(DEVICE), "drop",
                                         word_tile=word_tile)
    out_ref, boxes_ref = suppress_overlap_reference(raw != 0, None, counts, "drop")
    assert torch.equal(out.cpu().view(torch.uint8), out_ref.view(torch.uint8))
    assert torch.equal(boxes.cpu(), boxes_ref)


# The rows design (a loop over instances keeping each pixel's owner, then the output rows in
# chunks): every CASE and tile-height case, both modes, against the reference.
@pytest.mark.parametrize("case", CASES + [(2, 63, 31, 67, [63, 40]), (1, 300, 37, 29, [250])],
                         ids=lambda case: "x".join(map(str, case[:4])))
@pytest.mark.parametrize("mode", ["drop", "argmax"])
def test_rows_design(case, mode):
    batch, num_instances, height, width, counts = case
    masks, confidence = random_instances(batch, num_instances, height, width, seed=sum(case[:4]) + 1)
    counts = torch.tensor(counts, dtype=torch.int64, device=DEVICE)
    check_against_reference(masks.to(DEVICE), confidence.to(DEVICE), counts, mode, design="rows")


def test_rows_design_ties_and_negative_infinity():
    # the rows design's running owner: ties keep the lowest k, a kept -inf never takes a pixel,
    # and with no kept score above -inf the pixel goes to instance 0 only if it kept it
    masks = torch.tensor([[[[1, 0, 0, 1, 0]], [[1, 1, 1, 1, 1]], [[1, 1, 1, 0, 1]]]], dtype=torch.bool)
    confidence = torch.tensor([[[[0.5, 0.9, 0.0, -float("inf"), 0.3]],
                                [[0.5, 0.5, 0.7, -float("inf"), -float("inf")]],
                                [[0.5, 0.5, 0.7, 0.1, -float("inf")]]]])
    masks, confidence, counts = masks.to(DEVICE), confidence.to(DEVICE), torch.tensor([3], device=DEVICE)
    out, boxes = suppress_overlap_triton(masks, confidence, counts, "argmax", design="rows")
    assert out[0, :, 0].int().tolist() == [[1, 0, 0, 1, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]]
    assert boxes[0].tolist() == [[0, 0, 4, 1], [1, 0, 3, 1], [0, 0, 0, 0]]
    check_against_reference(masks, confidence, counts, "argmax", design="rows")


def test_unknown_design_and_ineligible_word_tile_are_rejected():
    masks, confidence = random_instances(1, 2, 4, 6, seed=0)
    with pytest.raises(ValueError, match="design"):
        suppress_overlap_triton(masks, confidence, torch.tensor([2]), "argmax", design="columns")
    # the word kernel is "drop" only, on rows of a multiple of 4 pixels
    with pytest.raises(ValueError, match="word_tile"):
        suppress_overlap_triton(masks[..., :4], confidence[..., :4], torch.tensor([2]), "argmax", word_tile=4)
    with pytest.raises(ValueError, match="word_tile"):
        suppress_overlap_triton(masks, None, torch.tensor([2]), "drop", word_tile=4)
    masks = masks[..., :4]  # eligible, but the tile is not a power of two >= KP
    for word_tile in (1, 24):
        with pytest.raises(ValueError, match="word_tile must be a power of two"):
            suppress_overlap_triton(masks, None, torch.tensor([2]), "drop", word_tile=word_tile)


@pytest.mark.parametrize("rows, unroll, strip_rows", [(False, 1, 0), (True, 1, 0), (True, 4, 0),
                                                     (True, 8, 3)])
def test_kernel_leaves_its_box_state_zeroed(rows, unroll, strip_rows):
    # the last program of each image turns the box state into float boxes and zeroes the state and
    # its arrival counter, so the autotuner's repeated runs on one state give the same boxes
    from resam_kernels.overlap import _suppress_overlap_kernel, byte_kernel_grid
    masks, confidence = random_instances(3, 7, 19, 23, seed=4)
    counts = torch.tensor([7, 4, 0])
    out_ref, boxes_ref = suppress_overlap_reference(masks, confidence, counts, "argmax")
    batch, num_instances, height, width = masks.shape
    state = torch.zeros(batch * num_instances * 4 + batch, dtype=torch.int32)
    out = torch.empty(masks.shape, dtype=torch.uint8)
    for _ in range(2):
        boxes = torch.full((batch, num_instances, 4), -1.0)
        meta = dict(BLOCK_P=16 if strip_rows else 64, WALK=1, ROWS=rows, CHUNK=4, UNROLL=unroll,
                    STRIP_ROWS=strip_rows)  # strips: 2 x 7 per image, the last ones partial
        _suppress_overlap_kernel[byte_kernel_grid(meta, batch, height, width)](
            masks.view(torch.uint8), confidence, counts, out, state, state[batch * num_instances * 4:],
            boxes, num_instances, width, height * width, 0, 0, ARGMAX=True, KP=8, **meta)
        assert torch.equal(out.bool(), out_ref)
        assert torch.equal(boxes, boxes_ref)
        assert not state.any()


# Every config the GPU autotuner may pick, launched through the `config` override, against the
# reference: byte kernel K in {0, 1, 7, 50} on odd sizes of more than 2,048 pixels (the largest
# BLOCK_P) and one-pixel rows and columns; word kernel K in {1, 7, 50} with widths of a multiple
# of 4 pixels; pixel / word counts not multiples of any program's span, counts < K, = K, 0 and > K.
# K = 64: instance 63 owns the sign bit of the strip design's 64-bit owner words.
BYTE_CONFIG_CASES = [(2, 0, 3, 5, [0, 0]), (2, 1, 1, 1, [1, 0]), (2, 7, 31, 67, [7, 3]),
                     (1, 50, 33, 65, [37]), (1, 7, 131, 1, [9]), (1, 64, 11, 21, [64])]
# the word kernel needs rows of a multiple of 4 pixels
WORD_CONFIG_CASES = [(2, 1, 1, 4, [1, 0]), (2, 7, 63, 36, [7, 3]), (1, 50, 17, 64, [50]),
                     (2, 50, 9, 12, [37, 0]), (1, 7, 257, 256, [9])]


def config_id(config):
    return "-".join(f"{key}{value}" for key, value in config.kwargs.items()) + f"-w{config.num_warps}"


# The strip design (a loop over image rows inside each program) is slow under the interpreter:
# smaller images, still with partial strips in both directions (rows not a multiple of
# STRIP_ROWS, columns not a multiple of BLOCK_P) and a one-pixel-wide image.
STRIP_CONFIG_CASES = [(2, 0, 3, 5, [0, 0]), (2, 1, 1, 1, [1, 0]), (2, 7, 13, 37, [7, 3]),
                      (1, 50, 9, 33, [37]), (1, 7, 19, 1, [9]), (1, 64, 11, 21, [64])]


@pytest.mark.parametrize("config", _BYTE_CONFIGS, ids=config_id)
@pytest.mark.parametrize("mode", ["drop", "argmax"])
def test_every_byte_config(config, mode):
    cases = STRIP_CONFIG_CASES if config.kwargs.get("STRIP_ROWS", 0) else BYTE_CONFIG_CASES
    for case in cases:
        batch, num_instances, height, width, counts = case
        masks, confidence = random_instances(batch, num_instances, height, width, seed=sum(case[:4]) + 2)
        counts = torch.tensor(counts, device=DEVICE)
        check_against_reference(masks.to(DEVICE), confidence.to(DEVICE), counts, mode, config=config)


def test_word_configs_include_streaming_and_pipelined_strips():
    # STREAM (evict-first loads, streaming stores; H200 run 18) and PREFETCH 0 (the row loop
    # software-pipelined by Triton; run 19) are tuned, so the tests below cover them
    strips = [config.kwargs for config in _WORD_CONFIGS if config.kwargs.get("STRIP_ROWS")]
    assert any(kwargs.get("STREAM") for kwargs in strips)
    assert any(kwargs["PREFETCH"] == 0 for kwargs in strips)


@pytest.mark.parametrize("config", _WORD_CONFIGS, ids=config_id)
def test_every_word_config(config):
    for case in WORD_CONFIG_CASES:
        batch, num_instances, height, width, counts = case
        masks, _ = random_instances(batch, num_instances, height, width, seed=sum(case[:4]) + 3)
        counts = torch.tensor(counts, device=DEVICE)
        check_against_reference(masks.to(DEVICE), None, counts, "drop", config=config)


@pytest.mark.parametrize("config", _WORD_CONFIGS, ids=config_id)
def test_word_kernel_leaves_its_box_state_zeroed(config):
    # 2,048 words per image: 2 to 16 programs per image fold boxes and count arrivals
    from resam_kernels.overlap import _suppress_drop_words_kernel, word_kernel_grid
    masks, _ = random_instances(3, 7, 64, 128, seed=6)
    masks, counts = masks.to(DEVICE), torch.tensor([7, 4, 0], device=DEVICE)
    out_ref, boxes_ref = suppress_overlap_reference(masks, None, counts, "drop")
    batch, num_instances, height, width = masks.shape
    num_words = height * width // 4
    state = torch.zeros(batch * num_instances * 4 + batch, dtype=torch.int32, device=DEVICE)
    for _ in range(2):
        out = torch.full(masks.shape, 0xFF, dtype=torch.uint8, device=DEVICE)  # a missing store shows
        boxes = torch.full((batch, num_instances, 4), -1.0, device=DEVICE)
        _suppress_drop_words_kernel[word_kernel_grid(config.kwargs, batch, 8, height, width // 4)](
            masks.view(torch.uint8).view(torch.int32), counts, out.view(torch.int32), state,
            state[batch * num_instances * 4:], boxes, num_instances, width // 4, num_words, 0, KP=8,
            ZERO_ONE=True, **config.kwargs)
        assert torch.equal(out.bool(), out_ref)
        assert torch.equal(boxes, boxes_ref)
        assert not state.any()


def test_word_configs_pruned_where_they_would_spill():
    # TILE 8192 with 4 warps spills on sm_90 unless the masks are bool and tiles lie in one row;
    # the strip design unless rows and buffers are aligned to 16
    from resam_kernels.overlap import _prune_word_configs
    large = [config for config in _WORD_CONFIGS if config.kwargs["TILE"] == 8192 and config.num_warps == 4]
    assert len(large) == 1

    def kept(words_per_row, zero_one):
        return _prune_word_configs(_WORD_CONFIGS, {"words_per_row": words_per_row}, KP=64, ZERO_ONE=zero_one)
    assert large[0] in kept(256, True)  # 1024-pixel rows: 128-word tiles fit them
    assert large[0] not in kept(256, False)
    assert large[0] not in kept(63, True)
    strips = [config for config in _WORD_CONFIGS if "STRIP_ROWS" in config.kwargs]
    assert strips and set(map(id, strips)) <= set(map(id, kept(256, False)))
    assert len(kept(63, True)) == len(_WORD_CONFIGS) - 1 - len(strips)  # 63 words a row: unaligned
    buffer = torch.zeros(64, dtype=torch.int32)
    shifted = _prune_word_configs(_WORD_CONFIGS, {"words_per_row": 256, "words_ptr": buffer[1:],
                                                  "out_ptr": buffer}, KP=64, ZERO_ONE=True)
    assert len(shifted) == len(_WORD_CONFIGS) - len(strips)  # a buffer 4 bytes off 16-byte alignment



def test_word_size_class_separates_what_the_pruner_separates():
    # A pick is reused for every call of its (KP, words_bucket, ZERO_ONE): two shapes whose
    # configs the pruner keeps differently must never share one (the pick could spill there).
    # e.g. 32 rows of 128 words and 16 rows of 192 words (both 2^12 words after rounding up):
    # at KP = 64 the 128-word tiles of TILE 8192 lie in one row of the first only.
    from resam_kernels.overlap import _prune_word_configs, _words_bucket
    shapes = [(words_per_row, rows) for words_per_row in (16, 48, 63, 64, 128, 192, 256, 320)
              for rows in (1, 3, 7, 16, 40)]
    for kp in (8, 64):
        for zero_one in (False, True):
            seen = {}
            for words_per_row, rows in shapes:
                num_words = words_per_row * rows
                for aligned in (False, True):
                    buffer = torch.zeros(64, dtype=torch.int32)
                    args = {"words_per_row": words_per_row, "words_ptr": buffer if aligned else buffer[1:],
                            "out_ptr": buffer}
                    kept = tuple(map(id, _prune_word_configs(_WORD_CONFIGS, args, KP=kp, ZERO_ONE=zero_one)))
                    strips_aligned = aligned and words_per_row % 16 == 0
                    bucket = _words_bucket(num_words, words_per_row, kp, strips_aligned)
                    assert seen.setdefault(bucket, kept) == kept, (kp, zero_one, words_per_row, rows, aligned)
    assert _words_bucket(128 * 32, 128, 64, True) != _words_bucket(192 * 16, 192, 64, True)

def test_config_override_is_checked():
    masks, confidence = random_instances(1, 2, 4, 6, seed=0)
    word_config = _WORD_CONFIGS[0]
    with pytest.raises(ValueError, match="word configs"):
        suppress_overlap_triton(masks, None, torch.tensor([2]), "drop", config=word_config)
    masks, confidence = random_instances(1, 65, 4, 6, seed=0)
    with pytest.raises(ValueError, match="byte kernel configs"):
        suppress_overlap_triton(masks, confidence, torch.tensor([2]), "argmax", config=_BYTE_CONFIGS[0])


def test_masks_of_another_dtype_are_refused():
    masks, _ = random_instances(1, 2, 4, 8, seed=0)
    with pytest.raises(ValueError, match="bool or uint8 masks, got torch.float32"):
        suppress_overlap_triton(masks.float(), None, torch.tensor([2]), "drop")


@pytest.mark.parametrize("mode", ["drop", "argmax"])
def test_tuned_pick_is_launched_directly_after_the_first_call(monkeypatch, mode):
    """On the GPU the first call of a size class goes through the autotuner, and later calls
    launch its pick without it. Here: the tuned path with a real one-config autotuner (Triton
    tunes nothing when one config is left, so it runs under the interpreter); the outputs of
    both calls are the reference's, and the autotuner runs only for the first call of each key."""
    from resam_kernels import overlap
    word = mode == "drop"
    config = _WORD_CONFIGS[1] if word else _BYTE_CONFIGS[5]
    tuned = triton_autotune_one(overlap, config, word)
    runs = []
    monkeypatch.setattr(tuned, "run", lambda *args, **kwargs: runs.append(1) or type(tuned).run(
        tuned, *args, **kwargs))
    monkeypatch.setattr(overlap, "_suppress_drop_words_kernel_tuned" if word
                        else "_suppress_overlap_kernel_tuned", tuned)
    monkeypatch.setattr(overlap, "INTERPRET", False)
    monkeypatch.setattr(overlap, "_WORD_PICKS", {})
    monkeypatch.setattr(overlap, "_BYTE_PICKS", {})
    picks = overlap._WORD_PICKS if word else overlap._BYTE_PICKS
    direct_row_tiles = []  # the word kernel's direct launches: (words per row, ROW_TILES)
    jit = overlap._suppress_drop_words_jit

    class RecordingJit:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                direct_row_tiles.append((args[7], kwargs["ROW_TILES"]))
                return jit[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(overlap, "_suppress_drop_words_jit", RecordingJit())
    sizes = [(17, 36), (19, 40), (17, 36), (130, 36), (3, 1024), (3, 1024), (8, 64), (7, 72)]
    for seed, (height, width) in enumerate(sizes):
        masks, confidence = random_instances(2, 7, height, width, seed=seed + 30)
        counts = torch.tensor([7, 5], device=DEVICE)
        check_against_reference(masks.to(DEVICE), confidence.to(DEVICE), counts, mode)
    assert all(c.pre_hook is None for c in _WORD_CONFIGS + _BYTE_CONFIGS)  # (the direct launch skips hooks)
    # (17 x 36 and 19 x 40 pixels share a size class; 130 x 36 and 3 x 1024 have their own; so do
    # 8 x 64 and 7 x 72 for the word kernel, whose key tells rows the strip design runs on, 16 words,
    # from others, 18 words, while the byte kernel's key holds them in one class)
    classes = 5 if word else 4
    assert len(runs) == classes and len(picks) == classes
    assert all(pick is config for pick in picks.values()) and len(tuned.cache) == classes
    if word:  # tiles of 2048 / 8 = 256 words lie in one row of 1024 / 4 words, not in rows of 9 or 10
        assert direct_row_tiles == [(10, False), (9, False), (256, True)]
    overlap.clear_tuning()
    assert not picks and not tuned.cache


def triton_autotune_one(overlap, config, word):
    """A real autotuner of the word or byte kernel whose pruning leaves `config` alone (so it
    keys its cache but benchmarks nothing)."""
    import triton
    configs = [config, (_WORD_CONFIGS if word else _BYTE_CONFIGS)[0]]
    prune = {"early_config_prune": lambda configs, named_args, **kwargs: configs[:1]}
    if word:
        return triton.autotune(configs=configs, key=["KP", "words_bucket", "ZERO_ONE"],
                               prune_configs_by=prune)(overlap._suppress_drop_words_kernel)
    return triton.autotune(configs=configs, key=["KP", "pixels_bucket", "batch_bucket", "ARGMAX"],
                           prune_configs_by=prune)(overlap._suppress_overlap_kernel)

"""Triton kernels on a real CUDA device at training sizes, against the torch references."""

import pytest
import torch

import resam_kernels
from resam_dist.resam.prompts import masks_to_boxes
from resam_kernels.counts import instance_counts_reference
from resam_kernels.entropy import entropy_filter_reference
from resam_kernels.layer_norm import layer_norm_reference
from resam_kernels.mask_head import mask_head_reference
from resam_kernels.mask_loss import mask_loss_terms_reference
from resam_kernels.mask_loss_upsampled import upsampled_mask_loss_terms_reference
from resam_kernels.overlap import suppress_overlap_reference
from resam_kernels.relpos_attention import relpos_attention_reference, relpos_attention_triton
from resam_kernels.ssa import ssa_loss_reference
from resam_kernels.upsample import upsample4x_reference

pytestmark = pytest.mark.gpu

DEVICE = "cuda"


def smooth_logits(batch, num_instances, size, dtype, seed):
    """Blob-like mask logits: upsampled low-resolution noise, so instances overlap in regions."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    coarse = torch.randn(batch, num_instances, size // 32, size // 32, device=DEVICE,
                         generator=generator) * 8 - 4
    logits = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    return logits.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [256, 1024])
def test_entropy_filter_realistic(dtype, size):
    logits = smooth_logits(2, 50, size, dtype, seed=size)
    keep, confidence = resam_kernels.entropy_filter(logits, 0.5, return_confidence=True)
    keep_ref, confidence_ref = entropy_filter_reference(logits, 0.5, return_confidence=True)
    # GPU transcendental functions differ from torch's in the last bits
    torch.testing.assert_close(confidence, confidence_ref, atol=1e-5, rtol=1e-5)
    disagree = keep != keep_ref
    assert not (disagree & ((confidence_ref - 0.5).abs() > 1e-4)).any()
    assert keep.any() and not keep.all()


@pytest.mark.parametrize("mode", ["drop", "argmax"])
@pytest.mark.parametrize("size", [250, 256, 1024])  # 250: rows not a multiple of 4 (byte kernel in "drop")
def test_suppress_overlap_realistic(mode, size):
    logits = smooth_logits(2, 50, size, torch.float32, seed=size + 1)
    keep, confidence = entropy_filter_reference(logits, 0.2, return_confidence=True)
    counts = torch.tensor([50, 31], device=DEVICE)
    out, boxes = resam_kernels.suppress_overlap(keep, confidence, counts, mode)
    out_ref, boxes_ref = suppress_overlap_reference(keep, confidence, counts, mode)
    assert (keep.sum(dim=1) > 1).any()  # the case really has overlaps
    assert torch.equal(out, out_ref)
    assert torch.equal(boxes, boxes_ref)
    assert torch.equal(boxes, masks_to_boxes(out))



@pytest.mark.parametrize("mode", ["drop", "argmax"])
def test_suppress_overlap_every_tuned_config(mode):
    """Every config the autotuner may pick (tile, rows and strip designs), launched directly at 250 x 250
    (not a multiple of the pixel blocks), twice on one box state: same outputs as the reference,
    state and arrival counters zeroed after each launch; in "drop" mode the same for every config
    of the word kernel at 252 x 252. Then K = 100 (KP = 128: the fixed rows launch of the
    dispatcher)."""
    import triton
    from resam_kernels.overlap import _BYTE_CONFIGS, _suppress_overlap_kernel, byte_kernel_grid
    logits = smooth_logits(3, 50, 250, torch.float32, seed=7)
    keep, confidence = entropy_filter_reference(logits, 0.2, return_confidence=True)
    counts = torch.tensor([50, 31, 0], device=DEVICE)
    out_ref, boxes_ref = suppress_overlap_reference(keep, confidence, counts, mode)
    batch, num_instances, height, width = keep.shape
    state = torch.zeros(batch * num_instances * 4 + batch, dtype=torch.int32, device=DEVICE)
    for config in _BYTE_CONFIGS:
        meta = config.kwargs
        for _ in range(2):
            out = torch.empty(keep.shape, dtype=torch.uint8, device=DEVICE)
            boxes = torch.full((batch, num_instances, 4), -1.0, device=DEVICE)
            _suppress_overlap_kernel[byte_kernel_grid(meta, batch, height, width)](
                keep.view(torch.uint8), confidence, counts, out, state, state[batch * num_instances * 4:],
                boxes, num_instances, width, height * width, 0, 0, ARGMAX=mode == "argmax", KP=64,
                num_warps=config.num_warps, **meta)
            assert torch.equal(out.bool(), out_ref), meta
            assert torch.equal(boxes, boxes_ref), meta
            assert not state.any(), meta
    if mode == "drop":
        # the word kernel's configs on rows of a multiple of 4 pixels
        from resam_kernels.overlap import _WORD_CONFIGS, _suppress_drop_words_kernel, word_kernel_grid
        logits = smooth_logits(3, 50, 252, torch.float32, seed=9)
        keep = entropy_filter_reference(logits, 0.2)
        out_ref, boxes_ref = suppress_overlap_reference(keep, None, counts, mode)
        batch, num_instances, height, width = keep.shape
        num_words = height * width // 4
        state = torch.zeros(batch * num_instances * 4 + batch, dtype=torch.int32, device=DEVICE)
        for config in _WORD_CONFIGS:
            meta = config.kwargs
            for _ in range(2):
                out = torch.empty(keep.shape, dtype=torch.uint8, device=DEVICE)
                boxes = torch.full((batch, num_instances, 4), -1.0, device=DEVICE)
                grid = word_kernel_grid(meta, batch, 64, height, width // 4)
                _suppress_drop_words_kernel[grid](
                    keep.view(torch.uint8).view(torch.int32), counts, out.view(torch.int32), state,
                    state[batch * num_instances * 4:], boxes, num_instances, width // 4, num_words, 0,
                    KP=64, ZERO_ONE=True, num_warps=config.num_warps, **meta)
                assert torch.equal(out.bool(), out_ref), meta
                assert torch.equal(boxes, boxes_ref), meta
                assert not state.any(), meta
    logits = smooth_logits(2, 100, 256, torch.float32, seed=8)
    keep, confidence = entropy_filter_reference(logits, 0.2, return_confidence=True)
    counts = torch.tensor([100, 77], device=DEVICE)
    out, boxes = resam_kernels.suppress_overlap(keep, confidence, counts, mode)
    out_ref, boxes_ref = suppress_overlap_reference(keep, confidence, counts, mode)
    assert torch.equal(out, out_ref)
    assert torch.equal(boxes, boxes_ref)


@pytest.mark.parametrize("mode", ["drop", "argmax"])
def test_suppress_overlap_tuned_once_then_launched_from_its_pick(mode, monkeypatch):
    """A fresh size class goes through the autotuner once; later calls (on other inputs, taking
    turns on two streams, each with its own kept box state, one call at a time) launch the pick
    directly and still give the reference's outputs."""
    from resam_kernels import overlap
    overlap.clear_tuning()
    tuned = overlap._suppress_drop_words_kernel_tuned if mode == "drop" else overlap._suppress_overlap_kernel_tuned
    picks = overlap._WORD_PICKS if mode == "drop" else overlap._BYTE_PICKS
    runs = []
    monkeypatch.setattr(tuned, "run", lambda *args, **kwargs: runs.append(1) or type(tuned).run(
        tuned, *args, **kwargs))
    side_stream = torch.cuda.Stream()
    for call in range(6):
        logits = smooth_logits(2, 50, 512, torch.float32, seed=20 + call)
        keep, confidence = entropy_filter_reference(logits, 0.2, return_confidence=True)
        counts = torch.tensor([50, 40 - call], device=DEVICE)
        out_ref, boxes_ref = suppress_overlap_reference(keep, confidence, counts, mode)
        stream = side_stream if call % 2 else torch.cuda.current_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out, boxes = resam_kernels.suppress_overlap(keep, confidence, counts, mode)
        torch.cuda.synchronize()
        assert torch.equal(out, out_ref) and torch.equal(boxes, boxes_ref), call
    assert len(runs) == 1 and list(picks.values()) == [tuned.best_config]


@pytest.mark.parametrize("mode", ["drop", "argmax"])
def test_suppress_overlap_in_a_cuda_graph_and_after(mode):
    """The kept box state (zeroed by each launch) is not used while a graph is captured: replays
    and plain calls before and after give the reference's outputs."""
    logits = smooth_logits(2, 50, 256, torch.float32, seed=11)
    keep, confidence = entropy_filter_reference(logits, 0.2, return_confidence=True)
    counts = torch.tensor([50, 31], device=DEVICE)
    out_ref, boxes_ref = suppress_overlap_reference(keep, confidence, counts, mode)
    resam_kernels.suppress_overlap(keep, confidence, counts, mode)  # tuned and compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, boxes = resam_kernels.suppress_overlap(keep, confidence, counts, mode)
    for _ in range(2):
        out.fill_(False)
        boxes.fill_(-1)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, out_ref) and torch.equal(boxes, boxes_ref)
        plain_out, plain_boxes = resam_kernels.suppress_overlap(keep, confidence, counts, mode)
        assert torch.equal(plain_out, out_ref) and torch.equal(plain_boxes, boxes_ref)


def forget_tuning():
    """Every tuned size class of the three tuned kernels forgotten: their next calls tune again."""
    from resam_kernels import entropy, overlap, ssa
    overlap.clear_tuning()
    for module, tuned_kernels in ((entropy, [entropy._entropy_filter_kernel_tuned]),
                                  (ssa, [ssa._ssa_queue_partial_kernel_bf16, ssa._ssa_queue_partial_kernel_f32])):
        module._TUNED_SIZES.clear()
        for tuned in tuned_kernels:
            tuned.cache.clear()


@pytest.mark.parametrize("function", ["entropy_filter", "suppress_overlap", "ssa_loss"])
def test_tuning_inside_a_graph_capture_is_refused_by_name_and_capture_works_after_a_warm_up(function):
    """An untuned size class met while a CUDA graph is captured: a RuntimeError naming the
    dispatcher, raised before any launch, so the capture ends cleanly; once called outside, the
    same call is captured and its replay gives the plain call's outputs."""
    logits = smooth_logits(2, 50, 256, torch.float32, seed=12)
    keep = entropy_filter_reference(logits, 0.2)
    counts = torch.tensor([50, 31], device=DEVICE)
    generator = torch.Generator(device=DEVICE).manual_seed(12)
    weak, queue = (torch.randn(rows, 256, device=DEVICE, generator=generator) for rows in (400, 1000))
    student = weak + torch.randn(400, 256, device=DEVICE, generator=generator)
    calls = {"entropy_filter": lambda: (resam_kernels.entropy_filter(logits, 0.2),),
             "suppress_overlap": lambda: resam_kernels.suppress_overlap(keep, None, counts, "drop"),
             "ssa_loss": lambda: (resam_kernels.ssa_loss(student, weak, queue, 0.07),)}
    call = calls[function]
    forget_tuning()
    try:
        with pytest.raises(RuntimeError, match=f"resam_kernels.{function}: size class .* has not been tuned"):
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                call()
        expected = [tensor.clone() for tensor in call()]  # tunes
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = call()
        graph.replay()
        torch.cuda.synchronize()
        for output, want in zip(outputs, expected, strict=True):
            assert torch.equal(output, want)
    finally:
        forget_tuning()


def test_suppress_overlap_64bit_offsets():
    """1 x 36 x 8192 x 8192 masks (2.4e9 elements): the later instance planes start beyond 2^31."""
    num_instances, size = 36, 8192
    masks = torch.zeros(1, num_instances, size, size, dtype=torch.bool, device=DEVICE)
    for k in range(num_instances):  # rectangles, each overlapping the next one
        masks[0, k, 100 * k:100 * k + 300, 7000 - 150 * k:7200 - 150 * k] = True
    counts = torch.tensor([num_instances - 1], device=DEVICE)
    out, boxes = resam_kernels.suppress_overlap(masks, None, counts, "drop")
    out_ref, boxes_ref = suppress_overlap_reference(masks, None, counts, "drop")
    assert torch.equal(out, out_ref)
    assert torch.equal(boxes, boxes_ref)
    # instance 34 loses rows 3400-3599 x cols 2050-2099 to instance 33; 35 is padding
    assert boxes[0, num_instances - 2].tolist() == [1900.0, 3400.0, 2100.0, 3700.0]
    assert not out[0, num_instances - 1].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("queue_len", [0, 128, 8192, 65536])
def test_ssa_loss_realistic(dtype, queue_len):
    generator = torch.Generator(device=DEVICE).manual_seed(queue_len)
    student = torch.randn(400, 256, device=DEVICE, generator=generator)
    weak = (student + 0.5 * torch.randn(400, 256, device=DEVICE, generator=generator)).to(dtype)
    queue = torch.randn(queue_len, 256, device=DEVICE, generator=generator).to(dtype)
    student = student.to(dtype).requires_grad_(True)
    loss = resam_kernels.ssa_loss(student, weak, queue, 0.07)
    (grad,) = torch.autograd.grad(loss, student)
    loss_ref = ssa_loss_reference(student, weak, queue, 0.07)
    (grad_ref,) = torch.autograd.grad(loss_ref, student)
    # fp32 dots run as tf32x3 or bf16x3 (whichever tile the autotuner keeps; about 2^-16
    # relative per bf16x3 product) on tensor cores; bf16 inputs are exact in it
    torch.testing.assert_close(loss, loss_ref, atol=1e-4, rtol=1e-4)
    scale = grad_ref.float().abs().max().item()
    tolerance = 1e-3 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.float(), grad_ref.float(), atol=tolerance * scale,
                               rtol=tolerance)


def test_ssa_every_float32_tile_against_float64():
    """Every float32 tile the autotuner may keep (tf32x3 and bf16x3), one at a time (a
    one-config autotuner runs it without timing), against the specification in float64, on
    spread-weight inputs (queue rows near the weak rows, so the h . Q products matter)."""
    import torch.nn.functional as F
    from resam_kernels import ssa as ssa_kernels

    generator = torch.Generator(device=DEVICE).manual_seed(5)
    weak = torch.randn(400, 256, device=DEVICE, generator=generator)
    queue = torch.cat([weak + 0.3 * torch.randn(400, 256, device=DEVICE, generator=generator)
                       for _ in range(2)] + [torch.randn(1200, 256, device=DEVICE, generator=generator)])
    student = weak + torch.randn(400, 256, device=DEVICE, generator=generator)
    student64 = student.double().requires_grad_(True)
    s, h, q = (F.normalize(x, dim=1) for x in (student64, weak.double(), queue.double()))
    weights = torch.softmax(torch.cat([(h * h).sum(1, keepdim=True), h @ q.T], dim=1) / 0.07, dim=1)
    loss64 = (weights * (1 - torch.cat([(s * h).sum(1, keepdim=True), s @ q.T], dim=1))).sum(1).mean()
    (grad64,) = torch.autograd.grad(loss64, student64)
    scale = grad64.abs().max().item()
    tuned = ssa_kernels._ssa_queue_partial_kernel_f32
    every_config = list(tuned.configs)
    try:
        for config in every_config:
            tuned.configs = [config]
            tuned.cache.clear()
            student_f32 = student.clone().requires_grad_(True)
            loss = resam_kernels.ssa_loss(student_f32, weak, queue, 0.07)
            (grad,) = torch.autograd.grad(loss, student_f32)
            assert abs(loss.double() - loss64).item() < 1e-6, config
            assert (grad.double() - grad64).abs().max().item() < 2e-5 * scale, config
    finally:
        tuned.configs = every_config
        tuned.cache.clear()


def mask_terms_and_gradient(fn, logits, target):
    """(focal, dice, iou) and d(sum focal + 2 sum dice)/d logits."""
    focal, dice, iou = fn(logits, target)
    (grad,) = torch.autograd.grad(focal.sum() + 2.0 * dice.sum(), logits)
    return focal, dice, iou, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_loss_terms_realistic(dtype):
    """4 images x 50 instances at 1024 x 1024 (the ViT-B training step), blob-like targets."""
    logits = smooth_logits(4, 50, 1024, dtype, seed=3).requires_grad_(True)
    target = smooth_logits(4, 50, 1024, torch.float32, seed=4) > 0
    target[0, 0] = False  # an empty target and a full one
    target[0, 1] = True
    focal, dice, iou, grad = mask_terms_and_gradient(resam_kernels.mask_loss_terms, logits, target)
    focal_ref, dice_ref, iou_ref, grad_ref = mask_terms_and_gradient(mask_loss_terms_reference, logits, target)
    # float32 sums of 2^20 pixels in another order, GPU exp2/log2 against torch's exp/log1p
    torch.testing.assert_close(focal, focal_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dice, dice_ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(iou, iou_ref)
    assert grad.dtype == dtype
    scale = grad_ref.float().abs().max().item()
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.float(), grad_ref.float(), atol=tolerance * scale, rtol=tolerance)


def test_mask_loss_terms_64bit_offsets():
    """2100 instances of 1024 x 1024 (2.2e9 pixels, bf16): the last planes start beyond 2^31."""
    num_instances = 2100
    generator = torch.Generator(device=DEVICE).manual_seed(5)
    logits = (torch.randn(num_instances, 1024, 1024, device=DEVICE, generator=generator,
                          dtype=torch.bfloat16) * 4).requires_grad_(True)
    target = torch.zeros(num_instances, 1024, 1024, dtype=torch.bool, device=DEVICE)
    target[-3:, 100:700, 200:900] = True
    focal, dice, iou, grad = mask_terms_and_gradient(resam_kernels.mask_loss_terms, logits, target)
    tail = logits.detach()[-3:].clone().requires_grad_(True)  # the reference on the last planes only
    focal_ref, dice_ref, iou_ref, grad_ref = mask_terms_and_gradient(mask_loss_terms_reference, tail,
                                                                     target[-3:])
    torch.testing.assert_close(focal[-3:], focal_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dice[-3:], dice_ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(iou[-3:], iou_ref)
    scale = grad_ref.float().abs().max().item()
    torch.testing.assert_close(grad[-3:].float(), grad_ref.float(), atol=1e-2 * scale, rtol=1e-2)


def test_upsampled_mask_loss_terms_realistic():
    """200 low-res masks of 256 x 256 against 1024 x 1024 targets (the ViT-B training step), float32,
    blob-like logits and targets: the fused kernels against the reference (F.interpolate, then the
    torch losses), forward and backward; and the fused path's memory stays far below one
    full-resolution float32 tensor (800 MiB), which the unfused path writes twice."""
    low_res = smooth_logits(4, 50, 256, torch.float32, seed=9).reshape(200, 256, 256).requires_grad_(True)
    target = (smooth_logits(4, 50, 1024, torch.float32, seed=10) > 0).reshape(200, 1024, 1024)
    target[0] = False  # an empty target and a full one
    target[1] = True
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    focal, dice, iou, grad = mask_terms_and_gradient(resam_kernels.upsampled_mask_loss_terms, low_res, target)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 128 * 2**20, f"fused forward + backward allocated {extra / 2**20:.0f} MiB"
    focal_ref, dice_ref, iou_ref, grad_ref = mask_terms_and_gradient(upsampled_mask_loss_terms_reference,
                                                                     low_res, target)
    # float32 sums of 2^20 pixels in another order, GPU exp2/log2 against torch's exp/log1p
    torch.testing.assert_close(focal, focal_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dice, dice_ref, atol=1e-6, rtol=1e-5)
    # the kernels interpolate with their own (fused) multiply-adds: a logit within rounding of 0
    # may take the other sign, which moves an IoU by about 1 / union (unions of ~10^5 pixels)
    torch.testing.assert_close(iou, iou_ref, atol=1e-5, rtol=0)
    scale = grad_ref.abs().max().item()
    torch.testing.assert_close(grad, grad_ref, atol=1e-4 * scale, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.bfloat16])
def test_instance_counts_realistic(dtype):
    """4 images x 50 instances at 1024 x 1024: bool masks, and logits thresholded in the kernel."""
    logits = smooth_logits(4, 50, 1024, torch.float32, seed=6)
    pred = logits > 0 if dtype == torch.bool else logits.to(dtype)
    gt = smooth_logits(4, 50, 1024, torch.float32, seed=7) > 0
    gt[0, 0] = True
    got = resam_kernels.instance_counts(pred, gt)
    assert got.dtype == torch.int64 and got.shape == (4, 50, 3)
    assert torch.equal(got, instance_counts_reference(pred, gt))


def test_upsample4x_realistic():
    """200 masks of 256 x 256 -> 1024 x 1024 (a ViT-B decode): values and the atomic-free gradient
    against F.interpolate and PyTorch's backward."""
    generator = torch.Generator(device=DEVICE).manual_seed(8)
    low_res = torch.randn(200, 1, 256, 256, device=DEVICE, generator=generator) * 8
    reference_input = low_res.clone().requires_grad_(True)
    expected = upsample4x_reference(reference_input)
    grad_out = torch.randn(expected.shape, device=DEVICE, generator=generator)
    expected_grad, = torch.autograd.grad(expected, reference_input, grad_out)
    triton_input = low_res.clone().requires_grad_(True)
    got = resam_kernels.upsample4x(triton_input)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-6)
    got_grad, = torch.autograd.grad(got, triton_input, grad_out)
    torch.testing.assert_close(got_grad, expected_grad, atol=1e-4, rtol=1e-5)


def mask_head_inputs(num, c_in, c_out, size, dtype, seed):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    upscaled = torch.randn(num, size, size, c_in, device=DEVICE, generator=generator).permute(0, 3, 1, 2)  # channels-last
    weight = torch.randn(c_in, c_out, 2, 2, device=DEVICE, generator=generator) / c_in ** 0.5
    bias = torch.randn(c_out, device=DEVICE, generator=generator)
    hyper_in = torch.randn(num, c_out, device=DEVICE, generator=generator)
    return [tensor.to(dtype).requires_grad_(True) for tensor in (upscaled, weight, bias, hyper_in)]


def mask_head_and_gradients(fn, inputs, grad_masks):
    masks = fn(*inputs)
    return masks, torch.autograd.grad(masks, inputs, grad_masks)


def test_mask_head_realistic():
    """The decoder's last stage in a ViT-B step: 200 prompts, 64 -> 32 channels, 128 x 128 -> 256 x 256, bf16."""
    inputs = mask_head_inputs(200, 64, 32, 128, torch.bfloat16, seed=6)
    assert inputs[0].is_contiguous(memory_format=torch.channels_last)
    grad_masks = torch.randn(200, 1, 256, 256, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(7))
    masks, grads = mask_head_and_gradients(resam_kernels.mask_head, inputs, grad_masks)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # a float32 reference, not TF32
        masks_ref, grads_ref = mask_head_and_gradients(mask_head_reference, inputs, grad_masks)
    assert masks.dtype == torch.float32
    # float32 on both sides from the same bf16 values: summation order and the GPU erf differ
    scale = masks_ref.abs().max().item()
    torch.testing.assert_close(masks, masks_ref, atol=1e-4 * scale, rtol=1e-3)
    for name, grad, grad_ref, tensor in zip(("upscaled", "weight", "bias", "hyper_in"), grads, grads_ref, inputs):
        assert grad.dtype == tensor.dtype and grad.shape == tensor.shape, name
        # d(pre-activation) rounded to bf16 for the products with upscaled and weight, like torch's
        # bf16 autograd; bf16 results: a step or two of 2^-8 relative to the largest entry
        scale = grad_ref.float().abs().max().item()
        torch.testing.assert_close(grad.float(), grad_ref.float(), atol=1e-2 * scale, rtol=2e-2, msg=name)
    _, grads_again = mask_head_and_gradients(resam_kernels.mask_head, inputs, grad_masks)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_again))  # deterministic: no atomics


def test_kernels_do_not_synchronise_the_host():
    """Refine, SSA, the mask losses, the monitoring counts, the upsampling and the decoder's
    LayerNorm and mask head run inside the training step: no device-to-host sync allowed."""
    logits = smooth_logits(2, 50, 256, torch.float32, seed=0)
    counts = torch.tensor([50, 20], device=DEVICE)
    student = torch.randn(40, 256, device=DEVICE, requires_grad=True)
    weak = torch.randn(40, 256, device=DEVICE)
    queue = torch.randn(1000, 256, device=DEVICE)
    mask_logits = logits.clone().requires_grad_(True)
    norm_bias = torch.zeros(256, device=DEVICE, requires_grad=True)
    head_inputs = mask_head_inputs(6, 64, 32, 32, torch.bfloat16, seed=0)

    def run_all():
        keep, confidence = resam_kernels.entropy_filter(logits, 0.5, return_confidence=True)
        for mode in ("drop", "argmax"):
            resam_kernels.suppress_overlap(keep, confidence, counts, mode)
        resam_kernels.ssa_loss(student, weak, queue, 0.07).backward()
        focal, dice, _ = resam_kernels.mask_loss_terms(mask_logits, keep)
        (focal.sum() + dice.sum()).backward()
        resam_kernels.instance_counts(logits, keep)
        resam_kernels.upsample4x(mask_logits[:, :3, :64, :64]).sum().backward()
        resam_kernels.layer_norm(student, None, norm_bias, 1e-6, residual=weak, pre_bias=norm_bias,
                                 gelu=True).sum().backward()
        resam_kernels.mask_head(*head_inputs).sum().backward()

    run_all()  # first call: compilation and the SSA autotuning may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_all()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert mask_logits.grad is not None and mask_logits.grad.abs().sum() > 0


def relpos_inputs(batch, heads, height, width, dtype, seed, head_dim=64):
    """q, k, v as the strided views SAM's qkv projection gives (B x N x 3 x heads x d permuted),
    rel_h / rel_w with logit-sized values, and an upstream gradient in the layout the encoder's
    permute gives (B x H x W x heads x d, permuted back): all as the training step has them."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    tokens = height * width
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, device=DEVICE, generator=generator).to(dtype)
    q, k, v = (x.detach().requires_grad_(True) for x in qkv.permute(2, 0, 3, 1, 4).unbind(0))
    rel_h = (torch.randn(batch, heads, tokens, height, device=DEVICE, generator=generator) * 2).to(dtype)
    rel_w = (torch.randn(batch, heads, tokens, width, device=DEVICE, generator=generator) * 2).to(dtype)
    upstream = torch.randn(batch, tokens, heads, head_dim, device=DEVICE, generator=generator).to(dtype)
    upstream = upstream.transpose(1, 2)  # B x heads x N x d, strided
    return [q, k, v, rel_h.requires_grad_(True), rel_w.requires_grad_(True)], upstream


def relpos_forward_backward(fn, inputs, upstream, grid_w):
    out = fn(*inputs, grid_w, inputs[0].shape[-1] ** -0.5)
    return (out, *torch.autograd.grad(out, inputs, upstream))


def assert_relpos_slices_match(inputs, upstream, grid_w, slices, tolerance):
    """The Triton kernels on the whole batch; the reference (materialising N x N) on some
    (image, heads) slices only: each slice's outputs and gradients depend on that slice alone."""
    results = relpos_forward_backward(relpos_attention_triton, inputs, upstream, grid_w)
    for index in slices:
        part = [x.detach()[index].clone().requires_grad_(True) for x in inputs]
        expected = relpos_forward_backward(relpos_attention_reference, part, upstream[index], grid_w)
        for name, got, want in zip(("out", "dq", "dk", "dv", "d_rel_h", "d_rel_w"), results, expected):
            scale = want.float().abs().max().item()
            torch.testing.assert_close(got[index].float(), want.float(), atol=tolerance * scale, rtol=tolerance,
                                       msg=f"{name} {index}")


def test_relpos_attention_global_blocks_bf16():
    """ViT-B global attention: 4 images x 12 heads, 64 x 64 tokens, d = 64, bf16."""
    inputs, upstream = relpos_inputs(4, 12, 64, 64, torch.bfloat16, seed=0)
    assert_relpos_slices_match(inputs, upstream, 64, [(slice(3, 4), slice(9, 12)), (slice(0, 1), slice(0, 1))],
                               tolerance=2e-2)


def test_relpos_attention_windowed_blocks_bf16():
    """ViT-B windowed attention: 100 windows (4 images x 25) x 12 heads, 14 x 14 tokens, bf16."""
    inputs, upstream = relpos_inputs(100, 12, 14, 14, torch.bfloat16, seed=1)
    assert_relpos_slices_match(inputs, upstream, 14, [(slice(None), slice(None))], tolerance=2e-2)


@pytest.mark.parametrize("height,width,head_dim", [(64, 64, 64), (14, 14, 64), (16, 16, 32), (9, 33, 24),
                                                    (14, 14, 80), (64, 64, 80)])
def test_relpos_attention_float32(height, width, head_dim):
    """float32 (IEEE dot products in the kernels): close to the reference; d 32 is the tiny model's,
    d 80 ViT-H's (the d > 64 launch configurations)."""
    inputs, upstream = relpos_inputs(2, 3, height, width, torch.float32, seed=height, head_dim=head_dim)
    assert_relpos_slices_match(inputs, upstream, width, [(slice(None), slice(None))], tolerance=1e-4)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-3), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("height,width", [(64, 64), (14, 14)])
def test_sdpa_attention_layer_uses_the_kernel(dtype, tolerance, height, width):
    """ViT-B's attention layer (768 channels, 12 heads) with the Triton kernel against SAM's own
    Attention in float32: output and gradients of the input and of every parameter; frozen
    relative-position tables (cached) and trainable ones."""
    from segment_anything.modeling.image_encoder import Attention

    from resam_dist.model import attention as attention_module
    from resam_dist.model.attention import set_attention

    assert attention_module.USE_TRITON_RELPOS
    torch.manual_seed(height)
    official = Attention(768, 12, use_rel_pos=True, input_size=(height, width)).to(DEVICE)
    official.rel_pos_h.data.normal_(0, 0.3)
    official.rel_pos_w.data.normal_(0, 0.3)
    fused = Attention(768, 12, use_rel_pos=True, input_size=(height, width))
    fused.load_state_dict(official.state_dict())
    fused = fused.to(DEVICE, dtype)
    set_attention(fused, "sdpa")
    x = torch.randn(2, height, width, 768, device=DEVICE)
    for frozen in (False, True, True):  # the second frozen call reuses the cached tables
        for module in (official, fused):
            module.zero_grad(set_to_none=True)
            module.rel_pos_h.requires_grad_(not frozen)
            module.rel_pos_w.requires_grad_(not frozen)
        x_a, x_b = x.clone().requires_grad_(True), x.to(dtype, copy=True).requires_grad_(True)  # never x itself
        out_a, out_b = official(x_a), fused(x_b)
        upstream = torch.randn_like(out_a)
        out_a.backward(upstream)
        out_b.backward(upstream.to(dtype))
        pairs = [("out", out_b, out_a), ("x.grad", x_b.grad, x_a.grad)]
        pairs += [(name, p_b.grad, p_a.grad) for (name, p_a), (_, p_b)
                  in zip(official.named_parameters(), fused.named_parameters()) if p_a.requires_grad]
        for name, got, want in pairs:
            scale = want.abs().max().item()
            torch.testing.assert_close(got.float(), want, atol=tolerance * scale, rtol=tolerance,
                                       msg=f"{name} frozen={frozen}")
    assert fused.__dict__["_relative_table_cache"]


def test_relpos_attention_does_not_synchronise_the_host():
    inputs, upstream = relpos_inputs(2, 3, 14, 14, torch.bfloat16, seed=2)
    relpos_forward_backward(relpos_attention_triton, inputs, upstream, 14)  # compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        relpos_forward_backward(relpos_attention_triton, inputs, upstream, 14)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("rows,channels,with_residual,with_pre_bias,gelu", [
    (200 * 128 * 128, 64, False, True, True),  # decoder upscaling: conv bias + LayerNorm2d + GELU
    (200 * 4096, 256, True, False, False),  # two-way transformer norm4: keys + attention output
    (1000 * 37 + 5, 100, True, True, True),  # C not a power of two, rows not a multiple of a tile
])
def test_layer_norm_realistic(rows, channels, with_residual, with_pre_bias, gelu):
    """The ViT-B decoder's LayerNorm shapes in bf16 (activations and parameters, as under DeepSpeed):
    values and all gradients against autograd of the float32 reference."""
    generator = torch.Generator(device=DEVICE).manual_seed(rows % 1000)

    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device=DEVICE, generator=generator) * scale + shift).to(torch.bfloat16)

    inputs = {"x": randn(rows, channels, scale=2.0, shift=0.5),
              "residual": randn(rows, channels) if with_residual else None,
              "pre_bias": randn(channels, scale=0.5) if with_pre_bias else None,
              "weight": randn(channels, scale=0.3, shift=1.0), "bias": randn(channels, scale=0.3)}
    upstream = randn(rows, channels)
    results = []
    for fn in (resam_kernels.layer_norm, layer_norm_reference):
        leaves = {name: t.clone().requires_grad_(True) for name, t in inputs.items() if t is not None}
        y = fn(leaves["x"], leaves["weight"], leaves["bias"], 1e-6, residual=leaves.get("residual"),
               pre_bias=leaves.get("pre_bias"), gelu=gelu)
        grads = torch.autograd.grad(y, list(leaves.values()), upstream)
        results.append((y, dict(zip(leaves, grads))))
    (y, grads), (y_ref, grads_ref) = results
    assert y.dtype == torch.bfloat16
    # both in float32, rounded to bf16 once: one or two steps of 2^-8
    torch.testing.assert_close(y.float(), y_ref.float(), atol=2e-2, rtol=2e-2)
    for name, grad_ref in grads_ref.items():
        grad = grads[name]
        assert grad.dtype == torch.bfloat16 and grad.shape == inputs[name].shape, name
        # parameter gradients: float32 sums over up to 3.3 M rows in another order, then bf16
        scale = grad_ref.float().abs().max().item()
        torch.testing.assert_close(grad.float(), grad_ref.float(), atol=1e-2 * scale, rtol=2e-2, msg=name)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_on_a_device_that_is_not_current():
    """Tensors on cuda:1 while cuda:0 is current: the dispatchers of the entropy filter, overlap
    suppression, instance counts and LayerNorm (with its backward), and ViT attention with the
    relative-position kernel, launch on the tensors' device (Triton would launch on the current
    one) and match their references."""
    other = torch.device("cuda", 1)
    with torch.cuda.device(0):
        generator = torch.Generator(device=other).manual_seed(7)
        logits = torch.randn(2, 7, 63, 64, device=other, generator=generator) * 4
        keep, confidence = resam_kernels.entropy_filter(logits, 0.3, return_confidence=True)
        keep_ref, confidence_ref = entropy_filter_reference(logits, 0.3, return_confidence=True)
        torch.testing.assert_close(confidence, confidence_ref, atol=1e-5, rtol=1e-5)
        assert not ((keep != keep_ref) & ((confidence_ref - 0.3).abs() > 1e-4)).any()
        counts = torch.tensor([7, 5], device=other)
        for mode in ("drop", "argmax"):
            out, boxes = resam_kernels.suppress_overlap(keep, confidence, counts, mode)
            out_ref, boxes_ref = suppress_overlap_reference(keep, confidence, counts, mode)
            assert torch.equal(out, out_ref) and torch.equal(boxes, boxes_ref), mode
        gt = torch.rand(2, 7, 63, 64, device=other, generator=generator) < 0.3
        assert torch.equal(resam_kernels.instance_counts(logits, gt), instance_counts_reference(logits, gt))
        x = torch.randn(37, 100, device=other, generator=generator, requires_grad=True)
        weight = torch.randn(100, device=other, generator=generator)
        bias = torch.randn(100, device=other, generator=generator)
        got = resam_kernels.layer_norm(x, weight, bias, 1e-6, gelu=True)
        expected = layer_norm_reference(x, weight, bias, 1e-6, gelu=True)
        assert torch.allclose(got, expected, atol=1e-4)
        (grad,) = torch.autograd.grad(got.square().sum(), x)
        (grad_ref,) = torch.autograd.grad(expected.square().sum(), x)
        assert torch.allclose(grad, grad_ref, atol=1e-3)
        from segment_anything.modeling.image_encoder import Attention

        from resam_dist.model.attention import set_attention
        official = Attention(768, 12, use_rel_pos=True, input_size=(14, 14)).to(other)
        official.rel_pos_h.data.normal_(0, 0.3)
        official.rel_pos_w.data.normal_(0, 0.3)
        fused = Attention(768, 12, use_rel_pos=True, input_size=(14, 14)).to(other)
        fused.load_state_dict(official.state_dict())
        set_attention(fused, "sdpa")
        tokens = torch.randn(2, 14, 14, 768, device=other, generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(fused(tokens), official(tokens), atol=2e-3, rtol=2e-3)
        assert torch.cuda.current_device() == 0


def test_inputs_on_cuda_and_on_the_cpu_are_refused_by_name():
    """A CUDA kernel given a CPU pointer would read garbage or fault: the dispatchers refuse first."""
    cuda = torch.device("cuda")
    masks = torch.rand(1, 3, 64, 64, device=cuda) > 0.5
    with pytest.raises(ValueError, match=r"'confidence' is on cpu but 'masks' is on cuda:\d"):
        resam_kernels.suppress_overlap(masks, torch.rand(1, 3, 64, 64), torch.tensor([3]), "argmax")
    student, weak = torch.randn(4, 32, device=cuda), torch.randn(4, 32, device=cuda)
    with pytest.raises(ValueError, match=r"resam_kernels\.ssa_loss: 'queue' is on cpu"):
        resam_kernels.ssa_loss(student, weak, torch.randn(9, 32), 0.1)
    # counts may stay on the host (the dispatcher moves them)
    out, boxes = resam_kernels.suppress_overlap(masks, None, torch.tensor([3]), "drop")
    out_ref, boxes_ref = suppress_overlap_reference(masks, None, torch.tensor([3], device=cuda), "drop")
    assert torch.equal(out, out_ref) and torch.equal(boxes, boxes_ref)

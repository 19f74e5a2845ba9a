"""Benchmark the Triton kernels against the torch eager reference and torch.compile of it.

    python benchmarks/bench_kernels.py [--out benchmarks/results] [--cpu-smoke] [--only CASE ...]

Median times come from `triton.testing.do_bench`; GB/s counts the bytes each operation must
move at least (inputs read once, outputs written once) and is set against the measured
device-to-device copy bandwidth (read + write of a 1 GiB tensor). Writes `kernels.json` and
`kernels.md` with the device name into the output folder. On a GPU each case also gets a
"triton_cuda_graph" row (the Triton call replayed from a CUDA graph: device time without the host's
launch cost, which dominates small shapes) and the memory-bound ones a "copy_same_bytes" row (a
copy moving as many bytes: what an op of that size can reach).

"layer_norm" (fused LayerNorm of the mask decoder, forward + backward, bf16) also times
"torch_eager_native": the add / F.layer_norm / GELU ops in bf16 that the decoder ran before the
fused kernel (the reference computes in float32, which costs extra passes).

"mask_loss_upsampled" (mask losses of the 4x upsampled low-res logits, forward + backward, float32)
also times "triton_unfused": the Triton upsampling then the Triton mask losses, which write the
full-resolution logits and their gradient (what the training step ran before the fused kernels).

Without CUDA it refuses to run (exit code 2) unless `--cpu-smoke`: tiny shapes through Triton's
interpreter and a wall-clock timer, only to test this script; those numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
CASES = ("entropy_filter", "suppress_overlap", "ssa_loss", "mask_loss", "relpos_attention", "layer_norm",
         "mask_head", "instance_counts", "upsample4x", "mask_loss_upsampled")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for kernels.json and kernels.md (default: benchmarks/results, "
                             "or benchmarks/results/smoke with --cpu-smoke)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on CPU through the Triton interpreter (tests the script only)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile baseline")
    parser.add_argument("--only", action="append", choices=CASES, default=None,
                        help="run only this case (repeatable; default: all)")
    return parser.parse_args(argv)


def median_call_ms(fn: Callable[[], object], *, wall_clock: bool) -> float:
    """Median milliseconds of one call of fn after a warm-up call (where Triton and torch.compile
    compile): `triton.testing.do_bench`, or with wall_clock the median of 3 timed calls (the
    interpreter's smoke runs)."""
    fn()
    if wall_clock:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    import triton.testing
    return float(triton.testing.do_bench(fn, return_mode="median"))


def copy_bandwidth_gbps(device, *, wall_clock: bool) -> float:
    """Device-to-device copy bandwidth, read + write, of a float32 tensor of 1 GiB (1 MiB with
    wall_clock, the interpreter's smoke runs)."""
    import torch
    copy_src = torch.ones((1 << 18) if wall_clock else (1 << 28), dtype=torch.float32, device=device)
    copy_dst = torch.empty_like(copy_src)
    copy_ms = median_call_ms(lambda: copy_dst.copy_(copy_src), wall_clock=wall_clock)
    return 2 * copy_src.numel() * 4 / (copy_ms * 1e-3) / 1e9


def compact_masks(batch: int, num_instances: int, height: int, width: int, device: torch.device,
                  generator: torch.Generator) -> torch.Tensor:
    """B x K x H x W bool: every instance a filled ellipse at a random place, semi-axes 1/20 to
    1/8 of the image side, so neighbours overlap (the teacher's masks that Refine suppresses are
    compact blobs, as the demo's overlays show)."""
    import torch

    def uniform(low: float, high: float) -> torch.Tensor:  # B x K x 1 x 1
        return low + (high - low) * torch.rand(batch, num_instances, 1, 1, device=device, generator=generator)

    rows = torch.arange(height, device=device).view(1, 1, height, 1)  # 1 x 1 x H x 1
    cols = torch.arange(width, device=device).view(1, 1, 1, width)  # 1 x 1 x 1 x W
    centre_y, centre_x = uniform(0, height), uniform(0, width)
    axis_y, axis_x = uniform(height / 20, height / 8), uniform(width / 20, width / 8)
    return ((rows - centre_y) / axis_y) ** 2 + ((cols - centre_x) / axis_x) ** 2 <= 1  # B x K x H x W


def overlap_bytes(counts, num_instances: int, pixels: int, read_bytes_per_pixel: int) -> int:
    """The bytes overlap suppression must move for B x K masks of `pixels` pixels each: the valid
    instances' planes read (mask byte, plus the confidence in "argmax" mode; the kernels do not
    read padding planes, k >= counts[b]), every plane written, and the B x K x 4 float32 boxes."""
    batch = counts.numel()
    valid_planes = int(counts.clamp(0, num_instances).sum())
    return valid_planes * pixels * read_bytes_per_pixel + batch * num_instances * (pixels + 16)


def shapes(smoke: bool) -> dict:
    if smoke:
        return {"filter": [(1, 3, 16, 16)], "ssa": [(4, 16, 32), (4, 16, 0)], "mask": [(1, 3, 16, 16)],
                "relpos": [(1, 2, 3, 5, 16)],
                "layer_norm": [("upscale", 300, 64, False, True, True), ("norm4", 50, 256, True, False, False)],
                "head": [(3, 64, 32, 8, 8)], "upsampled_loss": [(3, 4, 4)]}
    return {
        # B x K x H x W: K = 50 instances on the 256 (tiny) and 1024 (ViT) model canvas
        "filter": [(8, 50, 256, 256), (2, 50, 1024, 1024)],
        # N x C x q: 400 instances a step, 256 channels, queue lengths 128 .. 65536
        "ssa": [(400, 256, q) for q in (128, 1024, 8192, 65536)],
        # B x K x H x W mask logits of the student: 4 images x 50 instances at 1024 (ViT-B step)
        "mask": [(8, 50, 256, 256), (4, 50, 1024, 1024)],
        # B x heads x H x W x d of ViT-B's image-encoder attention on 4 images at 1024 px: the global
        # blocks (64 x 64 tokens) and the windowed ones (25 windows of 14 x 14 tokens per image)
        "relpos": [(4, 12, 64, 64, 64), (100, 12, 14, 14, 64)],
        # (site, rows, C, residual, pre_bias, gelu) of the ViT-B mask decoder, 200 prompts:
        # upscaling LayerNorm2d (200 x 128 x 128 pixels, 64 channels, conv bias + GELU fused) and
        # the two-way transformer's norm4 (200 x 4096 tokens, 256 channels, residual fused)
        "layer_norm": [("upscale", 200 * 128 * 128, 64, False, True, True),
                       ("norm4", 200 * 4096, 256, True, False, False)],
        # N x Cin x Cout x H x W: the mask decoder's last stage in a ViT-B step (200 prompts,
        # 64 -> 32 channels, 128 x 128 -> 256 x 256)
        "head": [(200, 64, 32, 128, 128)],
        # N x h x w low-res logits of a ViT-B step (4 images x 50 instances, 256 x 256 -> 1024 x 1024)
        "upsampled_loss": [(200, 256, 256)],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out is None:  # smoke numbers never overwrite real results
        args.out = DEFAULT_OUT / "smoke" if args.cpu_smoke else DEFAULT_OUT
    if args.cpu_smoke:
        # must happen before any Triton kernel module is imported
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench_kernels: no CUDA device; the kernel benchmark needs a GPU "
              "(use --cpu-smoke only to test this script on CPU)", file=sys.stderr)
        return 2
    import triton.testing

    import resam_kernels
    from resam_kernels.counts import instance_counts_reference
    from resam_kernels.entropy import entropy_filter_reference
    from resam_kernels.layer_norm import layer_norm_reference
    from resam_kernels.mask_head import mask_head_reference
    from resam_kernels.mask_loss import mask_loss_terms_reference
    from resam_kernels.mask_loss_upsampled import upsampled_mask_loss_terms_reference
    from resam_kernels import entropy as entropy_kernels
    from resam_kernels import overlap as overlap_kernels
    from resam_kernels import ssa as ssa_kernels
    from resam_kernels.overlap import suppress_overlap_reference
    from resam_kernels.relpos_attention import relpos_attention_reference
    from resam_kernels.ssa import ssa_loss_reference
    from resam_kernels.upsample import upsample4x_reference
    from resam_dist.durable import atomic_write_text  # a run killed at its time limit leaves whole files
    from resam_dist.model.attention import augmented_sdpa_attention

    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    device_name = ("cpu (Triton interpreter, smoke test: numbers are meaningless)"
                   if args.cpu_smoke else torch.cuda.get_device_name(device))
    use_compile = not args.cpu_smoke and not args.no_compile

    def median_ms(fn: Callable[[], object]) -> float:
        return median_call_ms(fn, wall_clock=args.cpu_smoke)

    def compiled(fn):
        # a fresh dynamo cache per case: one reference compiled for many shapes and dtypes
        # would otherwise hit the recompile limit and silently run eager
        if not use_compile:
            return None
        torch._dynamo.reset()
        return torch.compile(fn, dynamic=False)

    copy_gbps = copy_bandwidth_gbps(device, wall_clock=args.cpu_smoke)
    print(f"device-to-device copy on {device_name}: {copy_gbps:.1f} GB/s (read + write)", flush=True)

    rows: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        """Write kernels.json and kernels.md (after every case: a run cut short keeps its rows)."""
        result = {
            "device": device_name,
            "smoke": args.cpu_smoke,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "copy_bandwidth_gbps": copy_gbps,
            "timer": "wall clock, median of 3" if args.cpu_smoke else "triton.testing.do_bench median",
            "bytes_note": "minimum bytes moved: inputs read once, outputs written once",
            "rows": rows,
        }
        atomic_write_text(args.out / "kernels.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(args.out / "kernels.md", markdown(result))

    def best_config(tuned) -> str:
        """The config a `triton.autotune` kernel picked last (the GPU only)."""
        config = getattr(tuned, "best_config", None)
        return "-" if config is None else f"{config.kwargs} warps={config.num_warps}"

    def graph_ms(fn: Callable[[], object]) -> float:
        """Median of replays of fn captured in a CUDA graph: device time without host launch cost."""
        fn()
        return float(triton.testing.do_bench_cudagraph(fn, return_mode="median"))

    def record(kernel: str, shape: str, impls: dict[str, Callable | None], num_bytes: int,
               copy_reference: bool = False, tuned: Callable[[], str] | None = None) -> None:
        """Times each implementation ("torch_eager" first: the others' speed-up refers to it).
        On a GPU two rows follow: "triton_cuda_graph" (the Triton call replayed from a CUDA graph:
        its device time alone, to tell host launch cost from kernel time) and, with
        copy_reference, "copy_same_bytes" (a device-to-device copy moving the same number of bytes:
        the bandwidth a memory-bound op of this size can reach). `tuned` names the autotuner's
        choice for the Triton row (read after it ran)."""
        impls = dict(impls)
        copy_buffers = None
        if not args.cpu_smoke and impls.get("triton") is not None:
            impls["triton_cuda_graph"] = impls["triton"]
        if not args.cpu_smoke and copy_reference:
            copy_buffers = [torch.empty(num_bytes // 2, dtype=torch.uint8, device=device) for _ in range(2)]
            impls["copy_same_bytes"] = lambda: copy_buffers[1].copy_(copy_buffers[0])
        eager_ms = None
        for impl, fn in impls.items():
            row = {"kernel": kernel, "shape": shape, "impl": impl, "bytes": num_bytes}
            if fn is None:
                row.update(ms=None, gbps=None, pct_copy_bw=None, speedup_vs_eager=None,
                           note="skipped")
            else:
                try:
                    ms = graph_ms(fn) if impl == "triton_cuda_graph" else median_ms(fn)
                except Exception as error:  # a baseline that fails to compile is reported, not fatal
                    row.update(ms=None, gbps=None, pct_copy_bw=None, speedup_vs_eager=None,
                               note=f"failed: {type(error).__name__}: {error}"[:300])
                    rows.append(row)
                    continue
                gbps = num_bytes / (ms * 1e-3) / 1e9
                if impl == "torch_eager":
                    eager_ms = ms
                row.update(ms=ms, gbps=gbps, pct_copy_bw=100.0 * gbps / copy_gbps,
                           speedup_vs_eager=(eager_ms / ms) if eager_ms else None)
                if impl == "triton" and tuned is not None:
                    row["note"] = f"tuned: {tuned()}"
            rows.append(row)
            print(f"{kernel:18s} {shape:28s} {impl:14s} "
                  + (f"{row['ms']:9.4f} ms {row['gbps']:8.1f} GB/s" if row["ms"] else row["note"]),
                  flush=True)
        del copy_buffers
        save()

    def wanted(case: str) -> bool:
        return args.only is None or case in args.only

    generator = torch.Generator(device=device).manual_seed(0)
    filter_cases = wanted("entropy_filter") or wanted("suppress_overlap")
    for batch, num_instances, height, width in shapes(args.cpu_smoke)["filter"] if filter_cases else []:
        shape = f"{batch}x{num_instances}x{height}x{width}"
        numel = batch * num_instances * height * width
        for dtype in (torch.float32, torch.bfloat16):
            logits = torch.randn(batch, num_instances, height, width, device=device,
                                 dtype=dtype, generator=generator) * 4
            if not wanted("entropy_filter"):
                continue
            compiled_filter = compiled(entropy_filter_reference)
            record(f"entropy_filter/{str(dtype)[6:]}", shape, {
                "torch_eager": lambda: entropy_filter_reference(logits, 0.5, return_confidence=True),
                "triton": lambda: resam_kernels.entropy_filter(logits, 0.5, return_confidence=True),
                "torch_compile": compiled_filter and (
                    lambda: compiled_filter(logits, 0.5, return_confidence=True)),
            }, num_bytes=numel * (logits.element_size() + 1 + 4),  # logits in, keep + confidence out
                copy_reference=True, tuned=lambda: best_config(entropy_kernels._entropy_filter_kernel_tuned))
        keep, confidence = resam_kernels.entropy_filter(logits, 0.5, return_confidence=True)
        del logits
        counts = torch.full((batch,), num_instances, dtype=torch.int64, device=device)
        counts[0] = max(0, num_instances - 7)
        # Two kinds of masks: the filter's output on random logits (every instance keeps scattered
        # pixels everywhere, so every program folds a box for every instance: the worst case of
        # the box atomics), and compact ellipses (as Refine's masks are: an instance touches few
        # programs). Each kind is tuned afresh: the autotuner's key holds only the sizes.
        for masks_kind in ("random", "compact") if wanted("suppress_overlap") else ():
            if masks_kind == "compact":
                keep = compact_masks(batch, num_instances, height, width, device, generator)
            overlap_kernels.clear_tuning()
            suffix = "" if masks_kind == "random" else ", compact masks"
            for mode in ("drop", "argmax"):
                read_confidence = 4 if mode == "argmax" else 0
                compiled_overlap = compiled(suppress_overlap_reference)
                record(f"suppress_overlap/{mode}{suffix}", shape, {
                    "torch_eager": lambda: suppress_overlap_reference(keep, confidence, counts, mode),
                    "triton": lambda: resam_kernels.suppress_overlap(keep, confidence, counts, mode),
                    "torch_compile": compiled_overlap and (
                        lambda: compiled_overlap(keep, confidence, counts, mode)),
                }, num_bytes=overlap_bytes(counts, num_instances, height * width, 1 + read_confidence),
                    copy_reference=True, tuned=lambda mode=mode: best_config(
                        overlap_kernels._suppress_drop_words_kernel_tuned if mode == "drop" and width % 4 == 0
                        else overlap_kernels._suppress_overlap_kernel_tuned))
        del keep, confidence

    tau = 0.07
    for num_rows, dim, queue_len in shapes(args.cpu_smoke)["ssa"] if wanted("ssa_loss") else []:
        shape = f"N{num_rows}xC{dim}xq{queue_len}"
        for dtype in (torch.float32, torch.bfloat16):
            student = torch.randn(num_rows, dim, device=device, dtype=dtype, generator=generator)
            student.requires_grad_(True)
            weak = torch.randn(num_rows, dim, device=device, dtype=dtype, generator=generator)
            queue = torch.randn(queue_len, dim, device=device, dtype=dtype, generator=generator)

            def forward_backward(loss_fn):
                return lambda: torch.autograd.grad(loss_fn(student, weak, queue, tau), student)

            compiled_ssa = compiled(ssa_loss_reference)
            element = student.element_size()
            record(f"ssa_loss_fwd_bwd/{str(dtype)[6:]}", shape, {
                "torch_eager": forward_backward(ssa_loss_reference),
                "triton": forward_backward(resam_kernels.ssa_loss),
                "torch_compile": compiled_ssa and forward_backward(compiled_ssa),
            }, num_bytes=(queue_len + 2 * num_rows) * dim * element + num_rows * dim * element,
                tuned=lambda dtype=dtype: best_config(ssa_kernels._ssa_queue_partial_kernel_bf16
                                                      if dtype == torch.bfloat16
                                                      else ssa_kernels._ssa_queue_partial_kernel_f32))

    for batch, num_instances, height, width in shapes(args.cpu_smoke)["mask"] if wanted("mask_loss") else []:
        shape = f"{batch}x{num_instances}x{height}x{width}"
        numel = batch * num_instances * height * width
        for dtype in (torch.float32, torch.bfloat16):
            logits = torch.randn(batch, num_instances, height, width, device=device, dtype=dtype,
                                 generator=generator) * 4
            logits.requires_grad_(True)
            target = torch.rand(batch, num_instances, height, width, device=device,
                                generator=generator) < 0.3

            def forward_backward(terms_fn):
                return loss_terms_forward_backward(terms_fn, logits, target)

            compiled_terms = compiled(mask_loss_terms_reference)
            element = logits.element_size()
            # forward reads logits + target; backward reads them again and writes the gradient
            record(f"mask_loss_fwd_bwd/{str(dtype)[6:]}", shape, {
                "torch_eager": forward_backward(mask_loss_terms_reference),
                "triton": forward_backward(resam_kernels.mask_loss_terms),
                "torch_compile": compiled_terms and forward_backward(compiled_terms),
            }, num_bytes=numel * (2 * (element + 1) + element))
            del logits, target

    for batch, num_instances, height, width in shapes(args.cpu_smoke)["mask"] if wanted("instance_counts") else []:
        # the step's monitoring IoUs: bool masks, and float32 logits thresholded inside
        shape = f"{batch}x{num_instances}x{height}x{width}"
        numel = batch * num_instances * height * width
        logits = torch.randn(batch, num_instances, height, width, device=device, generator=generator)
        gt = torch.rand(batch, num_instances, height, width, device=device, generator=generator) < 0.3
        compiled_counts = compiled(instance_counts_reference)
        for name, pred in (("bool", logits > 0), ("float32", logits)):
            record(f"instance_counts/{name}", shape, {
                "torch_eager": lambda pred=pred: instance_counts_reference(pred, gt),
                "triton": lambda pred=pred: resam_kernels.instance_counts(pred, gt),
                "torch_compile": compiled_counts and (lambda pred=pred: compiled_counts(pred, gt)),
            }, num_bytes=numel * (pred.element_size() + 1), copy_reference=True)
        del logits, gt

    for batch, num_instances, height, width in shapes(args.cpu_smoke)["mask"] if wanted("upsample4x") else []:
        # the decoder's 4x upsampling of the low-res logits to the canvas (forward + backward)
        low_h, low_w = height // 4, width // 4
        shape = f"{batch * num_instances}x1x{low_h}x{low_w}"
        low_res = torch.randn(batch * num_instances, 1, low_h, low_w, device=device, generator=generator)
        low_res.requires_grad_(True)
        upstream = torch.randn(batch * num_instances, 1, height, width, device=device, generator=generator)

        def upsample_forward_backward(upsample_fn):
            def run():
                return torch.autograd.grad(upsample_fn(low_res), low_res, upstream)
            return run

        compiled_upsample = compiled(upsample4x_reference)
        numel = batch * num_instances * height * width
        # forward writes the float32 output; backward reads its gradient (inputs: 1/16 of that)
        record("upsample4x_fwd_bwd/float32", shape, {
            "torch_eager": upsample_forward_backward(upsample4x_reference),
            "triton": upsample_forward_backward(resam_kernels.upsample4x),
            "torch_compile": compiled_upsample and upsample_forward_backward(compiled_upsample),
        }, num_bytes=numel * 4 * 2 + (numel // 16) * 4 * 2)
        del low_res, upstream

    for num, low_h, low_w in shapes(args.cpu_smoke)["upsampled_loss"] if wanted("mask_loss_upsampled") else []:
        shape = f"{num}x{low_h}x{low_w}->{4 * low_h}x{4 * low_w}"
        low_res = torch.randn(num, low_h, low_w, device=device, generator=generator) * 4  # N x h x w
        low_res.requires_grad_(True)
        target = torch.rand(num, 4 * low_h, 4 * low_w, device=device, generator=generator) < 0.3

        def unfused_terms(low_res, target):
            full = resam_kernels.upsample4x(low_res.unsqueeze(1)).squeeze(1)  # N x 4h x 4w float32
            return resam_kernels.mask_loss_terms(full, target)

        def upsampled_forward_backward(terms_fn):
            return loss_terms_forward_backward(terms_fn, low_res, target)

        compiled_upsampled = compiled(upsampled_mask_loss_terms_reference)
        low_numel = num * low_h * low_w
        # low-res logits and target read, low-res gradient written (the fused kernels read both
        # twice, once a pass; the others also write and read full-res logits and gradients)
        record("mask_loss_upsampled_fwd_bwd/float32", shape, {
            "torch_eager": upsampled_forward_backward(upsampled_mask_loss_terms_reference),
            "triton": upsampled_forward_backward(resam_kernels.upsampled_mask_loss_terms),
            "triton_unfused": upsampled_forward_backward(unfused_terms),
            "torch_compile": compiled_upsampled and upsampled_forward_backward(compiled_upsampled),
        }, num_bytes=low_numel * 4 + 16 * low_numel + low_numel * 4)
        del low_res, target

    for batch, heads, height, width, head_dim in shapes(args.cpu_smoke)["relpos"] if wanted("relpos_attention") else []:
        shape = f"{batch}x{heads}x{height}x{width}xd{head_dim}"
        tokens = height * width
        dtype = torch.bfloat16
        # q, k, v as the strided views of SAM's qkv projection; rel tables as the einsums give them
        qkv = torch.randn(batch, tokens, 3, heads, head_dim, device=device, generator=generator).to(dtype)
        q, k, v = (x.detach().requires_grad_(True) for x in qkv.permute(2, 0, 3, 1, 4).unbind(0))
        rel_h = torch.randn(batch, heads, tokens, height, device=device, generator=generator).to(dtype)
        rel_w = torch.randn(batch, heads, tokens, width, device=device, generator=generator).to(dtype)
        inputs = (q, k, v, rel_h.requires_grad_(True), rel_w.requires_grad_(True))
        upstream = torch.randn(batch, heads, tokens, head_dim, device=device, generator=generator).to(dtype)

        def forward_backward(attention_fn):
            def run():
                out = attention_fn(*inputs, width, head_dim ** -0.5)
                return torch.autograd.grad(out, inputs, upstream)
            return run

        compiled_attention = compiled(relpos_attention_reference)
        element = q.element_size()
        qkv_bytes = batch * heads * tokens * head_dim * element
        rel_bytes = batch * heads * tokens * (height + width) * element
        # forward: q, k, v, rel tables in, out; backward: q, k, v, rel, out, d out in, their gradients out
        record(f"relpos_attention_fwd_bwd/{str(dtype)[6:]}", shape, {
            "torch_eager": forward_backward(relpos_attention_reference),
            "triton": forward_backward(resam_kernels.relpos_attention),
            "sdpa_augmented": forward_backward(augmented_sdpa_attention),
            "torch_compile": compiled_attention and forward_backward(compiled_attention),
        }, num_bytes=(4 * qkv_bytes + rel_bytes) + (5 * qkv_bytes + rel_bytes) + (3 * qkv_bytes + rel_bytes))
        del qkv, inputs, upstream

    def layer_norm_native(x, weight, bias, eps, *, residual=None, pre_bias=None, gelu=False):
        """What the decoder ran before the fused kernel: add, F.layer_norm and GELU in x's dtype."""
        z = x if residual is None else x + residual
        z = z if pre_bias is None else z + pre_bias.to(z.dtype)
        y = torch.nn.functional.layer_norm(z, (z.shape[-1],), weight, bias, eps)
        return torch.nn.functional.gelu(y) if gelu else y

    for site, num_rows, channels, with_residual, with_pre_bias, gelu in (
            shapes(args.cpu_smoke)["layer_norm"] if wanted("layer_norm") else []):
        base_shape = f"{site}:{num_rows}x{channels}" + "+res" * with_residual + "+bias+gelu" * with_pre_bias
        dtype = torch.bfloat16  # the DeepSpeed bf16 model: activations and LayerNorm weights
        x = torch.randn(num_rows, channels, device=device, dtype=dtype, generator=generator).requires_grad_(True)
        residual = (torch.randn(num_rows, channels, device=device, dtype=dtype, generator=generator)
                    .requires_grad_(True) if with_residual else None)
        pre_bias = (torch.randn(channels, device=device, dtype=dtype, generator=generator).requires_grad_(True)
                    if with_pre_bias else None)
        weight = (1 + 0.1 * torch.randn(channels, device=device, generator=generator)).to(dtype)
        bias = (0.1 * torch.randn(channels, device=device, generator=generator)).to(dtype)
        upstream = torch.randn(num_rows, channels, device=device, dtype=dtype, generator=generator)
        # frozen weight and bias as in LoRA training (the decoder's LayerNorms), then trainable ones
        # (full fine-tuning: the backward also sums their gradients over the rows)
        for trainable in (False, True):
            weight.requires_grad_(trainable)
            bias.requires_grad_(trainable)
            leaves = [t for t in (x, residual, pre_bias, weight, bias) if t is not None and t.requires_grad]
            shape = base_shape + ("+trainable" if trainable else "+frozen")

            def forward_backward(norm_fn):
                def run():
                    y = norm_fn(x, weight, bias, 1e-6, residual=residual, pre_bias=pre_bias, gelu=gelu)
                    return torch.autograd.grad(y, leaves, upstream)
                return run

            compiled_norm = compiled(layer_norm_reference)
            # rows x C tensors only: forward reads x (+ residual) and writes y; backward reads x
            # (+ residual) and dy and writes dx (also d residual: the same tensor)
            tensors = 2 * (1 + with_residual) + 3
            record("layer_norm_fwd_bwd/bfloat16", shape, {
                "torch_eager": forward_backward(layer_norm_reference),
                "triton": forward_backward(resam_kernels.layer_norm),
                "torch_compile": compiled_norm and forward_backward(compiled_norm),
                "torch_eager_native": forward_backward(layer_norm_native),
            }, num_bytes=num_rows * channels * x.element_size() * tensors)
        del x, residual, upstream
    def sam_mask_head(upscaled, weight, bias, hyper_in):
        """The decoder's torch code (SAM's modules) in the input dtype, converted to float32 as the
        decoder's caller does: the path the fused kernel replaces."""
        pixels = torch.nn.functional.gelu(torch.nn.functional.conv_transpose2d(
            upscaled, weight, bias, stride=2))  # N x Cout x 2H x 2W
        num, c_out, height, width = pixels.shape
        pixels = pixels.permute(0, 2, 3, 1).reshape(num, height * width, c_out)  # N x 4HW x Cout
        return (pixels @ hyper_in.unsqueeze(2)).reshape(num, 1, height, width).float()

    for num, c_in, c_out, height, width in shapes(args.cpu_smoke)["head"] if wanted("mask_head") else []:
        shape = f"N{num}xCin{c_in}xCout{c_out}x{height}x{width}"
        dtype = torch.bfloat16
        upscaled = torch.randn(num, height, width, c_in, device=device, generator=generator).permute(0, 3, 1, 2)
        head_inputs = [upscaled.to(dtype).requires_grad_(True),  # channels-last, as the decoder has it
                       (torch.randn(c_in, c_out, 2, 2, device=device, generator=generator) / c_in ** 0.5
                        ).to(dtype).requires_grad_(True),
                       torch.randn(c_out, device=device, generator=generator).to(dtype).requires_grad_(True),
                       torch.randn(num, c_out, device=device, generator=generator).to(dtype).requires_grad_(True)]
        grad_masks = torch.randn(num, 1, 2 * height, 2 * width, device=device, generator=generator)

        def head_forward(head_fn):
            def run():
                with torch.no_grad():
                    return head_fn(*head_inputs)
            return run

        def head_forward_backward(head_fn):
            return lambda: torch.autograd.grad(head_fn(*head_inputs), head_inputs, grad_masks)

        compiled_head = compiled(mask_head_reference)
        upscaled_bytes = upscaled.numel() * head_inputs[0].element_size()
        masks_bytes = grad_masks.numel() * 4  # float32 masks
        # forward: read upscaled, write the masks; backward: read upscaled and d masks, write
        # d upscaled (the weights, bias and hyper_in are negligible)
        for kind, wrap, num_bytes in (
                ("fwd", head_forward, upscaled_bytes + masks_bytes),
                ("fwd_bwd", head_forward_backward, 3 * upscaled_bytes + 2 * masks_bytes)):
            record(f"mask_head_{kind}/{str(dtype)[6:]}", shape, {
                "torch_eager": wrap(mask_head_reference),
                "triton": wrap(resam_kernels.mask_head),
                "torch_compile": compiled_head and wrap(compiled_head),
                "torch_sam_bf16": wrap(sam_mask_head),
            }, num_bytes=num_bytes)
        del upscaled, head_inputs, grad_masks

    save()
    print(f"wrote {args.out / 'kernels.json'} and {args.out / 'kernels.md'}")
    return 0


def loss_terms_forward_backward(terms_fn: Callable, logits, target) -> Callable[[], object]:
    """A timed call: the (focal, dice, iou) terms of logits against target, then the gradient of
    sum(focal) + sum(dice) with respect to logits."""
    import torch  # imported in main, after the interpreter switch

    def run():
        focal, dice, _ = terms_fn(logits, target)
        return torch.autograd.grad(focal.sum() + dice.sum(), logits)
    return run


def markdown(result: dict) -> str:
    def number(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = [
        "# Kernel benchmark",
        "",
        f"Device: **{result['device']}** (torch {result['torch']}, triton {result['triton']}). "
        f"Measured device-to-device copy bandwidth: {result['copy_bandwidth_gbps']:.1f} GB/s. "
        f"Median time ({result['timer']}); GB/s = minimum bytes moved / time; "
        "% copy = GB/s against that copy bandwidth; speed-up against torch eager. "
        "\"triton_cuda_graph\": the Triton call replayed from a CUDA graph (device time without "
        "host launch cost); \"copy_same_bytes\": a device-to-device copy of the same number of bytes.",
        "",
        "| kernel | shape | impl | median ms | GB/s | % copy BW | speed-up vs eager | note |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        ms = number(row["ms"], ".4f") if row["ms"] is not None else "-"
        lines.append(f"| {row['kernel']} | {row['shape']} | {row['impl']} | {ms} | "
                     f"{number(row['gbps'], '.1f')} | {number(row['pct_copy_bw'], '.1f')} | "
                     f"{number(row['speedup_vs_eager'], '.2f')} | {row.get('note', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

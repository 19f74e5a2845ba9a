"""H200 run 13's experiment: "drop" overlap suppression at 2 x 50 x 1024 x 1024 (bool masks), the
word kernel's tile design against its strip design (boxes reduced once per program), over a range
of launch configurations. Every config is checked against `suppress_overlap_reference` (masks and
boxes) before it is timed. Timings per config (triton.testing, median):
- wrapper: `suppress_overlap_triton(..., config=...)` (allocations, memset and launch: host cost
  included, as a caller sees it);
- graph: the same call replayed from a CUDA graph (its device time);
- kernel: the kernel launched alone on preallocated buffers (it leaves its box state zeroed);
- kernel graph (call 2): that launch replayed from a CUDA graph.
Run from the repository root: PYTHONPATH=$PWD:/tmp/src python3 <this file> (kernels/ linked as
/tmp/src/resam_kernels)."""

import sys

import torch
import triton
import triton.testing

import resam_kernels
from resam_kernels import overlap
from resam_kernels.overlap import suppress_overlap_reference, suppress_overlap_triton, word_kernel_grid

sys.path.insert(0, "benchmarks")
from bench_kernels import compact_masks  # noqa: E402

device = torch.device("cuda")
print("device", torch.cuda.get_device_name(0), "torch", torch.__version__, "triton", triton.__version__,
      flush=True)
source = torch.empty(1 << 28, dtype=torch.float32, device=device).fill_(1.0)
target = torch.empty_like(source)
copy_ms = triton.testing.do_bench(lambda: target.copy_(source), return_mode="median")
copy_gbps = 2 * source.numel() * 4 / (copy_ms * 1e-3) / 1e9
del source, target
print(f"copy bandwidth {copy_gbps:.1f} GB/s", flush=True)

batch, num_instances, height, width = 2, 50, 1024, 1024
generator = torch.Generator(device=device).manual_seed(0)
logits = torch.randn(batch, num_instances, height, width, device=device, generator=generator) * 4
random_keep = resam_kernels.entropy_filter(logits, 0.5)
del logits
masks_by_kind = {"random": random_keep,
                 "compact": compact_masks(batch, num_instances, height, width, device, generator)}
counts = torch.tensor([num_instances - 7, num_instances], device=device)
num_bytes = batch * num_instances * height * width * 2 + batch * num_instances * 16
kp = 64


def config(tile, warps, strip=0, prefetch=1):
    kwargs = {"TILE": tile}
    if strip:
        kwargs.update(STRIP_ROWS=strip, PREFETCH=prefetch)
    return triton.Config(kwargs, num_warps=warps)


# call 2's range (call 1 ran an earlier version of this script over strips of 4-16 rows with
# prefetch off and on, 5 tile / warp pairs; without prefetch the kernel has no code path any more)
candidates = [config(8192, 4), config(2048, 4, 16, 1)]  # run 12's pick; call 1's best strip
candidates += [config(tile, warps, strip, prefetch) for tile, warps, strip, prefetch in (
    (2048, 4, 16, 2), (2048, 4, 24, 1), (2048, 4, 32, 1), (2048, 4, 32, 2), (2048, 2, 16, 1),
    (2048, 2, 32, 2), (2048, 8, 32, 1), (1024, 2, 16, 2), (1024, 2, 32, 1), (1024, 2, 32, 2),
    (4096, 4, 32, 1), (4096, 8, 16, 2), (4096, 8, 32, 1), (4096, 8, 32, 2))]
only = [arg for arg in sys.argv[1:] if arg.isdigit()]  # optional: config indices
results = []
for kind, keep in masks_by_kind.items():
    out_ref, boxes_ref = suppress_overlap_reference(keep, None, counts, "drop")
    words = keep.view(torch.uint8).view(torch.int32)
    for index, cfg in enumerate(candidates):
        if only and str(index) not in only:
            continue
        name = f"{kind:7s} #{index:2d} {cfg.kwargs} w{cfg.num_warps}"
        try:
            out, boxes = suppress_overlap_triton(keep, None, counts, "drop", config=cfg)
            correct = torch.equal(out, out_ref) and torch.equal(boxes, boxes_ref)
            if not correct:
                print(name, "WRONG", flush=True)
                continue
            wrapper_ms = triton.testing.do_bench(
                lambda: suppress_overlap_triton(keep, None, counts, "drop", config=cfg), return_mode="median")
            graph_ms = triton.testing.do_bench_cudagraph(
                lambda: suppress_overlap_triton(keep, None, counts, "drop", config=cfg), return_mode="median")
            output = torch.empty_like(words)
            state = torch.zeros(batch * num_instances * 4 + batch, dtype=torch.int32, device=device)
            box_out = torch.empty(batch, num_instances, 4, device=device)
            grid = word_kernel_grid(cfg.kwargs, batch, kp, height, width // 4)

            def launch():
                overlap._suppress_drop_words_kernel[grid](
                    words, counts, output, state, state[batch * num_instances * 4:], box_out, num_instances,
                    width // 4, height * width // 4, 0, KP=kp, ZERO_ONE=True, num_warps=cfg.num_warps,
                    **cfg.kwargs)
            kernel_ms = triton.testing.do_bench(launch, return_mode="median")
            kernel_graph_ms = triton.testing.do_bench_cudagraph(launch, return_mode="median")
            assert torch.equal(box_out, boxes_ref) and not state.any()
        except Exception as error:  # a config that fails to compile or launch is reported
            print(name, "FAILED", type(error).__name__, str(error)[:200], flush=True)
            continue
        pct = [100 * num_bytes / (ms * 1e-3) / 1e9 / copy_gbps
               for ms in (wrapper_ms, graph_ms, kernel_ms, kernel_graph_ms)]
        results.append((kind, index, pct))
        print(f"{name:70s} wrapper {wrapper_ms:.4f} ms {pct[0]:5.1f}% | graph {graph_ms:.4f} ms {pct[1]:5.1f}% "
              f"| kernel {kernel_ms:.4f} ms {pct[2]:5.1f}% | kernel graph {kernel_graph_ms:.4f} ms {pct[3]:5.1f}%",
              flush=True)
for kind in masks_by_kind:
    best = sorted((row for row in results if row[0] == kind), key=lambda row: -row[2][1])[:5]
    print("best by graph time", kind, [(index, [round(p, 1) for p in pct]) for _, index, pct in best])

"""H200 run 17: on one machine, a plain `suppress_overlap` "drop" call with direct launches of kept
compiled kernels (`overlap._launch`) against the same call through Triton's JIT dispatch every
time (A/B, alternating, three rounds): host time of one call at 1 x 50 x 64², and at the
benchmark's 2 x 50 x 1024² the device time as `triton.testing.do_bench` takes it (the L2 cleared
before each call) for the plain call and for the same call replayed from a CUDA graph, against a
copy of the same bytes and the device-to-device copy bandwidth. Run from the repository root with
PYTHONPATH holding `resam_kernels`."""

import statistics
import time

import torch
import triton

import resam_kernels
from resam_kernels import overlap
from resam_kernels.entropy import entropy_filter_reference

device = torch.device("cuda")
direct_launch = overlap._launch


def jit_launch(jit_fn, grid, args, constexprs, config):
    jit_fn[grid](*args, **constexprs, **config.all_kwargs())


def per_call_us(fn, calls=3000):
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


small = torch.rand(1, 50, 64, 64, device=device) < 0.05
small_counts = torch.tensor([50], device=device)
small_call = lambda: resam_kernels.suppress_overlap(small, None, small_counts, "drop")  # noqa: E731

copy_src = torch.ones(1 << 28, dtype=torch.float32, device=device)
copy_dst = torch.empty_like(copy_src)
copy_gbps = 2 * copy_src.numel() * 4 / (triton.testing.do_bench(lambda: copy_dst.copy_(copy_src)) * 1e-3) / 1e9
del copy_src, copy_dst
print(f"device-to-device copy: {copy_gbps:.1f} GB/s", flush=True)
generator = torch.Generator(device=device).manual_seed(0)
logits = torch.randn(2, 50, 1024, 1024, device=device, generator=generator) * 4
big, _ = entropy_filter_reference(logits, 0.5, return_confidence=True)
del logits
big_counts = torch.tensor([43, 50], device=device)
big_call = lambda: resam_kernels.suppress_overlap(big, None, big_counts, "drop")  # noqa: E731
ref_out, ref_boxes = overlap.suppress_overlap_reference(big, None, big_counts, "drop")
num_bytes = 2 * big.numel() + 2 * 50 * 16
same_bytes_src = torch.ones(big.numel() // 4, dtype=torch.int32, device=device)
same_bytes_dst = torch.empty_like(same_bytes_src)

rows: dict[str, list[float]] = {}
for round_index in range(3):
    for name, launch in (("direct", direct_launch), ("jit", jit_launch)):
        overlap._launch = launch
        for call in (small_call, big_call, big_call):  # picks, then (direct) the kept kernel
            call()
        out, boxes = big_call()
        assert torch.equal(out, ref_out) and torch.equal(boxes, ref_boxes)
        rows.setdefault(f"{name}: host us a call, 1x50x64x64", []).append(per_call_us(small_call))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            big_call()
        rows.setdefault(f"{name}: do_bench plain call ms", []).append(triton.testing.do_bench(big_call))
        rows.setdefault(f"{name}: do_bench graph replay ms", []).append(triton.testing.do_bench(graph.replay))
        rows.setdefault(f"{name}: do_bench_cudagraph ms", []).append(triton.testing.do_bench_cudagraph(big_call))
        del graph
    rows.setdefault("copy of the same bytes: do_bench ms", []).append(
        triton.testing.do_bench(lambda: same_bytes_dst.copy_(same_bytes_src)))
    print(f"round {round_index + 1} done", flush=True)
overlap._launch = direct_launch
print(f"compiled kernels kept: {len(overlap._COMPILED)}")
for name, values in rows.items():
    text = " ".join(f"{value:.4f}" for value in values)
    line = f"{name}: {text} (median {statistics.median(values):.4f})"
    if name.endswith(" ms"):
        gbps = num_bytes / (statistics.median(values) * 1e-3) / 1e9
        line += f", {gbps:.1f} GB/s, {100 * gbps / copy_gbps:.1f}% of copy"
    print(line, flush=True)

"""H200 run 15: host time of one `suppress_overlap` call ("drop", word kernel) once a launch seen
before calls its compiled kernel directly (`overlap._launch`), as run 14's script measured it
(1 x 50 x 64 x 64: the wrapper; the pick's launch alone; one allocation for scale; cProfile), then
"drop" at the benchmark's 2 x 50 x 1024² as a plain call and replayed from a CUDA graph, timed by
`triton.testing.do_bench`, against the device-to-device copy bandwidth measured here. Run from the
repository root with PYTHONPATH holding the repository and `resam_kernels`."""

import cProfile
import pstats
import time

import torch
import triton

import resam_kernels
from resam_kernels import overlap
from resam_kernels.entropy import entropy_filter_reference

device = torch.device("cuda")
keep = torch.rand(1, 50, 64, 64, device=device) < 0.05
counts = torch.tensor([50], device=device)


def per_call_us(fn, calls=3000):
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


wrapper = lambda: resam_kernels.suppress_overlap(keep, None, counts, "drop")  # noqa: E731
wrapper()  # tunes this size class and records its pick
wrapper()  # its first direct launch: through Triton's JIT, then kept
(pick_key, config), = overlap._WORD_PICKS.items()
print("pick", pick_key, config, "compiled kernels kept:", len(overlap._COMPILED), flush=True)
out = torch.empty_like(keep)
state, arrivals = overlap._zeroed_box_state(keep)
boxes = torch.empty(1, 50, 4, device=device)
args = (keep.view(torch.int32), counts, out.view(torch.int32), state, arrivals, boxes, 50, 16, 1024, 10)
launch = lambda: overlap._launch_words(config, args, 1, 64, 64, 16, True)  # noqa: E731
expected_out, expected_boxes = overlap.suppress_overlap_reference(keep, None, counts, "drop")
got_out, got_boxes = wrapper()
assert torch.equal(got_out, expected_out) and torch.equal(got_boxes, expected_boxes)
print(f"wrapper: {per_call_us(wrapper):.1f} us a call", flush=True)
print(f"picked config's launch alone: {per_call_us(launch):.1f} us a call", flush=True)
print(f"torch.empty_like alone: {per_call_us(lambda: torch.empty_like(keep)):.1f} us a call", flush=True)
profile = cProfile.Profile()
profile.enable()
for _ in range(2000):
    wrapper()
profile.disable()
torch.cuda.synchronize()
pstats.Stats(profile).sort_stats("tottime").print_stats(12)

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
call = lambda: resam_kernels.suppress_overlap(big, None, big_counts, "drop")  # noqa: E731
big_out, big_boxes = call()
ref_out, ref_boxes = overlap.suppress_overlap_reference(big, None, big_counts, "drop")
assert torch.equal(big_out, ref_out) and torch.equal(big_boxes, ref_boxes)
call()
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    call()
num_bytes = 2 * big.numel() + 2 * 50 * 16
for name, fn in (("plain call", call), ("CUDA graph", graph.replay), ("plain call", call)):
    ms = triton.testing.do_bench(fn)
    gbps = num_bytes / (ms * 1e-3) / 1e9
    print(f"drop 2x50x1024x1024 {name}: {ms:.4f} ms, {gbps:.1f} GB/s, {100 * gbps / copy_gbps:.1f}% of copy",
          flush=True)

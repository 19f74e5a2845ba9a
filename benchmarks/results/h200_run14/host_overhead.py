"""H200 run 14: host time of one `suppress_overlap` call ("drop", word kernel) after stop 25's
change (tuned picks launched directly, fewer tensors a call), on a small input where the device
time is negligible: the wrapper; the picked config's launch alone on prebuilt arguments (the
floor a wrapper could reach); one torch allocation for scale; then cProfile of the wrapper (top
functions by own time). Run 13 measured 121 us a call for the wrapper and 43.5 us for the tuned
launch alone, with run 13's code. Run from the repository root with PYTHONPATH holding the
repository and `resam_kernels` (benchmarks/gpu_checks.sh sets it up)."""

import cProfile
import pstats
import time

import torch

import resam_kernels
from resam_kernels import overlap

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
(pick_key, config), = overlap._WORD_PICKS.items()
print("pick", pick_key, config, flush=True)
words = keep.view(torch.int32)
out = torch.empty_like(keep)
state, arrivals = overlap._zeroed_box_state(keep)
boxes = torch.empty(1, 50, 4, device=device)
args = (words, counts, out.view(torch.int32), state, arrivals, boxes, 50, 16, 1024, 10)
launch = lambda: overlap._launch_words(config, args, 1, 64, 64, 16, True)  # noqa: E731
expected_out, expected_boxes = overlap.suppress_overlap_reference(keep, None, counts, "drop")
got_out, got_boxes = wrapper()
assert torch.equal(got_out, expected_out) and torch.equal(got_boxes, expected_boxes)
print(f"wrapper: {per_call_us(wrapper):.1f} us a call", flush=True)
print(f"picked config's launch alone: {per_call_us(launch):.1f} us a call", flush=True)
print(f"torch.empty_like alone: {per_call_us(lambda: torch.empty_like(keep)):.1f} us a call", flush=True)
print(f"box state lookup alone: {per_call_us(lambda: overlap._zeroed_box_state(keep)):.1f} us a call",
      flush=True)
profile = cProfile.Profile()
profile.enable()
for _ in range(2000):
    wrapper()
profile.disable()
torch.cuda.synchronize()
pstats.Stats(profile).sort_stats("tottime").print_stats(18)

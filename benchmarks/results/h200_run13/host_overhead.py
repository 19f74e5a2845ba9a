"""H200 run 13: host time of one `suppress_overlap` call ("drop", word kernel) on a small input, where
the device time is negligible: the wrapper, the tuned kernel's launch alone on prebuilt arguments,
and one torch allocation for scale; then cProfile of the wrapper (top functions by own time).
Run as overlap_strip_exp.py."""

import cProfile
import pstats
import time

import torch
import triton

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


words = keep.view(torch.uint8).view(torch.int32)
out = torch.empty_like(words)
state = torch.zeros(50 * 4 + 1, dtype=torch.int32, device=device)
boxes = torch.empty(1, 50, 4, device=device)
wrapper = lambda: resam_kernels.suppress_overlap(keep, None, counts, "drop")  # noqa: E731
wrapper()
config = overlap._suppress_drop_words_kernel_tuned.best_config
grid = overlap.word_kernel_grid(config.kwargs, 1, 64, 64, 16)
tuned = overlap._suppress_drop_words_kernel_tuned
launch = lambda: tuned[grid](words, counts, out, state, state[200:], boxes, 50, 16, 1024, 10, KP=64, ZERO_ONE=True)  # noqa: E731
print("tuned config", config, flush=True)
print(f"wrapper: {per_call_us(wrapper):.1f} us a call", flush=True)
print(f"tuned launch alone: {per_call_us(launch):.1f} us a call", flush=True)
print(f"torch.empty_like alone: {per_call_us(lambda: torch.empty_like(words)):.1f} us a call", flush=True)
profile = cProfile.Profile()
profile.enable()
for _ in range(2000):
    wrapper()
profile.disable()
torch.cuda.synchronize()
pstats.Stats(profile).sort_stats("tottime").print_stats(18)

"""Shared set-up of run 19's experiment scripts (`ablation.py`, `pipelined.py`): the device, the
timers, the copy bandwidth and the random masks of the benchmark (the entropy filter of random
logits, as bench_kernels.py makes them). With smoke (the scripts' --cpu-smoke): tiny masks in
Triton's interpreter and no timing."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl


@dataclass
class Setup:
    device: torch.device
    name: str  # the device's name
    shape: tuple[int, int, int, int]  # B x K x H x W
    timed: Callable  # fn -> (alone ms, back-to-back ms); (0, 0) in smoke runs
    copy_gbps: float  # 1 GiB copy, read + write (1.0 in smoke runs)


def setup(smoke: bool) -> Setup:
    device = torch.device("cpu" if smoke else "cuda")
    if smoke:
        shape = (2, 5, 56, 64)

        def timed(fn):
            fn()
            return 0.0, 0.0
    else:
        shape = (2, 50, 1024, 1024)
        from triton import testing

        def timed(fn):
            fn()
            return (float(testing.do_bench(fn, return_mode="median")),
                    float(testing.do_bench_cudagraph(fn, return_mode="median")))
    name = "cpu (interpreter)" if smoke else torch.cuda.get_device_name(0)
    source = torch.ones(1 << (16 if smoke else 28), dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    copy_ms = timed(lambda: target.copy_(source))[0]
    copy_gbps = 2 * source.numel() * 4 / (copy_ms * 1e-3) / 1e9 if copy_ms else 1.0
    print(f"{name}: copy {copy_gbps:.1f} GB/s, triton {triton.__version__}", flush=True)
    return Setup(device, name, shape, timed, copy_gbps)


def start(argv: list[str]) -> tuple[bool, str, Setup]:
    """The scripts' command line (OUT_DIR [--cpu-smoke]) -> (smoke, out_dir, set-up)."""
    smoke = "--cpu-smoke" in argv
    out_dir = [arg for arg in argv[1:] if not arg.startswith("--")][0]
    os.makedirs(out_dir, exist_ok=True)
    return smoke, out_dir, setup(smoke)


@dataclass
class Buffers:
    masks: torch.Tensor  # B x K x H x W bool, random_masks
    out: torch.Tensor  # like masks
    state: torch.Tensor  # B K 4 + B int32, zeroed: the box state and the arrivals
    boxes: torch.Tensor  # B x K x 4 float32
    kp: int  # next power of two >= K
    words_per_row: int
    num_words: int  # per plane


def buffers(run: Setup) -> Buffers:
    batch, num_instances, height, width = run.shape
    masks = random_masks(run)
    return Buffers(masks, torch.empty_like(masks),
                   torch.zeros(batch * num_instances * 4 + batch, dtype=torch.int32, device=run.device),
                   torch.empty(batch, num_instances, 4, dtype=torch.float32, device=run.device),
                   triton.next_power_of_2(num_instances), width // 4, height * width // 4)


def random_masks(run: Setup) -> torch.Tensor:
    """B x K x H x W bool: the entropy filter of random logits (seed 0)."""
    from resam_kernels.entropy import entropy_filter_reference
    generator = torch.Generator(device=run.device).manual_seed(0)
    logits = torch.randn(*run.shape, device=run.device, generator=generator) * 4
    return entropy_filter_reference(logits, 0.5)


@triton.jit
def packed_rows(acc):
    """The PACKED accumulators' 28 row bits, kept in bits 1-7, 9-15, 17-23, 25-31 of each word (the
    free bits of its four byte lanes) -> bits 0-27."""
    return (((acc >> 1) & 0x7F) | ((acc >> 2) & (0x7F << 7)) | ((acc >> 3) & (0x7F << 14))
            | ((acc >> 4) & (0x7F << 21)))

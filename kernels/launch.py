"""Launch helpers.

Tuned launches (entropy filter, overlap suppression, SSA loss): the first call of a size class
times every config with device synchronisations, which CUDA does not allow on a stream being
captured into a CUDA graph. `refuse_tuning_while_capturing` turns that into a clear error before
anything is launched, instead of CUDA's "operation not permitted when stream is capturing" (which
also invalidates the capture).

Fused backwards (`torch.autograd.Function`s) write their gradients with kernels that autograd does
not record, so a backward asked to build a graph (`create_graph=True`, for a second derivative or a
gradient penalty) would return gradients without one, and the second-order terms would silently go
missing. `refuse_differentiable_backward` makes that a clear error (the dispatchers' use_triton=False
runs the references, which autograd differentiates twice); the SSA loss instead takes that gradient
from autograd of its reference (it saves its inputs anyway).

Launch shape of the streaming kernels (instance counts, mask loss): one program per chunk of
BLOCK x ITERS pixels of one instance, ITERS steps of BLOCK pixels each.

Long chunks amortise a program's start and its partial write, but a small batch then launches too
few programs to keep the GPU busy: 8 x 50 masks of 256 x 256 in chunks of 32 K pixels are 800
programs of 4 warps, about 6 per SM of an H100 / H200 (132 SMs), where both kernels lost to
`torch.compile` (H200 runs 5 and 9) while winning at 1024 x 1024. `steps_per_program` halves
ITERS until the launch has at least `MIN_PROGRAMS` programs.
"""

from __future__ import annotations

import torch
import triton

MIN_PROGRAMS = 4096  # about 31 programs per SM of 132 SMs


def steps_per_program(instances: int, pixels: int, block: int, max_steps: int,
                      min_programs: int = MIN_PROGRAMS) -> int:
    """The largest ITERS among max_steps, max_steps / 2, ..., 1 for which instances x
    ceil(pixels / (block ITERS)) >= min_programs (1 if none does)."""
    if max_steps < 1 or block < 1:
        raise ValueError(f"steps_per_program needs max_steps >= 1 and block >= 1, got {max_steps}, {block}")
    steps = max_steps
    while steps > 1 and instances * triton.cdiv(pixels, block * steps) < min_programs:
        steps //= 2
    return steps


class UnsupportedByTriton(ValueError):
    """Inputs the torch reference takes but a Triton kernel does not (a dtype, a size beyond its
    tiles or int32 offsets). Raised by the `*_triton` functions before anything is launched or
    recorded for autograd; the dispatchers run the reference instead."""


def refuse_tuning_while_capturing(function: str, size_class: tuple) -> None:
    """Called before the first launch of an untuned size class: a RuntimeError naming the
    dispatcher and the size class if the current CUDA stream is capturing a graph."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"resam_kernels.{function}: size class {size_class} has not been tuned, and tuning "
                           "cannot run while a CUDA graph is being captured; call it once with the same sizes "
                           "before the capture")


def refuse_differentiable_backward(function: str) -> None:
    """Called first in a fused backward: a RuntimeError naming the dispatcher if the backward runs
    with create_graph=True (grad mode is on inside a backward only then)."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"resam_kernels.{function}: the fused Triton backward is first-order only "
                           "(create_graph=True would silently lose the second-order terms); pass "
                           "use_triton=False (the torch reference) for higher-order gradients")

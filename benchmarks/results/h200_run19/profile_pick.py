"""Launches the pick of "drop" overlap suppression at 2 x 50 x 1024 x 1024 (bool masks, counts 43 and
50) three times, for a profiler (run.sh profiles the third launch with Nsight Compute when the
machine has it)."""
import torch
import triton

from resam_kernels import overlap
from resam_kernels.entropy import entropy_filter_reference

generator = torch.Generator(device="cuda").manual_seed(0)
masks = entropy_filter_reference(torch.randn(2, 50, 1024, 1024, device="cuda", generator=generator) * 4, 0.5)
counts = torch.tensor([43, 50], device="cuda")
pick = triton.Config({"TILE": 2048, "STRIP_ROWS": 32, "PREFETCH": 2}, num_warps=4)
for _ in range(3):
    overlap.suppress_overlap_triton(masks, None, counts, "drop", config=pick)
torch.cuda.synchronize()
print("done")

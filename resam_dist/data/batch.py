"""The batch the data pipeline hands to the training step (one rank, one micro-step)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    weak: torch.Tensor          # B x 3 x S x S float32, SAM-normalised, zero-padded, weak view (flip)
    strong: torch.Tensor        # B x 3 x S x S float32, strong view: weak + photometric distortion
    gt_masks: torch.Tensor      # B x K x S x S bool, ground-truth masks (padding instances all False)
    points: torch.Tensor        # B x K x 2N x 2 float32 (x, y) input pixels; N positives then N negatives
    point_labels: torch.Tensor  # B x K x 2N int64: 1 positive, 0 negative, -1 padding instance
    boxes: torch.Tensor         # B x K x 4 float32 ground-truth boxes (x0, y0, x1, y1) in input pixels
    counts: torch.Tensor        # B int64, valid instances per image (instances k >= counts[b] are padding)
    image_sizes: torch.Tensor   # B x 2 int64 (h, w) of the resized image inside the S x S canvas
    keys: list[str]             # B sample keys ("<image_id>_<tile>")
    position: int = 0           # samples of this rank consumed after this batch (for exact resume)

    def to(self, device: torch.device | str) -> "Batch":
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        return Batch(**moved)

    @property
    def image_size(self) -> int:
        return self.weak.shape[-1]


def valid_from_counts(counts: torch.Tensor, num_slots: int) -> torch.Tensor:
    """B x K bool: True for the real instances k < counts[b] of a padded batch (on counts' device)."""
    slots = torch.arange(num_slots, device=counts.device)  # K
    return slots.unsqueeze(0) < counts.unsqueeze(1)  # B x K

"""Point prompts sampled from instance masks, and tight boxes of masks."""

from __future__ import annotations

import numpy as np
import torch


def sample_points(mask: np.ndarray, num_points: int, rng: np.random.Generator,
                  valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sample `num_points` positive points uniformly inside `mask` and as many negatives outside it.

    mask: H x W bool. valid: H x W bool region negatives may come from (default: whole image).
    Returns (positives num_points x 2, negatives num_points x 2), float32 (x, y) at pixel centres
    (col + 0.5, row + 0.5). Sampling is with replacement when a region has fewer pixels than asked.
    An empty mask raises ValueError (the caller drops such instances first).
    """
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("cannot sample points from an empty mask")
    outside = ~mask if valid is None else (valid & ~mask)
    out_rows, out_cols = np.nonzero(outside)
    if out_rows.size == 0:  # the instance covers the whole image: negatives fall back to its own pixels
        out_rows, out_cols = rows, cols
    pos = rng.choice(rows.size, size=num_points, replace=rows.size < num_points)
    neg = rng.choice(out_rows.size, size=num_points, replace=out_rows.size < num_points)
    positives = np.stack([cols[pos] + 0.5, rows[pos] + 0.5], axis=1).astype(np.float32)
    negatives = np.stack([out_cols[neg] + 0.5, out_rows[neg] + 0.5], axis=1).astype(np.float32)
    return positives, negatives


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of boolean masks.

    masks: ... x H x W bool. Returns ... x 4 float32 (x0, y0, x1, y1) with x1/y1 exclusive
    (x1 = last column + 1), so a one-pixel mask at (r, c) gives (c, r, c + 1, r + 1).
    Empty masks give (0, 0, 0, 0). The implementation is the overlap kernel's box specification.
    """
    from resam_kernels.overlap import tight_boxes_reference  # late: TRITON_INTERPRET is read at import

    return tight_boxes_reference(masks)

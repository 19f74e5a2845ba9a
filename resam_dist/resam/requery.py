"""Requery: the teacher prompted again with the boxes of the refined masks (SPEC 2).

Pseudo-mask = requery logit > 0. An instance whose refined mask is empty has no box to requery
with: it keeps its point-prompted mask (`keep_point_mask`) or is marked invalid (`drop`).
Instance order is always preserved: instances are never removed from the B x K layout, a B x K
`valid` mask says which ones train, so the student's mask k is always compared with pseudo-label
k of the same image (the public code compacts the list and pairs masks with the wrong labels).
"""

from __future__ import annotations

import torch

from resam_dist.data.batch import valid_from_counts

EMPTY_POLICIES = ("keep_point_mask", "drop")


def requery(model, features: torch.Tensor, boxes: torch.Tensor, counts: torch.Tensor, *,
            max_instances: int, min_chunks: int = 1) -> torch.Tensor:
    """Teacher masks from box prompts, without gradient.

    model: anything with `decode` (PromptableSam or an engine forwarding to it); features
    B x C x h x w (weak view); boxes B x K x 4 input pixels; counts B. Returns logits B x K x S x S.
    Empty boxes are decoded too (their result is replaced by `pseudo_labels`), which keeps the
    layout fixed and the number of decoder calls equal on every rank.
    """
    with torch.no_grad():
        logits, _ = model.decode(features, counts, boxes=boxes, max_instances=max_instances,
                                 min_chunks=min_chunks)  # B x K x S x S
    return logits


def apply_empty_policy(candidates: torch.Tensor, point_masks: torch.Tensor, refined_empty: torch.Tensor,
                       counts: torch.Tensor, *, empty_policy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labels from candidate masks (B x K x S x S bool) where each instance with an empty
    refined mask (B x K) keeps its point-prompted mask or becomes invalid.
    Returns (pseudo B x K x S x S bool, valid B x K bool); invalid and padding instances are all False."""
    if empty_policy not in EMPTY_POLICIES:
        raise ValueError(f"resam.empty_policy must be one of {EMPTY_POLICIES}, got {empty_policy!r}")
    if candidates.shape != point_masks.shape or refined_empty.shape != candidates.shape[:2]:
        raise ValueError(f"pseudo labels: candidates {tuple(candidates.shape)}, point masks "
                         f"{tuple(point_masks.shape)} and refined_empty {tuple(refined_empty.shape)} disagree")
    valid = valid_from_counts(counts.to(candidates.device), candidates.shape[1])  # B x K
    empty = refined_empty.to(candidates.device) & valid  # B x K
    if empty_policy == "keep_point_mask":
        pseudo = torch.where(empty[:, :, None, None], point_masks.bool(), candidates.bool())  # B x K x S x S
    else:
        valid = valid & ~empty
        pseudo = candidates.bool()
    return pseudo & valid[:, :, None, None], valid


def pseudo_labels(point_masks: torch.Tensor, requery_logits: torch.Tensor, refined_empty: torch.Tensor,
                  counts: torch.Tensor, *, empty_policy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """point_masks B x K x S x S bool (teacher, point prompts, logit > 0); requery_logits B x K x S x S;
    refined_empty B x K; counts B -> (pseudo B x K x S x S bool, valid B x K bool), order preserved."""
    return apply_empty_policy(requery_logits > 0, point_masks, refined_empty, counts, empty_policy=empty_policy)

"""Plain PyTorch reference of the per-row top-k mask with a deterministic tie rule."""
from __future__ import annotations

import torch

from ..registry import register_kernel


@register_kernel("topk_mask", "reference")
def topk_mask_reference(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries of each row of ``score`` [R, n]; ties go to the lower column.

    Equivalently: rank each row by (score descending, column ascending) and keep the first k.
    O(n) per row (a selection, not a sort): the k-th largest value is the threshold; every
    entry above it is kept, and of the entries equal to it, the lowest-indexed ones fill up to k.
    """
    R, n = score.shape
    if k <= 0:
        return torch.zeros(R, n, dtype=torch.bool, device=score.device)
    if k >= n:
        return torch.ones(R, n, dtype=torch.bool, device=score.device)
    thr = torch.kthvalue(score, n - k + 1, dim=1, keepdim=True).values
    keep = score > thr
    need = k - keep.sum(1, keepdim=True, dtype=torch.int32)
    tie = score == thr
    return keep | (tie & (torch.cumsum(tie, 1, dtype=torch.int32) <= need))

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


def topk_mask_lex_reference(score: torch.Tensor, k: int, tie_break: torch.Tensor) -> torch.Tensor:
    """Keep the k largest of each row by (score desc, tie_break desc, column asc): where the k-th
    score is tied (e.g. many scores at 0), ``tie_break`` decides instead of the column."""
    R, n = score.shape
    if k <= 0 or k >= n:
        return topk_mask_reference(score, k)
    thr = torch.kthvalue(score, n - k + 1, dim=1, keepdim=True).values
    keep = score > thr
    need = k - keep.sum(1, keepdim=True)
    tie = score == thr
    ambiguous = (tie.sum(1, keepdim=True) > need).squeeze(1)
    out = keep | (tie & (torch.cumsum(tie, 1) <= need))  # rows whose ties all fit: as topk_mask_reference
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero().squeeze(1)
        t, sec = tie[rows], torch.where(tie[rows], tie_break[rows].to(torch.float64), float("-inf"))
        order = torch.sort(sec, dim=1, descending=True, stable=True).indices  # stable: column asc among equals
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=score.device).expand(len(rows), n))
        out[rows] = keep[rows] | (t & (rank < need[rows]))
    return out

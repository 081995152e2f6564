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


@register_kernel("topk_mask", "reference", "lex")
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


# ---- the mask methods' per-row selections, scores included (fused in the C++ kernels) ---------
# Scores as masks/methods.py defines them: float32 |W| * v with v cast to float32 first.

def _magnitude(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().to(torch.float32)


@register_kernel("topk_mask", "reference", "wanda")
def topk_mask_wanda_reference(weight: torch.Tensor, act: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k of |W| * act per row."""
    return topk_mask_reference(_magnitude(weight) * act, k)


@register_kernel("topk_mask", "reference", "contrastive_wanda")
def topk_mask_contrastive_wanda_reference(weight, g_pos, g_neg, a_pos, a_neg, k: int):
    """(+, -): top-k of |W| * g, ties ordered by |W| * a (then the column)."""
    m = _magnitude(weight)
    return topk_mask_lex_reference(m * g_pos, k, m * a_pos), topk_mask_lex_reference(m * g_neg, k, m * a_neg)


@register_kernel("topk_mask", "reference", "contrastive_sparse")
def topk_mask_contrastive_sparse_reference(weight, a_pos, a_neg, k: int):
    """(+, -): the k largest and the k smallest of D = S+ / sum(S+) - S- / sum(S-) per row (float64,
    row sums left to right as cumsum gives them), + ties to the lower column, - to the higher."""
    m = _magnitude(weight)
    sp, sn = (m * a_pos).double(), (m * a_neg).double()
    d = sp / sp.cumsum(1)[:, -1:].clamp_min(1e-300) - sn / sn.cumsum(1)[:, -1:].clamp_min(1e-300)
    return topk_mask_reference(d, k), topk_mask_reference((-d).flip(1), k).flip(1)


@register_kernel("topk_mask", "reference", "contrastive_sparse_code")
def topk_mask_contrastive_sparse_code_reference(weight, contrast, k: int):
    """(+, -): + the top-k of |W| * contrast, - the top-k after the + entries are set to -inf."""
    score = _magnitude(weight) * contrast
    pos = topk_mask_reference(score, k)
    return pos, topk_mask_reference(score.masked_fill(pos, float("-inf")), k)

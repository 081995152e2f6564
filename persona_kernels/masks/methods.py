"""Mask methods on one weight matrix: scores and selection. Persona masks are Wanda scores
(Sun et al., arXiv 2306.11695) on persona calibration data; the contrastive forms follow the
persona-subnetwork paper (arXiv 2602.07164).

Weights are in linear orientation [out, in]. Scores are float32: |W| * A with A cast to
float32 first, so every backend ranks exactly the same numbers. Selection keeps the top-k of
each row (default), of the whole layer, or N of every M consecutive inputs, with ties broken
towards the lower index (row-major index for per-layer selection).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..ops import registry
from ..ops.topk_mask import topk_mask

GRANULARITIES = ("row", "layer", "nm")


def check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def keep_count(n: int, sparsity: float) -> int:
    """Entries kept out of n at the given sparsity: int(n * (1 - sparsity))."""
    return int(n * (1.0 - check_sparsity(sparsity)))


def _act32(weight: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """A per-input statistic checked against the weight, as float32 on its device."""
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if act.shape != (weight.shape[1],):
        raise ValueError(f"activation statistic has shape {tuple(act.shape)}, expected ({weight.shape[1]},) "
                         f"for a weight of shape {tuple(weight.shape)}")
    a = act.to(device=weight.device, dtype=torch.float32)
    if not torch.isfinite(a).all():
        raise ValueError("activation statistic contains NaN/Inf (a persona with no calibration tokens?)")
    return a


def wanda_score(weight: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| * A_j, float32."""
    return weight.detach().abs().to(torch.float32) * _act32(weight, act)


def row_kernel(fmt: str, weight: torch.Tensor, backend: str = "auto"):
    """The per-row selection of a mask method with its scores computed in the same pass
    (topk_mask formats 'wanda', 'contrastive_wanda', ...: reference and C++)."""
    return registry.kernel("topk_mask", registry.resolve("topk_mask", backend, weight.device, fmt), fmt)


def select(score: torch.Tensor, sparsity: float = 0.5, granularity: str = "row", n: int = 2, m: int = 4,
           backend: str = "auto", tie_break: Optional[torch.Tensor] = None, min_keep: int = 0) -> torch.Tensor:
    """Boolean keep-mask from a score matrix [out, in]. ``tie_break``: a second score that orders
    tied entries (then the column). ``min_keep``: keep at least this many per row / layer."""
    out_f, in_f = score.shape
    tb = (lambda shape: None if tie_break is None else tie_break.reshape(shape))  # noqa: E731
    if granularity == "row":
        return topk_mask(score, max(min_keep, keep_count(in_f, sparsity)), backend, tb(score.shape))
    if granularity == "layer":
        k = max(min_keep, keep_count(out_f * in_f, sparsity))
        return topk_mask(score.reshape(1, -1), k, backend, tb((1, -1))).view(out_f, in_f)
    if granularity == "nm":
        if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
            raise ValueError(f"N:M selection needs 0 < N <= M, got {n}:{m}")
        if in_f % m:
            raise ValueError(f"N:M selection needs in_features ({in_f}) divisible by M ({m})")
        return topk_mask(score.reshape(-1, m), n, backend, tb((-1, m))).view(out_f, in_f)
    raise ValueError(f"unknown granularity {granularity!r}; choose one of {GRANULARITIES}")


def wanda_mask(weight, act, sparsity=0.5, granularity="row", n=2, m=4, backend="auto") -> torch.Tensor:
    """Persona mask: keep the highest |W| * A (arXiv 2602.07164, Wanda's score)."""
    if granularity == "row":
        return row_kernel("wanda", weight, backend)(weight.detach(), _act32(weight, act), keep_count(weight.shape[1], sparsity))
    return select(wanda_score(weight, act), sparsity, granularity, n, m, backend)


def magnitude_mask(weight, sparsity=0.5, granularity="row", n=2, m=4, backend="auto") -> torch.Tensor:
    """Control: keep the highest |W| (no calibration data): what pruning alone does."""
    return select(weight.detach().float().abs(), sparsity, granularity, n, m, backend)


def random_mask(weight, sparsity=0.5, granularity="row", n=2, m=4, backend="auto", seed: int = 0) -> torch.Tensor:
    """Control: a seeded random mask with the same count per row (layer, N:M group) as a persona mask."""
    g = torch.Generator().manual_seed(seed)
    return select(torch.rand(weight.shape, generator=g), sparsity, granularity, n, m, backend).to(weight.device)


def contrastive_z(mean_pos, var_pos, mean_neg, var_neg) -> torch.Tensor:
    """z_j = (m+ - m-) / sqrt(v+ + v- + 1e-6), from per-sample-norm means and population variances."""
    z = (mean_pos.double() - mean_neg.double()) / (var_pos.double() + var_neg.double() + 1e-6).sqrt()
    if not torch.isfinite(z).all():
        raise ValueError("contrastive z-score is not finite (a persona with no calibration samples?)")
    return z


TIE_BREAKS = ("wanda", "column")


def contrastive_wanda_masks(weight, mean_pos, var_pos, mean_neg, var_neg, sparsity=0.5, granularity="row",
                            contrast="relu", tau=2.0, n=2, m=4, backend="auto", tie_break="wanda",
                            act_pos=None, act_neg=None):
    """Contrastive-Wanda (arXiv 2602.07164): S+ = |W| * g(z), S- = |W| * g(-z), g = relu or softplus(./tau).

    Where g is zero (relu) the scores tie at 0; on a real model most rows have their k-th score
    there, so the tie rule picks most of each mask. ``tie_break='wanda'`` (default) orders those
    ties by the persona's own Wanda score |W| * A (``act_pos`` / ``act_neg``; default: the means),
    then the column: the mask keeps the weights that matter to the persona. ``'column'`` is the
    parity mode: ties to the lower column, and k = max(1, int(in * (1 - s))) as in the released code.
    """
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"unknown tie_break {tie_break!r}; choose one of {TIE_BREAKS}")
    z = contrastive_z(mean_pos, var_pos, mean_neg, var_neg)
    if contrast == "relu":
        g_pos, g_neg = F.relu(z), F.relu(-z)
    elif contrast == "softplus":
        if not tau > 0:
            raise ValueError(f"tau must be positive, got {tau}")
        g_pos, g_neg = F.softplus(z / tau), F.softplus(-z / tau)
    else:
        raise ValueError(f"unknown contrast {contrast!r}; use 'relu' or 'softplus'")
    if tie_break == "column":
        return (select(wanda_score(weight, g_pos), sparsity, granularity, n, m, backend, min_keep=1),
                select(wanda_score(weight, g_neg), sparsity, granularity, n, m, backend, min_keep=1))
    if granularity == "row":
        a_pos, a_neg = mean_pos if act_pos is None else act_pos, mean_neg if act_neg is None else act_neg
        return row_kernel("contrastive_wanda", weight, backend)(
            weight.detach(), _act32(weight, g_pos), _act32(weight, g_neg), _act32(weight, a_pos), _act32(weight, a_neg),
            keep_count(weight.shape[1], sparsity))
    tb_pos = wanda_score(weight, mean_pos if act_pos is None else act_pos)
    tb_neg = wanda_score(weight, mean_neg if act_neg is None else act_neg)
    return (select(wanda_score(weight, g_pos), sparsity, granularity, n, m, backend, tie_break=tb_pos),
            select(wanda_score(weight, g_neg), sparsity, granularity, n, m, backend, tie_break=tb_neg))


def contrastive_sparse_masks(weight, act_pos, act_neg, sparsity=0.5, backend="auto"):
    """Contrastive-Sparse (arXiv 2602.07164): disjoint masks from row-normalised Wanda scores.

    D = S~+ - S~- with S~ = S / sum_row(S). Per row, the + mask keeps the k inputs with the
    largest D (where + scores higher first, by margin |D|) and the - mask the k with the
    smallest D. Ties: + takes lower columns first, - takes higher columns first, so the two
    never meet: the masks are disjoint whenever 2k <= in, i.e. sparsity >= 0.5.
    """
    k = keep_count(weight.shape[1], sparsity)
    if 2 * k > weight.shape[1]:
        raise ValueError(f"Contrastive-Sparse masks are disjoint, so each keeps at most half of a row: sparsity must "
                         f"be >= 0.5 (got {sparsity}, keeping {k} of {weight.shape[1]})")
    return row_kernel("contrastive_sparse", weight, backend)(weight.detach(), _act32(weight, act_pos), _act32(weight, act_neg), k)


def contrastive_sparse_code_masks(weight, mean_pos, var_pos, mean_neg, var_neg, sparsity=0.5, backend="auto"):
    """Contrastive-Sparse as the Persona code releases it (contra.py), a different algorithm from
    contrastive_sparse_masks: one shared score S = |W| * |mu+ - mu-| / sqrt(var+ + var- + 1e-6) from
    token-level pooled means and population variances; the + mask is each row's top-k of S, the -
    mask the top-k after the + entries are set to -inf, so it holds the lowest-contrast weights and
    the two overlap when sparsity < 0.5. Any sparsity in [0, 1). (The released code computes var as
    E[x^2] - mu^2 clamped at 0; this takes the Welford variance, which agrees up to rounding.)"""
    check_sparsity(sparsity)
    d = (mean_pos.double() - mean_neg.double()).abs() / (var_pos.double() + var_neg.double() + 1e-6).sqrt()
    if not torch.isfinite(d).all():
        raise ValueError("contrast is not finite (a persona with no calibration tokens?)")
    # where k > in / 2 the - mask runs out of finite scores and takes -inf (+ mask) entries: lowest columns first
    return row_kernel("contrastive_sparse_code", weight, backend)(weight.detach(), d.to(device=weight.device, dtype=torch.float32),
                                                                   keep_count(weight.shape[1], sparsity))


def soft_gate(mask: torch.Tensor, gamma: float, dtype=torch.float32) -> torch.Tensor:
    """G = M + gamma * (1 - M); gamma = 0 is the hard mask, gamma = 1 the dense weight."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    m = mask.to(dtype)
    return m + gamma * (1 - m)


def block_mask(score: torch.Tensor, block: tuple, sparsity: float) -> torch.Tensor:
    """Block-structured bool mask keeping the blocks with the largest summed score in each
    block-row (for the 'block' weight format). Ties go to the lower block column (topk_mask's rule)."""
    br, bc = block
    out_f, in_f = score.shape
    if out_f % br or in_f % bc:
        raise ValueError(f"weight shape {tuple(score.shape)} is not a multiple of the block {block}")
    s = score.float().view(out_f // br, br, in_f // bc, bc).sum((1, 3))
    keep = topk_mask(s, keep_count(in_f // bc, sparsity))
    return keep.repeat_interleave(br, 0).repeat_interleave(bc, 1)

"""topk_mask: per-row top-k selection with a deterministic tie rule (lower column wins).

The selection behind every persona mask. Backends: the PyTorch reference (anywhere) and a
C++/OpenMP kernel (CPU; nth_element per row under the same total order). Both give the
same mask bit for bit, because the order (score desc, column asc) is total.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import registry
from .reference import topk_mask_lex_reference, topk_mask_reference


def topk_mask(score: torch.Tensor, k: int, backend: str = "auto", tie_break: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean mask keeping the ``k`` highest scores of each row of ``score`` [R, n].

    Ties go to the lower column, or with ``tie_break`` (same shape) to the higher tie_break value
    first, then the lower column (the 'lex' kernels: reference and C++). ``backend``: 'auto',
    'reference' or 'cpp'. Under torch.compile the call goes through the torch.library op
    ``persona_kernels::topk_mask`` (ops/library.py). The mask methods' per-row selections, with
    their scores computed in the same pass, are this op's other formats (masks/methods.py).
    """
    if not isinstance(score, torch.Tensor) or score.ndim != 2:
        raise ValueError(f"score must be a 2-D tensor [rows, n], got {getattr(score, 'shape', type(score).__name__)}")
    if not score.dtype.is_floating_point:
        raise TypeError(f"score must be floating point, got {score.dtype}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 0 or k > score.shape[1]:
        raise ValueError(f"k must be an int in [0, {score.shape[1]}], got {k!r}")
    if torch.isnan(score).any():
        raise ValueError("score contains NaN; scores must be comparable")
    if tie_break is not None:
        if not isinstance(tie_break, torch.Tensor) or tie_break.shape != score.shape or torch.isnan(tie_break).any():
            raise ValueError(f"tie_break must be a NaN-free tensor of the score's shape {tuple(score.shape)}")
        return registry.kernel("topk_mask", registry.resolve("topk_mask", backend, score.device, "lex"), "lex")(
            score, k, tie_break.to(score.device))
    name = registry.resolve("topk_mask", backend, score.device)
    if torch.compiler.is_compiling():
        return torch.ops.persona_kernels.topk_mask(score, k, name)
    return registry.kernel("topk_mask", name)(score, k)


__all__ = ["topk_mask", "topk_mask_lex_reference", "topk_mask_reference"]

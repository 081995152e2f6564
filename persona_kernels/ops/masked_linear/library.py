"""masked_linear as one torch.library custom op, so torch.compile traces it without graph breaks.

``torch.ops.persona_kernels.masked_linear(x, kind, tensors, ints, bias, persona_rows, backend)``
takes only tensors, ints and strings (format objects cannot cross the op boundary): the
format is rebuilt from ``fmt.op_args()`` inside and the kernel named by ``backend`` runs (the
dispatcher chose it at trace time). The fake implementation only needs ints[0] = out_features.
Eager calls skip the op and call the same kernels directly: the op's Python dispatch costs
about 15 us a call, which a decode step over hundreds of layers would feel.
"""
# No `from __future__ import annotations` here: torch.library infers the op schema from the
# annotations, which older PyTorch releases read as objects, not strings.
from typing import List, Optional

import torch

from ...formats import BitmapWeight, BlockSparseWeight, CompactedWeight, SharedBitmask

FORMAT_CLASSES = {cls.kind: cls for cls in (BitmapWeight, BlockSparseWeight, CompactedWeight, SharedBitmask)}


@torch.library.custom_op("persona_kernels::masked_linear", mutates_args=())
def masked_linear_op(x: torch.Tensor, kind: str, tensors: List[torch.Tensor], ints: List[int],
                     bias: Optional[torch.Tensor], persona_rows: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    """y [N, out] = x [N, in] (W ⊙ M)ᵀ + bias for the format ``kind`` rebuilt from (tensors, ints)."""
    from . import check_persona_range, run_kernel

    fmt = FORMAT_CLASSES[kind].from_op_args(tensors, ints)
    if persona_rows is not None:
        check_persona_range(persona_rows, fmt.num_personas)
    return run_kernel(backend, x, fmt, bias, persona_rows)


@masked_linear_op.register_fake
def _(x, kind, tensors, ints, bias, persona_rows, backend):
    return x.new_empty(x.shape[0], ints[0])

"""Every op as a torch.library custom op, declared in one place, so torch.compile traces them.

    torch.ops.persona_kernels.accumulate_stats(x, valid, segment_ids, edges, num_personas, backend)
    torch.ops.persona_kernels.induce_neurons(a, deactivate, add, act, backend)
    torch.ops.persona_kernels.topk_mask(score, k, backend)
    torch.ops.persona_kernels.masked_linear(x, kind, tensors, ints, bias, persona_rows, backend)
    torch.ops.persona_kernels.dense_linear(x, weight, bias, backend)

Ops take tensors, ints and strings only: a weight format crosses as ``fmt.op_args()`` and is
rebuilt inside, and ``backend`` names the kernel that the public function chose (at trace
time). Each op has a fake implementation giving its output's shape and dtype. The public
functions validate their inputs and, in eager mode, call the same kernels without the op's
Python dispatch (about 15 us a call, which a decode step over hundreds of layers would feel).
"""
# No `from __future__ import annotations` here: torch.library infers the op schema from the
# annotations, which older PyTorch releases read as objects, not strings.
from typing import List, Optional

import torch

from ..formats import FORMAT_CLASSES
from . import registry
from .accumulate_stats import DELTA_FIELDS, accumulate_delta
from .masked_linear import check_persona_range, run_kernel
from .masked_linear.dispatch import graph_route

_PER_PERSONA = ("count", "samples")  # [P]; the other delta fields are [P, C]
_INT_FIELDS = ("count", "pos", "samples")


@torch.library.custom_op("persona_kernels::accumulate_stats", mutates_args=())
def accumulate_stats_op(x: torch.Tensor, valid: torch.Tensor, segment_ids: torch.Tensor, edges: Optional[torch.Tensor],
                        num_personas: int, backend: str) -> List[torch.Tensor]:
    """One call's statistics of x [B, T, C]: the StatsState fields in DELTA_FIELDS order, then the
    histogram [P, C, bins] when ``edges`` is given."""
    delta = accumulate_delta(x, valid, segment_ids, edges, num_personas, backend)
    out = [getattr(delta, f) for f in DELTA_FIELDS]
    return out + ([delta.hist] if edges is not None else [])


@accumulate_stats_op.register_fake
def _(x, valid, segment_ids, edges, num_personas, backend):
    P, C = num_personas, x.shape[-1]
    out = [x.new_empty((P,) if f in _PER_PERSONA else (P, C), dtype=torch.int64 if f in _INT_FIELDS else torch.float64)
           for f in DELTA_FIELDS]
    return out + ([x.new_empty((P, C, edges.shape[0] - 1), dtype=torch.int64)] if edges is not None else [])


@torch.library.custom_op("persona_kernels::induce_neurons", mutates_args=())
def induce_neurons_op(a: torch.Tensor, deactivate: torch.Tensor, add: torch.Tensor, act: int, backend: str) -> torch.Tensor:
    """NPTI's edit (act: 0 none, 1 SiLU, 2 tanh-GELU applied first), a new contiguous tensor like ``a``."""
    return registry.kernel("induce_neurons", backend)(a, deactivate.contiguous(), add.contiguous(), act).contiguous()


@induce_neurons_op.register_fake
def _(a, deactivate, add, act, backend):
    return a.new_empty(a.shape)


@torch.library.custom_op("persona_kernels::topk_mask", mutates_args=())
def topk_mask_op(score: torch.Tensor, k: int, backend: str) -> torch.Tensor:
    """bool [R, n]: the k highest scores of each row, ties to the lower column."""
    return registry.kernel("topk_mask", backend)(score, k)


@topk_mask_op.register_fake
def _(score, k, backend):
    return score.new_empty(score.shape, dtype=torch.bool)


@torch.library.custom_op("persona_kernels::masked_linear", mutates_args=())
def masked_linear_op(x: torch.Tensor, kind: str, tensors: List[torch.Tensor], ints: List[int],
                     bias: Optional[torch.Tensor], persona_rows: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    """y [N, out] = x [N, in] (W ⊙ M)ᵀ + bias for the format ``kind`` rebuilt from (tensors, ints)."""
    fmt = FORMAT_CLASSES[kind].from_op_args(tensors, ints)
    if persona_rows is not None:
        check_persona_range(persona_rows, fmt.num_personas)
    return run_kernel(graph_route(backend, kind, x.device), x, fmt, bias, persona_rows)


@masked_linear_op.register_fake
def _(x, kind, tensors, ints, bias, persona_rows, backend):
    return x.new_empty(x.shape[0], ints[0])


@torch.library.custom_op("persona_kernels::dense_linear", mutates_args=())
def dense_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    """y [N, out] = x [N, in] Wᵀ + bias."""
    return registry.kernel("dense_linear", backend)(x, weight, bias)


@dense_linear_op.register_fake
def _(x, weight, bias, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


OP_NAMES = ("accumulate_stats", "induce_neurons", "topk_mask", "masked_linear", "dense_linear")

"""masked_linear: y = x (W ⊙ M)ᵀ + b over a sparse weight format.

Backends: 'reference' (the oracle: F.linear on the densified masked weight), 'torch' (fast
paths made of PyTorch ops, e.g. the compacted GEMM), 'triton', 'cpp', 'cuda'.

One public op for every format in persona_kernels.formats. Kernels per (format, backend) are
registered in ops/registry.py by the backend modules beside this file; ``backend='auto'``
asks the dispatcher (dispatch.py), which routes by device, dtype, batch size and density using
a measured crossover table, and falls back to a dense GEMM on the masked weight where no
sparse kernel wins.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from ...formats import WeightFormat
from .. import registry
from ..linear_args import check_linear_args
from .reference import masked_linear_reference

MULTI_PERSONA = ("shared_bitmask", "block")


def _persona_rows(fmt: WeightFormat, persona, x: torch.Tensor) -> Union[None, int, torch.Tensor]:
    """The validated persona: None for single-persona formats, an int when one persona serves
    every row (expanded per row by _expand only where a kernel needs it), else the persona
    index per row of the flattened x."""
    if fmt.kind not in MULTI_PERSONA:
        if persona not in (None, 0):
            raise ValueError(f"a {fmt.kind} weight holds one persona; persona must be None, got {persona!r}")
        return None
    P = fmt.num_personas
    rows = x.numel() // x.shape[-1]
    if persona is None:
        if P != 1:
            raise ValueError(f"this {fmt.kind} weight holds {P} personas: pass persona=<index> or a per-row/per-sequence tensor")
        persona = 0
    if isinstance(persona, torch.Tensor) and persona.ndim == 0 and not persona.dtype.is_floating_point:
        persona = int(persona)
    if isinstance(persona, int) and not isinstance(persona, bool):
        if not 0 <= persona < P:
            raise ValueError(f"persona index {persona} out of range for {P} personas")
        return persona
    if not isinstance(persona, torch.Tensor) or persona.dtype.is_floating_point or persona.dtype == torch.bool:
        raise TypeError(f"persona must be an int or an integer tensor, got {type(persona).__name__}")
    p = persona.to(device=x.device, dtype=torch.int64)
    lead = x.shape[:-1]
    if p.numel() == rows:
        p = p.reshape(rows)
    elif x.ndim >= 3 and tuple(p.shape) == tuple(lead[:1]):  # one persona per sequence of [B, T, in]
        p = p.repeat_interleave(rows // lead[0])
    else:
        raise ValueError(f"persona tensor of shape {tuple(persona.shape)} matches neither the rows ({rows}) nor the "
                         f"sequences ({lead[0] if lead else 0}) of x")
    if not torch.compiler.is_compiling():  # traced calls check inside the op (ops/library.py)
        check_persona_range(p, P)
    return p


def _expand(persona: Union[None, int, torch.Tensor], x2: torch.Tensor) -> Optional[torch.Tensor]:
    """A validated persona as the kernels take it: None, or an int64 index per row of x2."""
    if isinstance(persona, int):
        return torch.full((x2.shape[0],), persona, dtype=torch.int64, device=x2.device)
    return persona


def _check(x: torch.Tensor, fmt: WeightFormat, bias: Optional[torch.Tensor]) -> None:
    if not isinstance(fmt, WeightFormat):
        raise TypeError(f"weight must be a persona_kernels.formats.WeightFormat, got {type(fmt).__name__}")
    check_linear_args(x, fmt.shape, fmt.dtype, fmt.device, bias)


def available_backends(fmt: WeightFormat, device: torch.device) -> list[str]:
    """Backends with a kernel for ``fmt`` that can run on ``device`` (the reference first)."""
    return registry.kernel_backends("masked_linear", fmt.kind, device)


def check_persona_range(persona_rows: torch.Tensor, num_personas: int) -> None:
    """Persona indices given as a tensor must be in range. Checked for host tensors only: on a
    GPU it would force a sync on every decode step."""
    if persona_rows.device.type == "cpu" and persona_rows.numel():
        lo, hi = torch.aminmax(persona_rows)
        if int(lo) < 0 or int(hi) >= num_personas:
            raise ValueError(f"persona indices must be in [0, {num_personas}), got [{int(lo)}, {int(hi)}]")


def run_kernel(name: str, x2: torch.Tensor, fmt: WeightFormat, bias: Optional[torch.Tensor],
               persona_rows: Optional[torch.Tensor]) -> torch.Tensor:
    """Run backend ``name`` ('reference', 'dense', 'torch', 'triton', 'cpp', 'cuda') on x2 [N, in].

    'dense' is the dispatcher's large-batch route: a GEMM on the format's cached masked weight.
    """
    return _kernel(name, fmt.kind)(x2, fmt, bias, persona_rows)


def _dense_route(x2: torch.Tensor, fmt: WeightFormat, bias: Optional[torch.Tensor],
                 persona_rows: Optional[torch.Tensor]) -> torch.Tensor:
    return masked_linear_reference(x2, fmt, bias, persona_rows, cached=True)


def _kernel(name: str, kind: str) -> Callable:
    """The callable of route ``name`` for format ``kind``: fn(x2, fmt, bias, persona_rows) -> y."""
    return _dense_route if name == "dense" else registry.kernel("masked_linear", name, kind)


def masked_linear(x: torch.Tensor, weight: WeightFormat, bias: Optional[torch.Tensor] = None,
                  persona: Union[None, int, torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """y = x (W ⊙ M_persona)ᵀ + bias for x [..., in]; output [..., out] in x's dtype.

    ``persona``: for multi-persona formats (shared_bitmask, block) an index, or an integer
    tensor with one persona per row of x or per sequence of a [B, T, in] x (mixed batches).
    ``backend``: 'auto' (the dispatcher), 'reference' (the float oracle), 'torch', 'triton',
    'cpp' or 'cuda'. Under torch.compile the call goes through the torch.library op
    ``persona_kernels::masked_linear`` (ops/library.py); eager calls run the kernel directly.
    """
    _check(x, weight, bias)
    x2 = x if x.ndim == 2 else x.reshape(-1, x.shape[-1])
    p = _persona_rows(weight, persona, x)
    name = _route_name(x2, weight, persona, p, backend)
    if torch.compiler.is_compiling() and weight.kind != "semi24":
        tensors, ints = weight.op_args()
        y = torch.ops.persona_kernels.masked_linear(x2, weight.kind, tensors, ints, bias, _expand(p, x2), name)
    else:
        y = _bind(name, weight, p)(x2, bias)
    return y if x.ndim == 2 else y.view(*x.shape[:-1], weight.shape[0])


def _route_name(x2, weight, persona, p, backend: str) -> str:
    if backend == "auto":
        return choose(weight, x2, mixed=p is not None and isinstance(persona, torch.Tensor))
    return registry.resolve("masked_linear", backend, x2.device, weight.kind, dtype=x2.dtype)


def _bind(name: str, weight: WeightFormat, p) -> Callable:
    """The kernel of route ``name`` bound to the weight and persona: fn(x2, bias) -> y."""
    if isinstance(p, int) and name == "dense":
        # one persona for every row: its cached masked weight directly (per-row indices would be
        # built, then searched with unique(), a device sync on every call of a GPU decode step)
        return lambda x2, bias: F.linear(x2, weight.dense_for(p), bias)
    kernel = _kernel(name, weight.kind)
    if isinstance(p, int):
        return lambda x2, bias: kernel(x2, weight, bias, _expand(p, x2))
    return lambda x2, bias: kernel(x2, weight, bias, p)


def bound_kernel(x2: torch.Tensor, weight: WeightFormat, bias: Optional[torch.Tensor], persona: Optional[int] = None,
                 backend: str = "auto") -> Callable:
    """masked_linear's kernel for this call, validated and routed once: fn(x2, bias) -> y for x2
    [N, in]. It holds for later calls with the same number of rows, dtype, device and bias
    presence while ``dispatch.EPOCH`` is unchanged (the decode hot path of the persona layers
    keeps it per persona; no per-call validation, routing or registry lookups)."""
    _check(x2, weight, bias)
    p = _persona_rows(weight, persona, x2)
    return _bind(_route_name(x2, weight, persona, p, backend), weight, p)


from .dispatch import choose  # noqa: E402 (dispatch imports check helpers from this module)

__all__ = ["available_backends", "bound_kernel", "check_persona_range", "masked_linear", "masked_linear_reference",
           "run_kernel"]

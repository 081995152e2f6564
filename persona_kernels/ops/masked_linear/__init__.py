"""masked_linear: y = x (W ⊙ M)ᵀ + b over a sparse weight format.

Backends: 'reference' (the oracle: F.linear on the densified masked weight), 'torch' (fast
paths made of PyTorch ops, e.g. the compacted GEMM), 'triton', 'cpp', 'cuda'.

One public op for every format in persona_kernels.formats. Kernels per (format, backend) are
listed in KERNELS; ``backend='auto'`` asks the dispatcher (dispatch.py), which routes by
device, dtype, batch size and density using a measured crossover table, and falls back to a
dense GEMM on the masked weight where no sparse kernel wins.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from ... import backends
from ...formats import WeightFormat
from .reference import masked_linear_reference

MULTI_PERSONA = ("shared_bitmask", "block")

# Tests set this so kernels' outputs start as garbage: an element a kernel forgets to write
# shows up as a wrong value instead of a zero that happens to be right.
POISON_OUTPUTS = False


def new_output(rows: int, cols: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Output buffer for a kernel (every element must be written by the kernel)."""
    if POISON_OUTPUTS:
        return torch.full((rows, cols), 777.0, dtype=dtype, device=device)
    return torch.empty(rows, cols, dtype=dtype, device=device)

# (format kind, backend) -> kernel(x2d, fmt, bias, persona_rows) ; filled by the backend modules
KERNELS: dict[tuple[str, str], Callable] = {}


def register_kernel(kind: str, backend: str):
    def deco(fn):
        KERNELS[(kind, backend)] = fn
        return fn
    return deco


LOAD_ERRORS: dict = {}  # kernel module -> why it could not be imported


def _load_backend_modules() -> None:
    """Import the kernel modules once; one that fails (no triton, a broken build) is skipped
    and its error kept in LOAD_ERRORS, so the other backends still work."""
    if getattr(_load_backend_modules, "done", False):
        return
    import importlib

    for mod in ("torch_kernels", "cpu", "triton_kernel", "cuda"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except Exception as exc:  # noqa: BLE001 - any failure disables that backend only
            LOAD_ERRORS[mod] = f"{type(exc).__name__}: {exc}"
    _load_backend_modules.done = True


def _persona_rows(fmt: WeightFormat, persona, x: torch.Tensor) -> Optional[torch.Tensor]:
    """Persona index per row of the flattened x, or None for single-persona formats."""
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
        return torch.full((rows,), persona, dtype=torch.int64, device=x.device)
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
    if not torch.compiler.is_compiling():  # traced calls check inside the op (library.py)
        check_persona_range(p, P)
    return p


def _check(x: torch.Tensor, fmt: WeightFormat, bias: Optional[torch.Tensor]) -> None:
    if not isinstance(fmt, WeightFormat):
        raise TypeError(f"weight must be a persona_kernels.formats.WeightFormat, got {type(fmt).__name__}")
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[-1] != fmt.shape[1]:
        raise ValueError(f"x must have {fmt.shape[1]} features in its last dim (weight {tuple(fmt.shape)}), "
                         f"got {tuple(getattr(x, 'shape', ()))}")
    if x.dtype != fmt.dtype:
        raise TypeError(f"x is {x.dtype} but the weight is {fmt.dtype}")
    if x.device != fmt.device:
        raise ValueError(f"x is on {x.device} but the weight is on {fmt.device}")
    if bias is not None and (bias.shape != (fmt.shape[0],) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"bias must be [{fmt.shape[0]}] {x.dtype} on {x.device}, got {bias.dtype} {tuple(bias.shape)} on {bias.device}")


def available_backends(fmt: WeightFormat, device: torch.device) -> list[str]:
    _load_backend_modules()
    out = ["reference"]
    for (kind, name), _ in KERNELS.items():
        if kind == fmt.kind and (name == "torch" or backends.available(name, device)) and name not in out:
            out.append(name)
    return out


def check_persona_range(persona_rows: torch.Tensor, num_personas: int) -> None:
    """Persona indices given as a tensor must be in range. Checked for host tensors only: on a
    GPU it would force a sync on every decode step."""
    if persona_rows.device.type == "cpu" and persona_rows.numel():
        lo, hi = torch.aminmax(persona_rows)
        if int(lo) < 0 or int(hi) >= num_personas:
            raise ValueError(f"persona indices must be in [0, {num_personas}), got [{int(lo)}, {int(hi)}]")


def run_kernel(name: str, x2: torch.Tensor, fmt: WeightFormat, bias: Optional[torch.Tensor],
               persona_rows: Optional[torch.Tensor]) -> torch.Tensor:
    """Run backend ``name`` ('reference', 'dense', 'torch', 'triton', 'cpp', 'cuda') on x2 [N, in]."""
    if name in ("reference", "dense"):
        return masked_linear_reference(x2, fmt, bias, persona_rows, cached=name == "dense")
    _load_backend_modules()
    kernel = KERNELS.get((fmt.kind, name))
    if kernel is None:
        why = "; ".join(f"{k}: {v}" for k, v in LOAD_ERRORS.items())
        raise backends.BackendUnavailable(f"no {name!r} kernel for the {fmt.kind} format; available here: "
                                          f"{available_backends(fmt, x2.device)}" + (f" (load errors: {why})" if why else ""))
    return kernel(x2, fmt, bias, persona_rows)


def masked_linear(x: torch.Tensor, weight: WeightFormat, bias: Optional[torch.Tensor] = None,
                  persona: Union[None, int, torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """y = x (W ⊙ M_persona)ᵀ + bias for x [..., in]; output [..., out] in x's dtype.

    ``persona``: for multi-persona formats (shared_bitmask, block) an index, or an integer
    tensor with one persona per row of x or per sequence of a [B, T, in] x (mixed batches).
    ``backend``: 'auto' (the dispatcher), 'reference' (the float oracle), 'torch', 'triton',
    'cpp' or 'cuda'. Under torch.compile the call goes through the torch.library op
    ``persona_kernels::masked_linear`` (library.py); eager calls run the kernel directly.
    """
    _check(x, weight, bias)
    x2 = x if x.ndim == 2 else x.reshape(-1, x.shape[-1])
    prow = _persona_rows(weight, persona, x)
    if backend == "auto":
        name = choose(weight, x2, mixed=prow is not None and isinstance(persona, torch.Tensor))
    elif backend == "torch":  # kernels made of plain PyTorch ops (not the oracle), e.g. compacted GEMM
        name = backend
    else:
        name = backends.resolve(backend, x.device, ())
    if torch.compiler.is_compiling() and weight.kind != "semi24":
        from .library import masked_linear_op

        tensors, ints = weight.op_args()
        y = masked_linear_op(x2, weight.kind, tensors, ints, bias, prow, name)
    else:
        y = run_kernel(name, x2, weight, bias, prow)
    return y if x.ndim == 2 else y.view(*x.shape[:-1], weight.shape[0])


from .dispatch import choose  # noqa: E402 (dispatch reads KERNELS from this module)

__all__ = ["masked_linear", "masked_linear_reference", "register_kernel", "available_backends", "new_output", "run_kernel", "KERNELS"]

"""dense_linear: y = x Wᵀ + b for an nn.Linear weight W [out, in], fast at decode batch sizes.

A sparse-kernel package needs a dense op for the layers a persona leaves whole, above all the
output head: on SmolLM2 it is 113 MB of fp32 read every token, and the vendor GEMV that F.linear
reaches on the AMD Zen 4 CPUs measured here streams it at 16 GB/s, a third of what a read-only
pass reaches, so the unmasked head alone took a third of a persona model's decode step.

Backends: 'reference' (F.linear) and 'cpp' (csrc/cpu/dense_linear.cpp, AVX-512 builds). 'auto'
takes the C++ kernel on the CPU up to the crossover batch in crossover.json (entry
'dense:<dtype>', measured by ``benchmarks/bench_dense_linear.py --write-crossover``; 4 rows
without one; weights of at least ``large_min_bytes`` have their own ``large_max_batch``) and
F.linear everywhere else (larger batches, GPUs: cuBLAS is at the bandwidth).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import registry
from ..linear_args import check_linear_args
from ..masked_linear.dispatch import EPOCH, crossover_entry
from .reference import dense_linear_reference

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_MAX_BATCH = 4  # rows up to which 'auto' takes the C++ kernel where no crossover is measured
_LIMITS: dict = {}  # (device, dtype, routing epoch) -> limits()


def _check(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(f"weight must be a 2-D tensor [out, in], got {getattr(weight, 'shape', type(weight).__name__)}")
    check_linear_args(x, tuple(weight.shape), weight.dtype, weight.device, bias)


# torch.compile keeps the result as a constant (it reads files and the registry)
@torch.compiler.assume_constant_result
def limits(device: torch.device, dtype: torch.dtype) -> tuple:
    """(max_batch, large_max_batch, large_min_bytes): 'auto' runs the C++ kernel on ``device``
    for ``dtype`` up to max_batch rows (0: never), and for weights of at least large_min_bytes
    up to large_max_batch: on big weights the kernel stays ahead of F.linear to larger batches
    (SmolLM2's head: 1.9x at 16 rows) than on small ones. Follows set_crossover / reload_table
    of masked_linear's dispatcher (same table, kind 'dense')."""
    key = (device, dtype, EPOCH[0])
    found = _LIMITS.get(key)
    if found is None:
        usable = (device.type == "cpu" and dtype in SUPPORTED_DTYPES
                  and registry.get_kernel("dense_linear", "cpp") is not None)
        entry = (crossover_entry("dense", device, dtype) or {"max_batch": DEFAULT_MAX_BATCH}) if usable else {"max_batch": 0}
        rows = entry["max_batch"]
        found = _LIMITS[key] = (rows, entry.get("large_max_batch", rows), float(entry.get("large_min_bytes", float("inf"))))
    return found


def max_batch(device: torch.device, dtype: torch.dtype, weight_bytes: int = 0) -> int:
    """Rows up to which 'auto' runs the C++ kernel for a weight of ``weight_bytes`` (0: never)."""
    rows, large_rows, large_bytes = limits(device, dtype)
    return large_rows if weight_bytes >= large_bytes else rows


def route(x2: torch.Tensor, weight: torch.Tensor, backend: str = "auto") -> str:
    """The backend a call on x2 [N, in] with ``weight`` runs: 'cpp' or 'reference'."""
    if backend == "auto":
        rows = max_batch(x2.device, x2.dtype, weight.numel() * weight.element_size())
        return "cpp" if 0 < x2.shape[0] <= rows else "reference"
    return registry.resolve("dense_linear", backend, x2.device, dtype=x2.dtype)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 backend: str = "auto") -> torch.Tensor:
    """y = x Wᵀ + bias for x [..., in] and W [out, in]; output [..., out] in x's dtype.

    ``backend``: 'auto', 'reference' (F.linear) or 'cpp'. Under torch.compile the call goes
    through the torch.library op ``persona_kernels::dense_linear`` (ops/library.py).
    """
    _check(x, weight, bias)
    x2 = x if x.ndim == 2 else x.reshape(-1, x.shape[-1])
    name = route(x2, weight, backend)
    if torch.compiler.is_compiling():
        y = torch.ops.persona_kernels.dense_linear(x2, weight, bias, name)
    else:
        y = registry.kernel("dense_linear", name)(x2, weight, bias)
    return y if x.ndim == 2 else y.view(*x.shape[:-1], weight.shape[0])


__all__ = ["DEFAULT_MAX_BATCH", "SUPPORTED_DTYPES", "dense_linear", "dense_linear_reference", "limits", "max_batch", "route"]

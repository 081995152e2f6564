"""The kernel registry: every (op, backend[, format]) -> launcher, for every op.

Each op lives in ``ops/<op>/`` with one module per backend, named after it (``reference.py``,
``triton.py``, ``cpp.py``, ``cuda.py``; the 'torch' backend's is ``torch_ops.py``, because a
submodule named ``torch`` would replace the torch package in its package's namespace); a module registers its launchers with
``@register_kernel(op, backend, fmt)`` when it is imported, and registers nothing when its
backend cannot run here (no native build, no Triton). ``load(op)`` imports an op's backend
modules once and keeps why one failed to import, so the env report can say it.

Dispatch is the same for every op: ``resolve(op, backend, device, fmt)`` turns 'auto' into the
first backend of the device's preference list that has a kernel here, falling back to the
reference visibly (``FALLBACKS``, printed by ``persona-kernels env``: ops/report.py); an explicit backend
that cannot run raises BackendUnavailable.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Callable, Optional

import torch

from .. import _native, backends
from .._native import BackendUnavailable

OPS = ("accumulate_stats", "induce_neurons", "topk_mask", "masked_linear", "dense_linear")
BACKEND_MODULES = ("reference", "torch", "triton", "cpp", "cuda")
_MODULE_NAME = {"torch": "torch_ops"}

# (op, backend, format or None) -> launcher
_KERNELS: dict[tuple[str, str, Optional[str]], Callable] = {}
LOAD_ERRORS: dict[str, str] = {}  # "op.backend" -> why its module could not be imported
FALLBACKS: dict[tuple[str, Optional[str], str], str] = {}  # (op, fmt, device type) -> why 'auto' took the reference
_LOADED: set = set()

# Tests set this so kernels' outputs start as garbage: an element a kernel forgets to write
# shows up as a wrong value instead of a zero that happens to be right.
POISON_OUTPUTS = False


def register_kernel(op: str, backend: str, fmt: Optional[str] = None):
    """Decorator: ``fn`` is the ``backend`` launcher of ``op`` (for weight format ``fmt``)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops are {OPS}")
    if backend not in BACKEND_MODULES:
        raise ValueError(f"unknown backend {backend!r}; backends are {BACKEND_MODULES}")

    def deco(fn):
        _KERNELS[(op, backend, fmt)] = fn
        return fn
    return deco


def new_output(shape, dtype: torch.dtype, device, fill: float = 777.0) -> torch.Tensor:
    """An output buffer that the kernel must write in full (poisoned with ``fill`` under tests)."""
    if POISON_OUTPUTS:
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def has_native(name: str, extension: str = "cpu") -> bool:
    """True when the native extension ('cpu' or 'cuda') is built and exports ``name``."""
    mod = _native.load(extension)
    return mod is not None and hasattr(mod, name)


def load(op: str) -> None:
    """Import the backend modules of ``op`` once; one that fails is recorded in LOAD_ERRORS."""
    if op in _LOADED:
        return
    _LOADED.add(op)
    package = f"{__package__}.{op}"
    for backend in BACKEND_MODULES:
        module = f"{package}.{_MODULE_NAME.get(backend, backend)}"
        if importlib.util.find_spec(module) is None:
            continue
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure disables that backend only
            LOAD_ERRORS[f"{op}.{backend}"] = f"{type(exc).__name__}: {exc}"


def get_kernel(op: str, backend: str, fmt: Optional[str] = None) -> Optional[Callable]:
    load(op)
    return _KERNELS.get((op, backend, fmt))


def kernel(op: str, backend: str, fmt: Optional[str] = None) -> Callable:
    """The launcher, or BackendUnavailable saying what exists and why the rest does not."""
    fn = get_kernel(op, backend, fmt)
    if fn is None:
        what = f"{op}" + (f" ({fmt} format)" if fmt else "")
        have = sorted(b for (o, b, f) in _KERNELS if o == op and f == fmt)
        why = "; ".join(f"{k}: {v}" for k, v in LOAD_ERRORS.items() if k.startswith(op + "."))
        raise BackendUnavailable(f"no {backend!r} kernel for {what}; kernels here: {have}" + (f" (load errors: {why})" if why else ""))
    return fn


def kernel_backends(op: str, fmt: Optional[str] = None, device: Optional[torch.device] = None) -> list[str]:
    """Backends with a kernel for (op, fmt) that can run on ``device`` (any device if None)."""
    load(op)
    out = [b for b in BACKEND_MODULES if (op, b, fmt) in _KERNELS]
    if device is not None:
        out = [b for b in out if b in ("reference", "torch") or backends.available(b, device)]
    return out


def preference(device: torch.device) -> tuple[str, ...]:
    # the Triton interpreter is a testing tool, never an automatic choice
    return ("cuda", "triton") if device.type == "cuda" else ("cpp",)


# torch.compile runs this at trace time and keeps the result as a constant (it imports backend
# modules and reads the environment, which Dynamo cannot trace)
@torch.compiler.assume_constant_result
def resolve(op: str, backend: str, device: torch.device, fmt: Optional[str] = None,
            order: Optional[tuple[str, ...]] = None, dtype: Optional[torch.dtype] = None) -> str:
    """The backend that runs ``op`` here. 'auto' (or PERSONA_KERNELS_BACKEND) takes the first of
    ``order`` (default: the device's preference) with a kernel; the reference otherwise, recorded
    in FALLBACKS. An explicit name must have a kernel that runs on ``device`` for ``dtype``."""
    if backend == "auto":
        backend = os.environ.get("PERSONA_KERNELS_BACKEND", "auto")
    if backend == "auto":
        for name in order if order is not None else preference(device):
            if get_kernel(op, name, fmt) is not None and backends.available(name, device):
                return name
        key = (op, fmt, device.type)
        if key not in FALLBACKS:
            tried = order if order is not None else preference(device)
            FALLBACKS[key] = "; ".join(f"{b}: {'no kernel' if get_kernel(op, b, fmt) is None else backends.describe(b, device)}"
                                       for b in tried) or "no fast kernel"
        return "reference"
    if backend not in BACKEND_MODULES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKEND_MODULES} or 'auto'")
    if backend not in ("reference", "torch") and not backends.available(backend, device):
        raise BackendUnavailable(f"backend {backend!r} cannot run on {device}: {backends.describe(backend, device)}")
    if backend == "triton" and device.type == "cpu" and dtype == torch.bfloat16:
        # the interpreter computes bf16 as garbage (numpy has no bfloat16): refuse, never a wrong number
        raise BackendUnavailable("the Triton interpreter (TRITON_INTERPRET=1) has no bfloat16 arithmetic; bf16 Triton "
                                 "kernels run on a GPU. On the CPU use backend='cpp' or 'reference', or float32/float16")
    kernel(op, backend, fmt)  # raises with the reason when there is no such kernel
    return backend


__all__ = ["BackendUnavailable", "FALLBACKS", "LOAD_ERRORS", "OPS", "POISON_OUTPUTS", "get_kernel", "has_native", "kernel",
           "kernel_backends", "load", "new_output", "preference", "register_kernel", "resolve"]

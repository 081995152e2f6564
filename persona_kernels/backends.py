"""Which backends exist on this machine, and the names users pass as ``backend=``."""
from __future__ import annotations

import os

import torch

from . import _native
from ._native import BackendUnavailable  # noqa: F401  (re-exported for ops)

BACKENDS = ("reference", "triton", "cpp", "cuda")


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def triton_runs_on(device: torch.device) -> bool:
    """Triton runs compiled on CUDA devices, and on CPU tensors under TRITON_INTERPRET=1."""
    if not triton_importable():
        return False
    if device.type == "cuda":
        return not triton_interpreter()
    return device.type == "cpu" and triton_interpreter()


def available(backend: str, device: torch.device) -> bool:
    if backend == "reference":
        return True
    if backend == "triton":
        return triton_runs_on(device)
    if backend == "cpp":
        return device.type == "cpu" and _native.load("cpu") is not None
    if backend == "cuda":
        return device.type == "cuda" and _native.load("cuda") is not None
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} or 'auto'")


def resolve(backend: str, device: torch.device, preference: tuple[str, ...]) -> str:
    """Pick a backend: an explicit name must be runnable; 'auto' takes the first available.

    The environment variable PERSONA_KERNELS_BACKEND replaces 'auto' for every op.
    """
    if backend == "auto":
        backend = os.environ.get("PERSONA_KERNELS_BACKEND", "auto")
    if backend == "auto":
        for name in preference:
            if available(name, device):
                return name
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} or 'auto'")
    if not available(backend, device):
        raise _native.BackendUnavailable(f"backend {backend!r} cannot run on {device}: {describe(backend, device)}")
    return backend


def describe(backend: str, device: torch.device | None = None) -> str:
    if backend == "reference":
        return "available (plain PyTorch)"
    if backend == "triton":
        if not triton_importable():
            return "triton is not installed"
        if triton_interpreter():
            return "interpreter (TRITON_INTERPRET=1): CPU tensors, slow, for testing"
        return "compiled, CUDA devices" if torch.cuda.is_available() else "installed, but no CUDA device (set TRITON_INTERPRET=1 to interpret on CPU)"
    if backend == "cpp":
        return _native.why_missing("cpu")
    if backend == "cuda":
        status = _native.why_missing("cuda")
        if status == "available" and not torch.cuda.is_available():
            return "built, but no CUDA device is visible"
        return status
    raise ValueError(backend)


def report() -> str:
    import platform

    lines = [f"python        {platform.python_version()} ({platform.machine()})", f"torch         {torch.__version__} (cuda {torch.version.cuda})"]
    for mod in ("triton", "transformers", "numpy", "safetensors"):
        try:
            lines.append(f"{mod:<13} {__import__(mod).__version__}")
        except Exception as exc:  # noqa: BLE001
            lines.append(f"{mod:<13} missing ({type(exc).__name__})")
    if torch.cuda.is_available():
        lines.append(f"device        {torch.cuda.get_device_name()} (cc {'.'.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        lines.append("device        no CUDA device")
    lines.append("backends:")
    lines.append(f"  reference          {describe('reference')}")
    lines.append(f"  triton (compiled)  {'available' if triton_importable() and torch.cuda.is_available() else 'unavailable: ' + ('no CUDA device' if triton_importable() else 'triton missing')}")
    lines.append(f"  triton (interp.)   {'available' if triton_importable() else 'unavailable: triton missing'}{' [active: TRITON_INTERPRET=1]' if triton_interpreter() else ''}")
    lines.append(f"  cpp (CPU, OpenMP)  {describe('cpp')}")
    lines.append(f"  cuda               {describe('cuda')}")
    return "\n".join(lines)

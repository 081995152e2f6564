"""Which backends can run on this machine, and why one cannot (kernels are listed in ops/registry.py)."""
from __future__ import annotations

import os

import torch

from . import _native
from ._native import BackendUnavailable  # noqa: F401  (re-exported for ops)

BACKENDS = ("reference", "triton", "cpp", "cuda")  # the backends with their own runtime; 'torch' always runs


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


def describe(backend: str, device: torch.device | None = None) -> str:
    if backend == "reference":
        return "available (plain PyTorch)"
    if backend == "triton":
        if not triton_importable():
            return "triton is not installed"
        if triton_interpreter():
            return "interpreter (TRITON_INTERPRET=1): CPU tensors, slow, for testing"
        if torch.cuda.is_available():
            return "compiled, CUDA devices"
        return "installed, but no CUDA device (set TRITON_INTERPRET=1 to interpret on CPU)"
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

    lines = [f"python        {platform.python_version()} ({platform.machine()})",
             f"torch         {torch.__version__} (cuda {torch.version.cuda})"]
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
    compiled = "available" if triton_importable() and torch.cuda.is_available() else \
        "unavailable: " + ("no CUDA device" if triton_importable() else "triton missing")
    interp = "available" if triton_importable() else "unavailable: triton missing"
    lines.append(f"  triton (compiled)  {compiled}")
    lines.append(f"  triton (interp.)   {interp}{' [active: TRITON_INTERPRET=1]' if triton_interpreter() else ''}")
    lines.append(f"  cpp (CPU, OpenMP)  {describe('cpp')}")
    lines.append(f"  cuda               {describe('cuda')}")
    return "\n".join(lines)

"""induce_neurons: NPTI's activation edit, out = (deactivate ? min(a, 0) : a) + add.

``a`` is a gated MLP's activation act_fn(gate(x)) [..., I]; ``deactivate`` [I] bool marks the
opposite aspect's neurons, ``add`` [I] float32 the push of the target aspect's neurons for this
step (p95 * val * sigmoid(10 * (diff - 0.15)) for the neurons drawn to be kept, 0 elsewhere;
see persona_kernels.npti.induction_vectors). Backends: reference, Triton, C++/OpenMP.
"""
from __future__ import annotations

import torch

from ... import backends
from .reference import induce_neurons_reference

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(a, deactivate, add):
    if not isinstance(a, torch.Tensor) or a.ndim < 1:
        raise TypeError("a must be a tensor [..., neurons]")
    if a.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"induce_neurons supports float32, float16 and bfloat16, got {a.dtype}")
    I = a.shape[-1]
    if deactivate.shape != (I,) or deactivate.dtype != torch.bool:
        raise ValueError(f"deactivate must be a bool tensor of shape ({I},), got {deactivate.dtype} {tuple(deactivate.shape)}")
    if add.shape != (I,) or add.dtype != torch.float32:
        raise ValueError(f"add must be a float32 tensor of shape ({I},), got {add.dtype} {tuple(add.shape)}")
    for name, t in (("deactivate", deactivate), ("add", add)):
        if t.device != a.device:
            raise ValueError(f"{name} is on {t.device} but the activation is on {a.device}")


def induce_neurons(a: torch.Tensor, deactivate: torch.Tensor, add: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    _check(a, deactivate, add)
    name = backends.resolve(backend, a.device, ("triton",) if a.device.type == "cuda" else ("cpp",))
    if a.numel() == 0 or name == "reference":
        return induce_neurons_reference(a, deactivate, add)
    if name == "triton":
        from .triton_kernel import induce_neurons_triton

        return induce_neurons_triton(a, deactivate.contiguous(), add.contiguous())
    if name == "cpp":
        from .cpu import has_kernel, induce_neurons_cpu

        if has_kernel():
            return induce_neurons_cpu(a, deactivate.contiguous(), add.contiguous())
        if backend != "auto":
            raise backends.BackendUnavailable("the C++ extension was built without induce_neurons; rebuild the package")
        return induce_neurons_reference(a, deactivate, add)
    raise ValueError(f"induce_neurons has no {name!r} kernel; use 'reference', 'triton' or 'cpp'")


__all__ = ["induce_neurons", "induce_neurons_reference"]

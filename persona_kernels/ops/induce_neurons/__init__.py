"""induce_neurons: NPTI's activation edit, out = (deactivate ? min(a, 0) : a) + add.

``a`` is a gated MLP's activation act_fn(gate(x)) [..., I], or with ``act='silu'`` /
``'gelu_tanh'`` the gate output gate(x) itself: the op then applies the activation in the same
pass (fused into the MLP activation: one read and one write of the tensor instead of two each).
``deactivate`` [I] bool marks the
opposite aspect's neurons, ``add`` [I] float32 the push of the target aspect's neurons for this
step (p95 * val * sigmoid(10 * (diff - 0.15)) for the neurons drawn to be kept, 0 elsewhere;
see persona_kernels.npti.induction_vectors). Backends: reference, Triton, C++/OpenMP.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import registry
from .reference import ACT_CODES, ACTIVATIONS, induce_neurons_reference

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(a, deactivate, add, act):
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"act must be None or one of {sorted(ACTIVATIONS)}, got {act!r}")
    if not isinstance(a, torch.Tensor) or a.ndim < 1:
        raise TypeError("a must be a tensor [..., neurons]")
    if a.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"induce_neurons supports float32, float16 and bfloat16, got {a.dtype}")
    I = a.shape[-1]
    for name, t in (("deactivate", deactivate), ("add", add)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor of shape ({I},), got {type(t).__name__}")
    if deactivate.shape != (I,) or deactivate.dtype != torch.bool:
        raise ValueError(f"deactivate must be a bool tensor of shape ({I},), got {deactivate.dtype} {tuple(deactivate.shape)}")
    if add.shape != (I,) or add.dtype != torch.float32:
        raise ValueError(f"add must be a float32 tensor of shape ({I},), got {add.dtype} {tuple(add.shape)}")
    for name, t in (("deactivate", deactivate), ("add", add)):
        if t.device != a.device:
            raise ValueError(f"{name} is on {t.device} but the activation is on {a.device}")


def induce_neurons(a: torch.Tensor, deactivate: torch.Tensor, add: torch.Tensor, backend: str = "auto",
                   act: Optional[str] = None, validate: bool = True) -> torch.Tensor:
    """out = (deactivate ? min(f(a), 0) : f(a)) + add over the last dim of ``a``, in a's dtype.

    ``backend``: 'auto', 'reference', 'triton' or 'cpp'. Under torch.compile the call goes
    through the torch.library op ``persona_kernels::induce_neurons`` (ops/library.py).
    ``validate``: also refuse a non-finite ``add`` (a NaN would spread to every output row; on a
    GPU the check waits for the device). The persona layer checks its push vectors once when
    applied and passes False on its per-step calls.
    """
    _check(a, deactivate, add, act)
    if validate and not torch.compiler.is_compiling() and not bool(torch.isfinite(add).all()):
        raise ValueError("add holds NaN or Inf values; they would spread to every output row")
    name = registry.resolve("induce_neurons", backend, a.device, dtype=a.dtype)
    if a.numel() == 0:
        name = "reference"
    if torch.compiler.is_compiling():
        return torch.ops.persona_kernels.induce_neurons(a, deactivate, add, ACT_CODES[act], name)
    return registry.kernel("induce_neurons", name)(a, deactivate.contiguous(), add.contiguous(), ACT_CODES[act])


__all__ = ["ACTIVATIONS", "ACT_CODES", "induce_neurons", "induce_neurons_reference"]

"""Plain PyTorch reference of the NPTI induction op."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..registry import register_kernel

# Activations the op can fuse (the MLP's act_fn, applied to the gate projection's output)
ACTIVATIONS = {
    "silu": F.silu,                                          # Llama, Mistral, Qwen2/3, Phi-3, OLMo2
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),   # Gemma, Gemma2
}
ACT_CODES = {None: 0, "silu": 1, "gelu_tanh": 2}  # as the launchers and kernels number them
ACT_NAMES = {code: name for name, code in ACT_CODES.items()}


def induce_neurons_reference(a: torch.Tensor, deactivate: torch.Tensor, add: torch.Tensor,
                             act: Optional[str] = None) -> torch.Tensor:
    """out = (deactivate ? min(f(a), 0) : f(a)) + add per neuron (last dim), in float32.

    ``act``: None (a is the activation) or a key of ACTIVATIONS (a is the pre-activation).
    """
    af = a.float()
    if act is not None:
        af = ACTIVATIONS[act](af)
    out = torch.where(deactivate, af.clamp(max=0.0), af) + add.float()
    return out.to(a.dtype)


@register_kernel("induce_neurons", "reference")
def induce_neurons_reference_launcher(a: torch.Tensor, deactivate: torch.Tensor, add: torch.Tensor, act: int = 0) -> torch.Tensor:
    return induce_neurons_reference(a, deactivate, add, ACT_NAMES[act]).contiguous()

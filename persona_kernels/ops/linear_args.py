"""What every linear op (masked_linear, dense_linear) shares: the checks of x and the bias, and
the bias as their C++ kernels take it."""
from __future__ import annotations

from typing import Optional

import torch


def check_linear_args(x: torch.Tensor, shape: tuple, dtype: torch.dtype, device: torch.device,
                      bias: Optional[torch.Tensor]) -> None:
    """x [..., in] and bias [out] must match a weight of ``shape`` [out, in], ``dtype`` and ``device``."""
    out_f, in_f = shape
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[-1] != in_f:
        raise ValueError(f"x must have {in_f} features in its last dim (weight {tuple(shape)}), "
                         f"got {tuple(getattr(x, 'shape', ()))}")
    if x.dtype != dtype:
        raise TypeError(f"x is {x.dtype} but the weight is {dtype}")
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the weight is on {device}")
    if bias is not None and (bias.shape != (out_f,) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"bias must be [{out_f}] {x.dtype} on {x.device}, got {bias.dtype} {tuple(bias.shape)} "
                         f"on {bias.device}")


_NO_BIAS = torch.empty(0)  # one shared "no bias" tensor: no allocation on the decode path


def native_bias(bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The bias as the C++ linear kernels take it: float32 contiguous, or an empty tensor for none."""
    return bias.float().contiguous() if bias is not None else _NO_BIAS

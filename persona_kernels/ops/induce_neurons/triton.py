"""Triton kernel of the NPTI induction op: an elementwise pass over the MLP activation,
optionally applying the activation itself first (ACT 1: SiLU, 2: tanh-GELU; built from
tl.sigmoid only, so it needs no libdevice and runs in the interpreter)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..registry import new_output, register_kernel


@triton.jit
def _induce_neurons_kernel(a_ptr, out_ptr, deact_ptr, add_ptr, rows, I, stride_a, stride_o,
                           ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    cm = c < I
    m = (r < rows)[:, None] & cm[None, :]
    a = tl.load(a_ptr + r[:, None].to(tl.int64) * stride_a + c[None, :], mask=m, other=0.0).to(tl.float32)
    if ACT == 1:  # silu
        a = a * tl.sigmoid(a)
    elif ACT == 2:  # gelu_tanh: 0.5 a (1 + tanh(u)) = a * sigmoid(2u)
        u = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        a = a * tl.sigmoid(2.0 * u)
    deact = tl.load(deact_ptr + c, mask=cm, other=0) != 0
    add = tl.load(add_ptr + c, mask=cm, other=0.0)
    out = tl.where(deact[None, :], tl.minimum(a, 0.0), a) + add[None, :]
    tl.store(out_ptr + r[:, None].to(tl.int64) * stride_o + c[None, :], out.to(out_ptr.dtype.element_ty), mask=m)


@register_kernel("induce_neurons", "triton")
def induce_neurons_triton(a: torch.Tensor, deactivate: torch.Tensor, add: torch.Tensor, act: int = 0,
                          block_r: int = 16, block_i: int = 128) -> torch.Tensor:
    I = a.shape[-1]
    a2 = a.reshape(-1, I)
    if a2.stride(-1) != 1:
        a2 = a2.contiguous()
    out = new_output(a2.shape, a2.dtype, a2.device)
    grid = (triton.cdiv(a2.shape[0], block_r), triton.cdiv(I, block_i))
    _induce_neurons_kernel[grid](a2, out, deactivate.view(torch.uint8), add, a2.shape[0], I, a2.stride(0), out.stride(0),
                                 ACT=act, BLOCK_R=block_r, BLOCK_I=block_i)
    return out.view(a.shape)

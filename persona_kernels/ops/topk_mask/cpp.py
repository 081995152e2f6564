"""Launchers of the C++/OpenMP topk_mask kernels (csrc/cpu/topk_mask.cpp): nth_element per row under
the reference's total order, so both give the same mask bit for bit; the mask methods' formats
(wanda, contrastive_*) compute their scores in the same pass."""
from __future__ import annotations

import torch

from ... import _native
from ..registry import has_native, register_kernel
from . import reference
from .reference import topk_mask_lex_reference, topk_mask_reference


def topk_mask_cpp(score: torch.Tensor, k: int) -> torch.Tensor:
    if 0 < k < score.shape[1] and score.dtype in (torch.float32, torch.float64):
        return _native.require("cpu").topk_mask(score.contiguous(), int(k))
    return topk_mask_reference(score, k)  # all/nothing kept, or a dtype the kernel does not take


def topk_mask_lex_cpp(score: torch.Tensor, k: int, tie_break: torch.Tensor) -> torch.Tensor:
    if 0 < k < score.shape[1] and score.dtype in (torch.float32, torch.float64):
        return _native.require("cpu").topk_mask_lex(score.contiguous(), tie_break.to(score.dtype).contiguous(), int(k))
    return topk_mask_lex_reference(score, k, tie_break)


def _fits(weight: torch.Tensor, k: int) -> bool:
    return 0 < k < weight.shape[1] and weight.dtype in (torch.float32, torch.float16, torch.bfloat16)


def topk_mask_wanda_cpp(weight, act, k: int):
    if _fits(weight, k):
        return _native.require("cpu").wanda_topk(weight, act.contiguous(), int(k))
    return reference.topk_mask_wanda_reference(weight, act, k)


def topk_mask_contrastive_wanda_cpp(weight, g_pos, g_neg, a_pos, a_neg, k: int):
    if _fits(weight, k):
        return tuple(_native.require("cpu").contrastive_wanda_topk(weight, g_pos, g_neg, a_pos, a_neg, int(k)))
    return reference.topk_mask_contrastive_wanda_reference(weight, g_pos, g_neg, a_pos, a_neg, k)


def topk_mask_contrastive_sparse_cpp(weight, a_pos, a_neg, k: int):
    if _fits(weight, k):
        return tuple(_native.require("cpu").contrastive_sparse_topk(weight, a_pos, a_neg, int(k)))
    return reference.topk_mask_contrastive_sparse_reference(weight, a_pos, a_neg, k)


def topk_mask_contrastive_sparse_code_cpp(weight, contrast, k: int):
    if _fits(weight, k):
        return tuple(_native.require("cpu").contrastive_sparse_code_topk(weight, contrast, int(k)))
    return reference.topk_mask_contrastive_sparse_code_reference(weight, contrast, k)


for _fmt, _launcher in (("wanda", topk_mask_wanda_cpp), ("contrastive_wanda", topk_mask_contrastive_wanda_cpp),
                        ("contrastive_sparse", topk_mask_contrastive_sparse_cpp),
                        ("contrastive_sparse_code", topk_mask_contrastive_sparse_code_cpp)):
    if has_native(f"{_fmt}_topk"):
        register_kernel("topk_mask", "cpp", _fmt)(_launcher)
if has_native("topk_mask"):
    register_kernel("topk_mask", "cpp")(topk_mask_cpp)
if has_native("topk_mask_lex"):
    register_kernel("topk_mask", "cpp", "lex")(topk_mask_lex_cpp)

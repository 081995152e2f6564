"""Mixture-of-experts layers: routed experts held as fused 3-D parameters (transformers >= 5).

A layer's experts live in one module with ``gate_up_proj`` and ``down_proj`` as 3-D Parameters
and an ``act_fn``, in one of two layouts:

- 'routed' (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3, ...): ``forward(hidden [N, H],
  top_k_index [N, k], top_k_weights [N, k])``; ``gate_up_proj`` [E, 2I, H] and ``down_proj``
  [E, H, I] stored [out, in].
- 'stacked' (Llama 4): ``forward(routed_in [E*N, H])``, expert e's rows already scaled by its
  router score (exactly 0 for the tokens not routed to it); ``gate_up_proj`` [E, H, 2I] and
  ``down_proj`` [E, I, H] stored [in, out].

Each expert's projections are *expert slots*, named ``<module>.gate_up_proj.<e>`` and
``<module>.down_proj.<e>``, with a weight in linear orientation [out, in] like any linear layer:
statistics, masks and formats treat them as linear layers of their own. The expert's activation
site (NPTI) is ``<module>.act_fn.<e>``. ``experts_forward`` is the experts' computation written
once, with hooks for the projection and the activation: calibration observes through it, the
persona layer masks and induces through it. Statistics of an expert count the tokens routed to
it only (a sample none of whose tokens reached the expert is not one of its samples).
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
ACT = "act_fn"
_SLOT = re.compile(r"^(?P<module>.+)\.(?P<param>gate_up_proj|down_proj|act_fn)\.(?P<expert>\d+)$")


def experts_layout(module: nn.Module) -> Optional[str]:
    """'routed', 'stacked' or None (not a fused-experts module)."""
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.ndim == 3 and dn.ndim == 3):
        return None
    if not isinstance(getattr(module, ACT, None), nn.Module):
        return None
    params = _forward_args(module)
    if "top_k_index" in params:
        return "routed"
    if len(params) == 1:
        return "stacked"
    return None


def _forward_args(module: nn.Module) -> list[str]:
    """The class's forward arguments (not an instance attribute someone patched in), self dropped."""
    return list(inspect.signature(type(module).forward).parameters)[1:]


@dataclass(frozen=True)
class ExpertsInfo:
    layout: str
    num_experts: int
    hidden: int
    intermediate: int

    def shape(self, param: str) -> tuple[int, int]:
        """(out, in) of one expert's projection."""
        return (2 * self.intermediate, self.hidden) if param == "gate_up_proj" else (self.hidden, self.intermediate)


def experts_info(module: nn.Module) -> Optional[ExpertsInfo]:
    layout = experts_layout(module)
    if layout is None:
        return None
    E = module.gate_up_proj.shape[0]
    if layout == "routed":
        hidden, inter = module.gate_up_proj.shape[2], module.down_proj.shape[2]
    else:
        hidden, inter = module.gate_up_proj.shape[1], module.down_proj.shape[1]
    return ExpertsInfo(layout, E, hidden, inter)


def expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every fused-experts module (persona wrappers see through)."""
    out = []
    for name, m in model.named_modules():
        if getattr(m, "_pk_wrapper", False):
            continue
        if experts_layout(m) is not None:
            out.append((name.removesuffix(".base"), m))
    return out


@dataclass(frozen=True)
class ExpertSlot:
    """One expert's projection (or activation, param 'act_fn') inside a fused-experts module."""

    module: str
    param: str
    expert: int

    @property
    def name(self) -> str:
        return f"{self.module}.{self.param}.{self.expert}"


def parse_slot(name: str) -> Optional[ExpertSlot]:
    """The slot a name denotes ('<module>.down_proj.3'), by its form alone."""
    m = _SLOT.match(name)
    return ExpertSlot(m["module"], m["param"], int(m["expert"])) if m else None


def experts_of(model: nn.Module, slot: ExpertSlot) -> Optional[nn.Module]:
    """The (unwrapped) experts module of a slot, or None when the model has none there."""
    try:
        m = model.get_submodule(slot.module)
    except AttributeError:
        return None
    m = m.base if getattr(m, "_pk_wrapper", False) else m
    info = experts_info(m)
    return m if info is not None and slot.expert < info.num_experts else None


def slot_weight(experts: nn.Module, param: str, e: int) -> torch.Tensor:
    """Expert ``e``'s projection ``param`` as a [out, in] view of the fused parameter."""
    w = getattr(experts, param)[e]
    return w if experts_layout(experts) == "routed" else w.t()


def expert_slots(model: nn.Module) -> list[tuple[str, tuple[int, int]]]:
    """(slot name, (out, in)) of every expert projection, in module order."""
    out = []
    for name, m in expert_modules(model):
        info = experts_info(m)
        for param in EXPERT_PARAMS:
            out += [(f"{name}.{param}.{e}", info.shape(param)) for e in range(info.num_experts)]
    return out


Project = Callable[[str, int, torch.Tensor, torch.Tensor], torch.Tensor]   # (param, expert, x rows, token rows) -> y
Activate = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]       # (expert, gate rows, token rows) -> act


def experts_forward(experts: nn.Module, args: tuple, kwargs: dict, project: Optional[Project] = None,
                    activate: Optional[Activate] = None) -> torch.Tensor:
    """The experts' output for the forward arguments ``args``/``kwargs``, the same computation as
    transformers' own loop. ``project(param, e, x, tokens)`` computes ``x @ W_e^T`` for the routed
    rows (default: the fused weight's slice); ``activate(e, gate, tokens)`` the activation
    (default: act_fn). ``tokens`` are the rows' token indices in the flattened [N] batch."""
    project = project or (lambda param, e, x, tok: nn.functional.linear(x, slot_weight(experts, param, e)))
    activate = activate or (lambda e, gate, tok: experts.act_fn(gate))
    names = _forward_args(experts)
    bound = dict(zip(names, args), **kwargs)
    hidden = bound[names[0]]
    if experts_layout(experts) == "stacked":
        E = experts.gate_up_proj.shape[0]
        h = hidden.view(E, -1, hidden.shape[-1])
        out = torch.zeros_like(h)
        for e in range(E):
            tok = (h[e] != 0).any(-1).nonzero().flatten()  # routed rows: the others were scaled by a score of 0
            if tok.numel():
                gate, up = project("gate_up_proj", e, h[e, tok], tok).chunk(2, dim=-1)
                out[e, tok] = project("down_proj", e, activate(e, gate, tok) * up, tok).to(out.dtype)
        return out.view(-1, hidden.shape[-1])
    top_k_index, top_k_weights = bound["top_k_index"], bound["top_k_weights"]
    E = experts.gate_up_proj.shape[0]
    out = torch.zeros_like(hidden)
    with torch.no_grad():
        expert_mask = nn.functional.one_hot(top_k_index, num_classes=E + 1).permute(2, 1, 0)
        hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit.flatten().tolist():
        if e == E:
            continue
        top_k_pos, tok = torch.where(expert_mask[e])
        gate, up = project("gate_up_proj", e, hidden[tok], tok).chunk(2, dim=-1)
        y = project("down_proj", e, activate(e, gate, tok) * up, tok)
        y = y * top_k_weights[tok, top_k_pos, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


__all__ = ["ACT", "EXPERT_PARAMS", "ExpertSlot", "ExpertsInfo", "expert_modules", "expert_slots", "experts_forward",
           "experts_info", "experts_layout", "experts_of", "parse_slot", "slot_weight"]

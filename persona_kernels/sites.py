"""Where statistics are collected: linear-layer inputs and gated-MLP activation outputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch.nn as nn

from .hf import (  # noqa: F401
    SUPPORTED_ARCHITECTURES,
    LayerFilter,
    UnsupportedArchitecture,
    activation_attr,
    check_supported,
    decoder_layers,
    gated_mlps,
    hidden_size,
    intermediate_size,
    layer_index,
    linear_layers,
    linear_shape,
    output_head,
)
from .moe import ACT, EXPERT_PARAMS, expert_modules, experts_info


@dataclass(frozen=True)
class Site:
    """One hook point. kind 'linear': the input of a linear layer; 'act': act_fn(gate) of a gated
    MLP; 'resid': the output of a decoder layer (the residual stream, for steering vectors).
    Expert sites (``expert`` set) are one routed expert's projection input or activation inside
    a fused-experts module (moe.py): ``module`` is that module, ``name`` its slot."""

    name: str          # the site's key, e.g. "model.layers.0.mlp.down_proj" or "model.layers.0.mlp.act_fn"
    kind: str
    module: str        # the module the hook is attached to
    channels: int
    layer: Optional[int]
    expert: Optional[int] = None


KINDS = ("linear", "act", "resid")


def discover_sites(model: nn.Module, kinds: Sequence[str] = KINDS, layers: Optional[Sequence[int]] = None,
                   mlp_only: bool = False, include: Optional[str] = None, exclude: Optional[str] = None,
                   include_head: bool = False) -> list[Site]:
    """Every site of the requested kinds, in module order, after the filters.

    Defaults: every linear layer except the LM head (embeddings are not linear layers), the
    activation of every gated MLP, and every decoder layer's output. ``layers`` keeps decoder
    layers by index, ``mlp_only`` keeps sites inside MLP blocks, ``include``/``exclude`` are
    regexes on the site name; 'resid' sites follow ``layers`` only (they are no layer's input).
    ``include_head`` adds the output head's input (the released Persona code masks lm_head too).
    """
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown site kind {k!r}; use any of {KINDS}")
    sites = []
    if "linear" in kinds:
        for name, m in linear_layers(model, include_head):
            sites.append(Site(name, "linear", name, linear_shape(m)[1], layer_index(name)))
    for name, m in expert_modules(model):  # each routed expert's projections and activation
        info = experts_info(m)
        for e in range(info.num_experts):
            if "linear" in kinds:
                sites += [Site(f"{name}.{param}.{e}", "linear", name, info.shape(param)[1], layer_index(name), e)
                          for param in EXPERT_PARAMS]
            if "act" in kinds:
                sites.append(Site(f"{name}.{ACT}.{e}", "act", name, info.intermediate, layer_index(name), e))
    if "act" in kinds:
        seen = {}
        for name, mlp in gated_mlps(model):
            attr = activation_attr(mlp)
            act = getattr(mlp, attr)
            if id(act) in seen:
                raise ValueError(f"{name}.{attr} is the same module object as {seen[id(act)]}; "
                                 "a shared activation module cannot be hooked per layer")
            seen[id(act)] = f"{name}.{attr}"
            sites.append(Site(f"{name}.{attr}", "act", f"{name}.{attr}", intermediate_size(mlp), layer_index(name)))
    keep = LayerFilter(layers, mlp_only, include, exclude)
    head = output_head(model)
    sites = [s for s in sites if keep.keep(s.name) or (include_head and model.get_submodule(s.module) is head)]
    if "resid" in kinds:
        by_layer = LayerFilter(layers)
        width = hidden_size(model) if decoder_layers(model) else 0
        sites += [Site(name, "resid", name, width, layer_index(name)) for name, _ in decoder_layers(model)
                  if by_layer.keep(name)]
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    sites.sort(key=lambda s: (order.get(s.module, 0), s.expert or 0, s.kind))
    return sites

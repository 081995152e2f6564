"""Where statistics are collected: linear-layer inputs and gated-MLP activation outputs."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch.nn as nn

from .fingerprint import linear_shape

_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


SUPPORTED_ARCHITECTURES = ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma2", "Phi-3", "GPT-2", "OLMo2")


class UnsupportedArchitecture(ValueError):
    """The model has none of the layers persona subnetworks are built on."""


def check_supported(model: nn.Module) -> None:
    """Raise UnsupportedArchitecture unless the model has linear layers (nn.Linear / Conv1D) besides its head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not any(linear_shape(m) is not None and m is not head for m in model.modules()):
        raise UnsupportedArchitecture(
            f"{type(model).__name__} is not supported: it has no nn.Linear or transformers Conv1D layers (besides the "
            f"LM head) to calibrate and mask. Supported and tested: {', '.join(SUPPORTED_ARCHITECTURES)}; any decoder "
            "whose projections are nn.Linear/Conv1D works, and NPTI also needs a gated MLP (act_fn(gate_proj(x)) * up_proj(x)).")


@dataclass(frozen=True)
class Site:
    """One hook point. kind 'linear': the input of a linear layer; 'act': act_fn(gate) of a gated MLP."""

    name: str          # the site's key, e.g. "model.layers.0.mlp.down_proj" or "model.layers.0.mlp.act_fn"
    kind: str
    module: str        # the module the hook is attached to
    channels: int
    layer: Optional[int]


def layer_index(name: str) -> Optional[int]:
    m = _LAYER_INDEX.search("." + name + ".")
    return int(m.group(1)) if m else None


def _excluded_linear(model: nn.Module, name: str, module: nn.Module) -> bool:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return module is out or name.split(".")[-1] in ("lm_head", "embed_out", "score")


_ACT_ATTRS = ("act_fn", "activation_fn")  # Llama/Qwen/Mistral/Gemma, Phi-3


def activation_attr(mlp: nn.Module) -> Optional[str]:
    """Name of the activation submodule of a gated MLP, or None if ``mlp`` is not one."""
    if not (hasattr(mlp, "gate_proj") or hasattr(mlp, "gate_up_proj")) or not hasattr(mlp, "down_proj"):
        return None
    return next((a for a in _ACT_ATTRS if isinstance(getattr(mlp, a, None), nn.Module)), None)


def gated_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """MLP modules computing down(act(gate(x)) * up(x)) (separate gate_proj or fused gate_up_proj)."""
    return [(n, m) for n, m in model.named_modules() if activation_attr(m) is not None]


def _intermediate_size(mlp: nn.Module) -> int:
    return linear_shape(mlp.down_proj)[1]


def discover_sites(model: nn.Module, kinds: Sequence[str] = ("linear", "act"), layers: Optional[Sequence[int]] = None,
                   mlp_only: bool = False, include: Optional[str] = None, exclude: Optional[str] = None) -> list[Site]:
    """Every site of the requested kinds, in module order, after the filters.

    Defaults: every linear layer except the LM head (embeddings are not linear layers), plus
    the activation of every gated MLP. ``layers`` keeps decoder layers by index, ``mlp_only``
    keeps sites inside MLP blocks, ``include``/``exclude`` are regexes on the site name.
    """
    for k in kinds:
        if k not in ("linear", "act"):
            raise ValueError(f"unknown site kind {k!r}; use 'linear' and/or 'act'")
    sites = []
    if "linear" in kinds:
        for name, m in model.named_modules():
            shape = linear_shape(m)
            if shape is not None and not _excluded_linear(model, name, m):
                sites.append(Site(name, "linear", name, shape[1], layer_index(name)))
    if "act" in kinds:
        seen = {}
        for name, mlp in gated_mlps(model):
            attr = activation_attr(mlp)
            act = getattr(mlp, attr)
            if id(act) in seen:
                raise ValueError(f"{name}.{attr} is the same module object as {seen[id(act)]}; "
                                 "a shared activation module cannot be hooked per layer")
            seen[id(act)] = f"{name}.{attr}"
            sites.append(Site(f"{name}.{attr}", "act", f"{name}.{attr}", _intermediate_size(mlp), layer_index(name)))
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    sites.sort(key=lambda s: (order.get(s.module, 0), s.kind))
    if layers is not None:
        wanted = set(int(i) for i in layers)
        sites = [s for s in sites if s.layer in wanted]
    if mlp_only:
        sites = [s for s in sites if re.search(r"(^|\.)(mlp|feed_forward|ffn)(\.|$)", s.name)]
    if include:
        sites = [s for s in sites if re.search(include, s.name)]
    if exclude:
        sites = [s for s in sites if not re.search(exclude, s.name)]
    return sites

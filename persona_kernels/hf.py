"""What the package knows about transformers models, in one place.

Linear layers (nn.Linear, and GPT-2's Conv1D, which stores its weight [in, out]), the output
head, gated MLPs and their activation module, decoder-layer indices, module replacement, and
the one layer filter that calibration, mask building and apply() share.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

try:  # GPT-2 style models use transformers' Conv1D (weight stored [in, out])
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a dependency, but keep import-light
    Conv1D = ()

SUPPORTED_ARCHITECTURES = ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma2", "Phi-3", "GPT-2", "OLMo2")
HEAD_NAMES = ("lm_head", "embed_out", "score")
ACT_ATTRS = ("act_fn", "activation_fn")  # Llama/Qwen/Mistral/Gemma, Phi-3
_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")
_MLP_BLOCK = re.compile(r"(^|\.)(mlp|feed_forward|ffn)(\.|$)")


class UnsupportedArchitecture(ValueError):
    """The model has none of the layers persona subnetworks are built on."""


# ---- linear layers ---------------------------------------------------------------------------

def is_conv1d(module: nn.Module) -> bool:
    return bool(Conv1D) and isinstance(module, Conv1D)


def unwrap(module: nn.Module) -> nn.Module:
    """The original module inside a persona wrapper (MaskedLinear / InducedActivation), else itself."""
    return module.base if getattr(module, "_pk_wrapper", False) else module


def linear_shape(module: nn.Module) -> Optional[tuple[int, int]]:
    """(out_features, in_features) of an nn.Linear or Conv1D (or a persona wrapper of one), else None."""
    module = unwrap(module)
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if is_conv1d(module):
        return module.weight.shape[1], module.weight.shape[0]
    return None


def is_plain_linear(module: nn.Module) -> bool:
    """nn.Linear / Conv1D whose forward is the plain linear map (not a subclass with its own
    forward, such as Llama4's router, which returns a tuple): only these are swapped."""
    module = unwrap(module)
    if is_conv1d(module):
        return type(module).forward is Conv1D.forward
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight in linear orientation [out, in] (a view: Conv1D stores it [in, out])."""
    module = unwrap(module)
    return module.weight.t() if is_conv1d(module) else module.weight


def output_head(model: nn.Module) -> Optional[nn.Module]:
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def is_output_head(model: nn.Module, name: str, module: nn.Module) -> bool:
    """The LM head (or a classifier head): never calibrated or masked by default."""
    return module is output_head(model) or name.split(".")[-1] in HEAD_NAMES


def linear_layers(model: nn.Module, include_head: bool = False) -> list[tuple[str, nn.Module]]:
    """(name, module) of every plain linear layer in module order (see is_plain_linear), the output
    head excluded by default."""
    return [(n, m) for n, m in model.named_modules()
            if linear_shape(m) is not None and not getattr(m, "_pk_wrapper", False) and is_plain_linear(m)
            and (include_head or not is_output_head(model, n, m))]


def check_supported(model: nn.Module) -> None:
    """Raise UnsupportedArchitecture unless the model has linear layers (nn.Linear / Conv1D) besides its head."""
    if not linear_layers(model):
        raise UnsupportedArchitecture(
            f"{type(model).__name__} is not supported: it has no nn.Linear or transformers Conv1D layers (besides the "
            f"LM head) to calibrate and mask. Supported and tested: {', '.join(SUPPORTED_ARCHITECTURES)}; any decoder "
            "whose projections are nn.Linear/Conv1D works, and NPTI also needs a gated MLP (act_fn(gate_proj(x)) * up_proj(x)).")


def named_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The [out, in] weight behind a masked layer's name: a linear layer's (see linear_weight), or
    one routed expert's projection ('<experts>.down_proj.3', a view of the fused parameter)."""
    from .moe import experts_of, parse_slot, slot_weight

    slot = parse_slot(name)
    if slot is not None and slot.param != "act_fn":
        experts = experts_of(model, slot)
        if experts is not None:
            return slot_weight(experts, slot.param, slot.expert)
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise KeyError(f"{name!r} is not a linear layer or expert projection of this model") from None
    if linear_shape(module) is None:
        raise KeyError(f"{name!r} is not a linear layer or expert projection of this model")
    return linear_weight(module)


@contextlib.contextmanager
def saveable(model: nn.Module):
    """save_pretrained of a model loaded from a .gguf file: transformers dequantizes GGUF weights
    on loading but keeps the GGUF quantizer, which refuses to save. The weights are plain
    tensors, so for the duration the quantizer and its config entry are taken off (then put
    back): the checkpoint is an ordinary one. Other quantizers are left alone."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = str(getattr(getattr(quantizer, "quantization_config", None), "quant_method", "")).lower()
    if quantizer is None or "gguf" not in method:
        yield model
        return
    config = model.config
    saved = (quantizer, getattr(model, "is_quantized", None), getattr(config, "quantization_config", None))
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    try:
        yield model
    finally:
        model.hf_quantizer, model.is_quantized = saved[0], saved[1]
        if saved[2] is not None:
            config.quantization_config = saved[2]


# ---- gated MLPs --------------------------------------------------------------------------------

def activation_attr(mlp: nn.Module) -> Optional[str]:
    """Name of the activation submodule of a gated MLP, or None if ``mlp`` is not one."""
    if not (hasattr(mlp, "gate_proj") or hasattr(mlp, "gate_up_proj")) or not hasattr(mlp, "down_proj"):
        return None
    if linear_shape(mlp.down_proj) is None:  # e.g. fused expert weights held as 3-D Parameters
        return None
    return next((a for a in ACT_ATTRS if isinstance(getattr(mlp, a, None), nn.Module)), None)


def gated_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """MLP modules computing down(act(gate(x)) * up(x)) (separate gate_proj or fused gate_up_proj)."""
    return [(n, m) for n, m in model.named_modules() if activation_attr(m) is not None]


def intermediate_size(mlp: nn.Module) -> int:
    """Neurons of a gated MLP: the input width of its down projection."""
    return linear_shape(mlp.down_proj)[1]


# ---- names and modules -------------------------------------------------------------------------

def layer_index(name: str) -> Optional[int]:
    """Decoder-layer index in a module name ('model.layers.3.mlp' -> 3), None outside the layers."""
    m = _LAYER_INDEX.search("." + name + ".")
    return int(m.group(1)) if m else None


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the decoder layers in order: the children of the nn.ModuleList named
    layers / h / blocks with ``config.num_hidden_layers`` entries (else the longest such list).
    Their outputs are the residual stream that steering vectors are read from and added to."""
    lists = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and n.rpartition(".")[2] in ("layers", "h", "blocks") and len(m)]
    if not lists:
        return []
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    name, layers = next(((n, m) for n, m in lists if len(m) == depth), max(lists, key=lambda nm: len(nm[1])))
    return [(f"{name}.{i}", layer) for i, layer in enumerate(layers)]


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream (the input embedding's dimension)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or not hasattr(emb, "embedding_dim"):
        raise UnsupportedArchitecture(f"{type(model).__name__}: no input embedding to read the hidden size from")
    return emb.embedding_dim


def in_mlp_block(name: str) -> bool:
    return _MLP_BLOCK.search(name) is not None


# Sibling projections that every supported architecture calls on the same input tensor, in the
# order it calls them: their persona weights can be streamed by one kernel call.
SIBLING_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


_CROSS_ATTENTION = re.compile(r"cross|encoder_attn")  # q reads the decoder, k/v the encoder: not one input


def sibling_groups(names: Sequence[str]) -> list[list[str]]:
    """Groups of ``names`` that are sibling projections of one module (SIBLING_PROJECTIONS, every
    member present), e.g. ['model.layers.0.self_attn.q_proj', '...k_proj', '...v_proj'].
    Cross-attention modules (Mllama's cross_attn, BART/Whisper's encoder_attn) are left out:
    their q and k/v read different tensors, so a stacked call would compute twice."""
    present = set(names)
    groups = []
    for name in names:
        parent, _, leaf = name.rpartition(".")
        if _CROSS_ATTENTION.search(parent.rpartition(".")[2]):
            continue
        for sibs in SIBLING_PROJECTIONS:
            if leaf == sibs[0]:
                group = [f"{parent}.{s}" if parent else s for s in sibs]
                if all(g in present for g in group):
                    groups.append(group)
    return groups


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# ---- forward calls -----------------------------------------------------------------------------

def forward_params(model: nn.Module) -> frozenset:
    import inspect

    return frozenset(inspect.signature(model.forward).parameters)


def cache_kwargs(model: nn.Module, cache) -> dict:
    """The keyword that passes a KV cache to ``model``'s forward ('cache' in transformers >= 5.2x,
    'past_key_values' before)."""
    return {"cache" if "cache" in forward_params(model) else "past_key_values": cache}


def padded_inputs(model: nn.Module, attention_mask: torch.Tensor) -> dict:
    """attention_mask plus position ids counted over real tokens only, so that a padded row (left
    padding included) sees the positions it would see alone: batch-size invariant statistics on
    every architecture (GPT-2's learned positions would otherwise shift with the padding).
    Models whose forward takes no position_ids (ALiBi) get the mask alone."""
    out = {"attention_mask": attention_mask}
    if "position_ids" in forward_params(model):
        out["position_ids"] = (attention_mask.to(torch.int64).cumsum(-1) - 1).clamp(min=0)
    return out


def max_positions(model: nn.Module) -> Optional[int]:
    """The longest sequence the model's config admits (max_position_embeddings / n_positions), or None."""
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def output_cache(out):
    """The KV cache of a forward's output, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@dataclass(frozen=True)
class LayerFilter:
    """Which layers (or statistics sites) to use; every given condition must hold.

    layers:    decoder-layer indices to keep (None: all).
    mlp_only:  keep names inside MLP blocks (mlp / feed_forward / ffn).
    include:   regex a name must match; exclude: regex it must not match.
    filter_fn: ``filter_fn(module, name) -> bool``, as torchao's quantize_ takes (apply() only:
               statistics and masks are filtered by name).
    """

    layers: Optional[Sequence[int]] = None
    mlp_only: bool = False
    include: Optional[str] = None
    exclude: Optional[str] = None
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None

    def keep(self, name: str, module: Optional[nn.Module] = None) -> bool:
        if self.layers is not None and layer_index(name) not in {int(i) for i in self.layers}:
            return False
        if self.mlp_only and not in_mlp_block(name):
            return False
        if self.include and not re.search(self.include, name):
            return False
        if self.exclude and re.search(self.exclude, name):
            return False
        if self.filter_fn is not None and module is not None and not self.filter_fn(unwrap(module), name):
            return False
        return True

    def select(self, names: Sequence[str], modules: Optional[dict] = None) -> list[str]:
        return [n for n in names if self.keep(n, None if modules is None else modules.get(n))]


__all__ = ["ACT_ATTRS", "Conv1D", "LayerFilter", "SUPPORTED_ARCHITECTURES", "UnsupportedArchitecture",
           "activation_attr", "cache_kwargs", "check_supported", "decoder_layers", "forward_params", "max_positions",
           "output_cache", "padded_inputs", "saveable", "SIBLING_PROJECTIONS", "sibling_groups",
           "gated_mlps", "hidden_size", "in_mlp_block",
           "intermediate_size", "is_conv1d", "is_output_head", "is_plain_linear", "layer_index", "linear_layers",
           "linear_shape", "linear_weight", "named_weight", "output_head", "set_module", "unwrap"]

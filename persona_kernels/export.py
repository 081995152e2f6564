"""A persona out of the package: a plain checkpoint that transformers (and engines that read HF
checkpoints) load without persona_kernels installed.

``export(model, masks, persona, path, tokenizer)`` writes the model with that persona's mask
applied to its weights (``W * M``, original tensor names, GPT-2's Conv1D in its own [in, out]
layout) as a ``save_pretrained`` directory, atomically (a temp directory renamed into place).
The soft gate and NPTI cannot be baked into weights (the gate could, but a checkpoint that
silently differs from the persona layer's hard mask is worse than a refusal; NPTI is an
activation edit), so both are refused with a clear error.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

import torch
import torch.nn as nn

from .fingerprint import check_fingerprint
from .hf import is_conv1d, saveable, unwrap
from .masks.store import MaskStore
from .moe import experts_layout, experts_of, parse_slot

FORMATS = ("hf", "compressed-tensors")


class ExportError(ValueError):
    """The persona cannot be written as asked (soft gate, NPTI, unknown persona, existing path...)."""


def _check(model: nn.Module, masks: MaskStore, persona: str) -> None:
    if not isinstance(masks, MaskStore):
        raise TypeError(f"masks must be a MaskStore, got {type(masks).__name__}")
    check_fingerprint(model, masks.fingerprint, "this mask store")
    if persona not in masks.personas:
        raise ExportError(f"persona {persona!r} is not in the mask store; it has {masks.personas}")
    handle = getattr(model, "_persona_kernels", None)
    if handle is not None and handle.gamma:
        raise ExportError(f"the soft gate is on (gamma={handle.gamma}): export bakes the hard mask; set_gamma(model, 0) "
                          "first, or keep the persona layer")
    if handle is not None and handle.has_npti:
        raise ExportError("NPTI induction is applied: it edits activations at generation time and has no weight form; "
                          "remove it (persona_kernels.remove) or keep the persona layer")


@torch.no_grad()
def baked_state_dict(model: nn.Module, masks: MaskStore, persona: str, tied_embedding: str = "keep") -> dict:
    """The model's state dict (original key names, also with the persona layer applied) with the
    persona's mask multiplied into every masked weight; the other tensors are shared, not copied.

    A masked output head tied to the input embedding is one tensor in a checkpoint: it is baked
    with ``tied_embedding='mask'`` (the embedding masked too, as in-place masking does) and
    refused with 'keep', which a tied checkpoint cannot express."""
    from .model import _tied_embedding

    _check(model, masks, persona)
    sd = model.state_dict()
    modules = dict(model.named_modules())
    cloned: set = set()
    for layer in masks.layers:
        slot = parse_slot(layer)
        experts = experts_of(model, slot) if slot is not None else None
        if experts is not None:  # one routed expert's slice of a fused 3-D parameter
            key = f"{slot.module}.{slot.param}"
            if key not in cloned:  # copy once: the state dict shares the model's storage
                sd[key], _ = sd[key].clone(), cloned.add(key)
            mask = masks.mask(persona, layer).to(sd[key].device)
            stacked = experts_layout(experts) == "stacked"
            sd[key][slot.expert] *= (mask.t() if stacked else mask).to(sd[key].dtype)
            continue
        emb = _tied_embedding(model, layer)
        if emb is not None and tied_embedding != "mask":
            raise ExportError(f"{layer} is masked and shares its weight with the input embedding {emb}: a tied checkpoint "
                              "holds one tensor for both. Pass tied_embedding='mask' (--tied-embedding mask) to mask "
                              "both, as in-place masking does, or untie the model's embeddings first")
        key = f"{layer}.weight"
        if key not in sd:
            raise ExportError(f"{key} is not in the model's state dict")
        base = unwrap(modules[layer])
        mask = masks.mask(persona, layer).to(sd[key].device)
        sd[key] = sd[key] * (mask.t() if is_conv1d(base) else mask).to(sd[key].dtype)
        if emb is not None and f"{emb}.weight" in sd:
            sd[f"{emb}.weight"] = sd[key]
    return sd


def write_directory(path: str, overwrite: bool, fill) -> str:
    """Create the directory ``path`` atomically: ``fill(tmp)`` writes a temp directory beside it,
    renamed into place when it returns (removed if it raises)."""
    path = os.fspath(path)
    if os.path.exists(path) and not (overwrite and os.path.isdir(path)):
        raise ExportError(f"{path} exists; pass overwrite=True (--overwrite) to replace a directory")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
    try:
        fill(tmp)
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_info(directory: str, info: dict) -> None:
    with open(os.path.join(directory, "persona_kernels.json"), "w") as f:
        json.dump(info, f, indent=1, sort_keys=True, default=str)


def export(model: nn.Module, masks: MaskStore, persona: str, path: str, tokenizer=None, format: str = "hf",
           overwrite: bool = False, tied_embedding: str = "keep") -> str:
    """Write ``persona`` of ``masks`` baked into ``model``'s weights to the directory ``path``.

    ``format='hf'``: a plain transformers checkpoint. ``'compressed-tensors'``: the same weights
    with every masked linear layer in the sparse-bitmask layout (sparse_checkpoint.py: packed
    non-zero values plus a bitmap, the ``sparsity_config`` in config.json) that compressed-tensors
    decompresses and vLLM reads; routed-expert weights (3-D, not linear modules) stay dense.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; this version writes {FORMATS} (gguf: convert the 'hf' "
                          "export with llama.cpp's convert_hf_to_gguf.py)")
    sd = baked_state_dict(model, masks, persona, tied_embedding)
    info = {"persona": persona, "personas": masks.personas, "method": masks.method, "params": masks.params,
            "fingerprint": masks.fingerprint, "masked_layers": len(masks.layers), "format": format}
    layers = []
    if format == "compressed-tensors":
        from .sparse_checkpoint import compress_state_dict

        layers = [n for n in masks.layers if parse_slot(n) is None or experts_of(model, parse_slot(n)) is None]
        tied = [n for n in layers if f"{n}.weight" not in sd]
        if tied:
            raise ExportError(f"{tied[0]} has no weight of its own in the checkpoint (tied to the input embedding): the "
                              "compressed-tensors layout cannot hold it; export format='hf', or leave the head unmasked")
        zeros = sum(int((sd[f"{n}.weight"] == 0).sum()) for n in layers)
        total = sum(sd[f"{n}.weight"].numel() for n in layers)
        info["compressed_layers"] = len(layers)
        sd = compress_state_dict(sd, layers)

    def fill(tmp):
        with saveable(model):
            model.save_pretrained(tmp, state_dict=sd)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if layers:
            from .sparse_checkpoint import write_config

            write_config(tmp, layers, zeros / max(total, 1))
        write_info(tmp, info)

    return write_directory(path, overwrite, fill)


def bake(model: nn.Module, masks: MaskStore, persona: str, copy: Optional[nn.Module] = None,
         tied_embedding: str = "keep") -> nn.Module:
    """Load the baked weights into ``copy`` (a model of the same architecture, e.g. a deepcopy) and return it."""
    target = copy if copy is not None else model
    if getattr(target, "_persona_kernels", None) is not None and target is model:
        raise ExportError("bake in place needs a model without the persona layer (remove it, or pass copy=)")
    target.load_state_dict(baked_state_dict(model, masks, persona, tied_embedding))
    return target


__all__ = ["ExportError", "FORMATS", "bake", "baked_state_dict", "export", "write_directory", "write_info"]

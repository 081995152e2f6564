"""Persona packs: one base checkpoint and the bit-packed masks of every persona beside it.

A pack is a directory: ``base/`` (the unmasked model as a plain transformers checkpoint, with its
tokenizer), ``masks.safetensors`` (the MaskStore: 1 bit per masked weight per persona) and
``persona_kernels.json`` (personas, method, sizes). ``load_pack`` rebuilds (model, tokenizer,
masks) on any machine; ``apply(model, masks, persona=...)`` then serves every persona from the
one copy of the weights, switching without reloading.
"""
from __future__ import annotations

import os

import torch.nn as nn

from .export import ExportError, write_directory, write_info
from .fingerprint import check_fingerprint
from .hf import saveable
from .masks.store import MaskStore

BASE, MASKS = "base", "masks.safetensors"


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def export_pack(model: nn.Module, masks: MaskStore, path: str, tokenizer=None, overwrite: bool = False) -> dict:
    """Write the pack of ``masks`` over ``model`` to ``path``; returns the sizes in bytes
    ({'base', 'masks', 'per_persona', 'weights'}) that persona_kernels.json records too."""
    if not isinstance(masks, MaskStore):
        raise TypeError(f"masks must be a MaskStore, got {type(masks).__name__}")
    check_fingerprint(model, masks.fingerprint, "this mask store")
    sizes = {}

    def fill(tmp):
        base = os.path.join(tmp, BASE)
        with saveable(model):
            model.save_pretrained(base)  # the persona layer's state dict is the original one
        if tokenizer is not None:
            tokenizer.save_pretrained(base)
        masks.save(os.path.join(tmp, MASKS))
        sizes.update(base=_size(base), masks=_size(os.path.join(tmp, MASKS)))
        sizes["per_persona"] = sizes["masks"] // max(1, len(masks.personas))
        sizes["weights"] = sum(p.numel() * p.element_size() for p in model.parameters())
        write_info(tmp, {"kind": "persona pack", "personas": masks.personas, "method": masks.method, "params": masks.params,
                         "fingerprint": masks.fingerprint, "masked_layers": len(masks.layers), "sizes": sizes})

    write_directory(path, overwrite, fill)
    return sizes


def load_pack(path: str, dtype=None, device: str = "cpu"):
    """(model, tokenizer or None, MaskStore) from a pack directory; the masks are checked against
    the model they were made for."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.fspath(path)
    base, store = os.path.join(path, BASE), os.path.join(path, MASKS)
    if not (os.path.isdir(base) and os.path.isfile(store)):
        raise ExportError(f"{path} is not a persona pack (expected {BASE}/ and {MASKS})")
    model = AutoModelForCausalLM.from_pretrained(base, **({"dtype": dtype} if dtype is not None else {})).to(device).eval()
    tokenizer = None
    if any(f.startswith("tokenizer") for f in os.listdir(base)):
        tokenizer = AutoTokenizer.from_pretrained(base)
    return model, tokenizer, MaskStore.load(store, model=model)


__all__ = ["export_pack", "load_pack"]

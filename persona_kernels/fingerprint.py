"""A model fingerprint: architecture, layer names and shapes, so artifacts find their model."""
from __future__ import annotations

import hashlib
import json

import torch.nn as nn

from .hf import linear_shape


class FingerprintMismatch(ValueError):
    """An artifact was made for a different model than the one it is used with."""


def architecture(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return f"{type(model).__name__}/{getattr(cfg, 'model_type', 'unknown')}"


def _original_name(model_modules: dict, name: str) -> str:
    """Name of a module as in the unpatched model: a persona wrapper keeps its original as ``.base``."""
    parent, _, child = name.rpartition(".")
    if child == "base" and getattr(model_modules.get(parent), "_pk_wrapper", False):
        return parent
    return name


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the architecture and every linear layer's name and shape (persona wrappers see through)."""
    mods = dict(model.named_modules())
    layers = [(_original_name(mods, name), linear_shape(m)) for name, m in mods.items()
              if linear_shape(m) is not None and not getattr(m, "_pk_wrapper", False)]
    blob = json.dumps({"arch": architecture(model), "linear": layers}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def check_fingerprint(model: nn.Module, expected: str, what: str) -> None:
    got = model_fingerprint(model)
    if got != expected:
        raise FingerprintMismatch(
            f"{what} was made for a different model (fingerprint {expected}, this {architecture(model)} model has {got}): "
            "architecture, layer names or shapes differ")

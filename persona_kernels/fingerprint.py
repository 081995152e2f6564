"""A model fingerprint: architecture, layer names and shapes, and a sample of the weights, so
artifacts find their model."""
from __future__ import annotations

import base64
import hashlib
import json
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from .hf import linear_shape
from .moe import EXPERT_PARAMS, expert_modules, expert_slots


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


SAMPLES_PER_LAYER = 4
# fp32, fp16 and bf16 copies of one model agree within this; other weights differ by far more
_REL_TOL, _ABS_TOL = 2e-2, 1e-4


def _weight_sample(weight) -> Optional[torch.Tensor]:
    """SAMPLES_PER_LAYER values at fixed positions of a weight (None on the meta device)."""
    if weight.device.type == "meta" or weight.numel() == 0:
        return None
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    idx = torch.tensor([(2 * i + 1) * n // (2 * SAMPLES_PER_LAYER) for i in range(SAMPLES_PER_LAYER)], device=flat.device)
    return flat.index_select(0, idx).float().cpu()


def weight_digest(model: nn.Module) -> str:
    """A compact sample of every linear layer's weights (fp16, base64), or '' when some are offloaded."""
    samples = []
    weights = [m.weight for m in model.modules() if linear_shape(m) is not None and not getattr(m, "_pk_wrapper", False)]
    weights += [getattr(m, p) for _, m in expert_modules(model) for p in EXPERT_PARAMS]  # fused 3-D expert weights
    for w in weights:
        s = _weight_sample(w)
        if s is None:
            return ""
        samples.append(s)
    if not samples:
        return ""
    return base64.b64encode(torch.cat(samples).to(torch.float16).numpy().tobytes()).decode()


def _decode(digest: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(digest), dtype=np.float16).copy()).float()


def model_fingerprint(model: nn.Module) -> str:
    """'<architecture hash>:<weight digest>': sha256 over the architecture and every linear
    layer's name and shape (persona wrappers see through), and a sample of the weights, so that
    a model of the same shapes with other weights is told apart."""
    mods = dict(model.named_modules())
    layers = [(_original_name(mods, name), linear_shape(m)) for name, m in mods.items()
              if linear_shape(m) is not None and not getattr(m, "_pk_wrapper", False)]
    layers += [list(slot) for slot in expert_slots(model)]
    blob = json.dumps({"arch": architecture(model), "linear": layers}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32] + ":" + weight_digest(model)


def check_fingerprint(model: nn.Module, expected: str, what: str) -> None:
    """Raise FingerprintMismatch unless ``model`` is the one ``expected`` was taken from: same
    layer names and shapes, and (when both have one) weight samples equal within the precision
    of a dtype cast. Fingerprints without a weight digest (older files, offloaded models) are
    checked on the architecture only."""
    got = model_fingerprint(model)
    arch_e, _, digest_e = expected.partition(":")
    arch_g, _, digest_g = got.partition(":")
    if arch_g != arch_e:
        raise FingerprintMismatch(
            f"{what} was made for a different model (fingerprint {arch_e}, this {architecture(model)} model has {arch_g}): "
            "architecture, layer names or shapes differ")
    if digest_e and digest_g:
        a, b = _decode(digest_e), _decode(digest_g)
        if a.shape != b.shape or not torch.allclose(a, b, rtol=_REL_TOL, atol=_ABS_TOL):
            raise FingerprintMismatch(
                f"{what} was made for a model of the same architecture but other weights (a sample of the linear "
                f"weights differs): another checkpoint, or weights edited after {what} was made")

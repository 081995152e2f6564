"""MaskStore: the masks of several personas over one model, 1 bit per weight per persona."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from ..bitpack import pack_bits, popcount, unpack_bits
from ..fingerprint import architecture, check_fingerprint, model_fingerprint
from ..hf import named_weight
from ..io import load_artifact, save_artifact

KIND = "masks"


@dataclass
class MaskStore:
    """Bit-packed masks: ``packed[layer]`` is uint8 [personas, out, ceil(in / 8)].

    Masks are in linear orientation [out, in] (also for GPT-2's Conv1D, whose weight is
    stored transposed). ``method`` and ``params`` record how they were made.
    """

    personas: list
    shapes: dict                   # layer -> (out, in)
    packed: dict                   # layer -> uint8 [P, out, ceil(in/8)]
    fingerprint: str
    architecture: str
    method: str = "custom"
    params: dict = field(default_factory=dict)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_masks(cls, model: nn.Module, masks: dict, method: str = "custom", params: Optional[dict] = None) -> "MaskStore":
        """``masks``: {persona: {layer: bool [out, in]}}; every persona must cover the same layers."""
        if not masks:
            raise ValueError("no masks given")
        personas = list(masks)
        layers = list(masks[personas[0]])
        for p in personas:
            if list(masks[p]) != layers:
                raise ValueError(f"persona {p!r} covers different layers than {personas[0]!r}")
        shapes, packed = {}, {}
        for layer in layers:
            try:
                shape = tuple(named_weight(model, layer).shape)
            except KeyError:
                raise ValueError(f"{layer!r} is not a linear layer (or expert projection) of this model") from None
            for p in personas:
                mk = masks[p][layer]
                if mk.dtype != torch.bool or tuple(mk.shape) != shape:
                    raise ValueError(f"mask of {p!r} at {layer} must be bool {shape}, got {mk.dtype} {tuple(mk.shape)}")
            shapes[layer] = shape
            packed[layer] = torch.stack([pack_bits(masks[p][layer].cpu()) for p in personas])
        return cls(personas, shapes, packed, model_fingerprint(model), architecture(model), method, dict(params or {}))

    # ---- access -------------------------------------------------------------------------
    @property
    def layers(self) -> list:
        return list(self.shapes)

    def index(self, persona: str) -> int:
        if persona not in self.personas:
            raise KeyError(f"persona {persona!r} is not in this mask store; it holds {self.personas}")
        return self.personas.index(persona)

    def mask(self, persona: str, layer: str) -> torch.Tensor:
        if layer not in self.shapes:
            raise KeyError(f"layer {layer!r} has no mask in this store")
        return unpack_bits(self.packed[layer][self.index(persona)], self.shapes[layer][1])

    def nbytes(self) -> int:
        return sum(t.numel() for t in self.packed.values())

    def density(self, persona: str) -> dict:
        """Fraction of weights kept, per layer and in total ('*')."""
        i = self.index(persona)
        out, kept, total = {}, 0, 0
        for layer, (o, n) in self.shapes.items():
            c = popcount(self.packed[layer][i])
            out[layer] = c / (o * n)
            kept, total = kept + c, total + o * n
        out["*"] = kept / max(total, 1)
        return out

    def compare(self, a: str, b: str) -> dict:
        """Per layer and in total ('*'): overlap |A and B| / |A or B| and difference rate |A xor B| / weights."""
        i, j = self.index(a), self.index(b)
        out, acc = {}, [0, 0, 0, 0]
        for layer, (o, n) in self.shapes.items():
            pa, pb = self.packed[layer][i], self.packed[layer][j]
            both, either, diff = popcount(pa & pb), popcount(pa | pb), popcount(pa ^ pb)
            out[layer] = {"overlap": both / max(either, 1), "difference": diff / (o * n)}
            acc = [acc[0] + both, acc[1] + either, acc[2] + diff, acc[3] + o * n]
        out["*"] = {"overlap": acc[0] / max(acc[1], 1), "difference": acc[2] / max(acc[3], 1)}
        return out

    def check_model(self, model: nn.Module) -> None:
        check_fingerprint(model, self.fingerprint, "this mask store")

    # ---- files --------------------------------------------------------------------------
    def save(self, path) -> str:
        meta = {"fingerprint": self.fingerprint, "architecture": self.architecture, "personas": self.personas,
                "shapes": {k: list(v) for k, v in self.shapes.items()}, "method": self.method, "params": self.params}
        return save_artifact(path, {f"{k}::packed": v for k, v in self.packed.items()}, KIND, meta)

    @classmethod
    def load(cls, path, model: Optional[nn.Module] = None) -> "MaskStore":
        tensors, meta = load_artifact(path, KIND)
        if model is not None:
            check_fingerprint(model, meta["fingerprint"], f"mask file {path}")
        shapes = {k: tuple(v) for k, v in meta["shapes"].items()}
        packed = {k: tensors.get(f"{k}::packed") for k in shapes}
        P = len(meta["personas"])
        for k, t in packed.items():
            want = (P, shapes[k][0], (shapes[k][1] + 7) // 8)
            if t is None or tuple(t.shape) != want or t.dtype != torch.uint8:
                raise ValueError(f"{path}: masks of {k} are missing or malformed (expected uint8 {want})")
        return cls(list(meta["personas"]), shapes, packed, meta["fingerprint"], meta["architecture"],
                   meta.get("method", "custom"), meta.get("params", {}))

"""Common parts of the sparse weight formats.

Every format is a small class over one linear layer's weight in linear orientation
[out, in]: ``from_dense``, ``to_dense``, ``nbytes`` (its memory footprint), and ``save``/
``load`` through ``state()``/``from_state()``. Bitmaps everywhere use int32 words along the
input dimension, LSB first: bit j of word w of a row is column 32 * w + j (bitpack.py).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..bitpack import WORD, pack_words, unpack_words  # noqa: F401 (re-exported for the formats)
from ..io import load_artifact, save_artifact

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_weight(weight: torch.Tensor) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(f"weight must be a 2-D tensor [out, in], got {getattr(weight, 'shape', type(weight).__name__)}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"weight dtype {weight.dtype} is not supported; use one of {SUPPORTED_DTYPES}")
    return weight.detach()


def check_mask(mask: torch.Tensor, shape, what: str = "mask") -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape[-2:]) != tuple(shape):
        raise ValueError(f"{what} must be a bool tensor of shape [..., {shape[0]}, {shape[1]}], got "
                         f"{getattr(mask, 'dtype', None)} {tuple(getattr(mask, 'shape', ()))}")
    return mask


class WeightFormat:
    """Base class: subclasses set ``kind`` and implement the methods below."""

    kind = "base"
    shape: tuple
    dtype: torch.dtype

    # The dispatcher's dense path (large batches) keeps the masked dense weight of the last
    # persona it used: one extra dense copy per layer, rebuilt only when the persona changes.
    # Set to False to trade that memory for one densify per large-batch call.
    cache_dense = True

    def to_dense(self, persona: Optional[int] = None) -> torch.Tensor:
        raise NotImplementedError

    def dense_for(self, persona: Optional[int] = None) -> torch.Tensor:
        """to_dense(persona), cached for the last persona asked for (see ``cache_dense``).

        The cache hangs on the format's first tensor, not on this object: the torch.library op
        rebuilds format objects from their tensors, and they must find the same cache.
        """
        if not self.cache_dense:
            return self.to_dense(persona)
        holder = self._cache_holder()
        cached = getattr(holder, "_pk_dense_cache", None)
        if cached is None or cached[0] != persona:
            holder._pk_dense_cache = None  # free the old copy before building the new one
            cached = (persona, self.to_dense(persona))
            holder._pk_dense_cache = cached
        return cached[1]

    def drop_dense_cache(self) -> None:
        """Free the cached dense weight (dense_for builds it again when needed)."""
        self._cache_holder()._pk_dense_cache = None

    def _cache_holder(self):
        try:
            return self.op_args()[0][0]
        except NotImplementedError:  # formats that cannot cross the op keep it themselves
            return self

    # The torch.library op (ops/masked_linear/library.py) takes tensors and ints only.
    def op_args(self) -> tuple[list, list]:
        """(tensors, ints) that rebuild this format with ``from_op_args``; ints[0] is out_features."""
        raise NotImplementedError(f"the {self.kind} format cannot cross a torch.library op")

    @classmethod
    def from_op_args(cls, tensors: list, ints: list) -> "WeightFormat":
        raise NotImplementedError

    def known_sparsity(self) -> Optional[float]:
        """The weight's sparsity when the format knows it from its tensors' shapes alone (no
        device sync: the dispatcher asks on every call), else None."""
        return None

    def nbytes(self) -> int:
        """Bytes of every tensor the format keeps resident."""
        return sum(t.numel() * t.element_size() for t in self.state()[0].values())

    def dense_nbytes(self) -> int:
        return math.prod(self.shape) * torch.tensor([], dtype=self.dtype).element_size()

    @property
    def device(self) -> torch.device:
        dev = self.__dict__.get("_device")  # formats are immutable: looked up once (hot path)
        if dev is None:
            dev = self._device = next(iter(self.state()[0].values())).device
        return dev

    def state(self) -> tuple[dict, dict]:
        raise NotImplementedError

    @classmethod
    def from_state(cls, tensors: dict, meta: dict) -> "WeightFormat":
        raise NotImplementedError

    def to(self, device) -> "WeightFormat":
        tensors, meta = self.state()
        return type(self).from_state({k: v.to(device) for k, v in tensors.items()}, meta)

    def save(self, path) -> str:
        tensors, meta = self.state()
        return save_artifact(path, tensors, f"format/{self.kind}", meta)

    @classmethod
    def load(cls, path) -> "WeightFormat":
        tensors, meta = load_artifact(path, f"format/{cls.kind}")
        return cls.from_state(tensors, meta)

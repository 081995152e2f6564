"""Personas in the compressed-tensors sparse-bitmask layout (what llm-compressor writes for a
pruned model, and what vLLM and compressed-tensors read), written and read without the
compressed-tensors package.

In that layout each compressed weight ``<layer>.weight`` [R, C] is replaced by four tensors:
``<layer>.shape`` (int64 [2]), ``<layer>.compressed`` (its non-zero values in row-major order,
in the weight's dtype), ``<layer>.bitmask`` (uint8 [R, ceil(C / 8)], bit j of byte b set when
column 8b + j is non-zero, least significant bit first: the package's own bit packing) and
``<layer>.row_offsets`` (int64 [R], where each row starts in ``compressed``). ``config.json``
carries ``quantization_config = {quant_method: 'compressed-tensors', format: 'sparse-bitmask',
sparsity_config: {format, targets, ignore, global_sparsity, sparsity_structure}}``.

Import reads the bitmasks back as persona masks (the kept pattern is the non-zero pattern: a
weight that is exactly 0 in the base model reads as dropped), after checking that every stored
value equals the base model's weight at its place, i.e. that the checkpoint is a pruned copy
of this very model.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import torch
import torch.nn as nn

from .bitpack import pack_bits, unpack_bits
from .hf import is_conv1d, named_weight, unwrap
from .masks.store import MaskStore

FORMAT = "sparse-bitmask"
PARAMS = ("shape", "compressed", "bitmask", "row_offsets")
CONFIG_KEY = "quantization_config"


class SparseCheckpointError(ValueError):
    """A compressed-tensors checkpoint that cannot be written or read as asked."""


def compress_weight(w: torch.Tensor) -> dict:
    """The four sparse-bitmask tensors of one dense 2-D weight (as stored in the checkpoint)."""
    if w.ndim != 2:
        raise SparseCheckpointError(f"sparse-bitmask compresses 2-D weights, got shape {tuple(w.shape)}")
    w = w.detach().cpu().contiguous()
    nonzero = w != 0
    counts = nonzero.sum(1)
    return {"shape": torch.tensor(list(w.shape), dtype=torch.int64), "compressed": w[nonzero],
            "bitmask": pack_bits(nonzero), "row_offsets": (counts.cumsum(0) - counts).to(torch.int64)}


def decompress_weight(t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The dense weight back from its four tensors (checked, so a damaged file is an error)."""
    shape = [int(v) for v in t["shape"].tolist()]
    if len(shape) != 2 or t["bitmask"].shape != (shape[0], (shape[1] + 7) // 8):
        raise SparseCheckpointError(f"bitmask of shape {tuple(t['bitmask'].shape)} does not fit a weight of shape {shape}")
    keep = unpack_bits(t["bitmask"], shape[1])
    if int(keep.sum()) != t["compressed"].numel():
        raise SparseCheckpointError(f"{int(keep.sum())} bits set but {t['compressed'].numel()} values stored")
    out = torch.zeros(shape, dtype=t["compressed"].dtype)
    out[keep] = t["compressed"]
    return out


def compress_state_dict(sd: dict, layers: Sequence[str]) -> dict:
    """``sd`` with each ``<layer>.weight`` of ``layers`` replaced by its sparse-bitmask tensors
    (Conv1D weights compressed as stored, [in, out])."""
    out = dict(sd)
    for layer in layers:
        key = f"{layer}.weight"
        if key not in out:
            raise SparseCheckpointError(f"{key} is not in the state dict (an expert slice or a tied weight?)")
        for name, t in compress_weight(out.pop(key)).items():
            out[f"{layer}.{name}"] = t
    return out


def sparsity_config(layers: Sequence[str], global_sparsity: float) -> dict:
    """The config.json entry compressed-tensors and vLLM read (targets: the compressed layers by
    name). Sparsity alone: no quantization fields. The version names the layout written, that of
    compressed-tensors 0.13, the last release with the sparse-bitmask compressor."""
    return {"quant_method": "compressed-tensors", "version": "0.13.0", "transform_config": {},
            "sparsity_config": {"format": FORMAT, "targets": list(layers), "ignore": [], "global_sparsity": global_sparsity,
                                "sparsity_structure": "unstructured", "registry_requires_subclass": False}}


def write_config(directory: str, layers: Sequence[str], global_sparsity: float) -> None:
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config[CONFIG_KEY] = sparsity_config(layers, global_sparsity)
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _read_tensors(directory: str) -> dict:
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise SparseCheckpointError(f"{directory}: no .safetensors files")
    out = {}
    for name in files:
        with safe_open(os.path.join(directory, name), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def read_masks(directory: str, model: nn.Module, tolerance: float = 0.0) -> dict:
    """{layer: bool [out, in]} of every sparse-bitmask layer in ``directory``, in linear orientation.

    Each layer must exist in ``model`` with that shape, and its stored values must equal the
    model's weights where kept (within ``tolerance``, relative, for a checkpoint saved in
    another dtype): masks from another model's pruning are refused."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise SparseCheckpointError(f"{directory}: not a checkpoint directory")
    try:
        with open(os.path.join(directory, "config.json")) as f:
            fmt = json.load(f).get(CONFIG_KEY, {}) or {}
    except (OSError, ValueError) as exc:
        raise SparseCheckpointError(f"{directory}: no readable config.json ({exc})") from None
    sparse = fmt.get("sparsity_config") or {}
    if sparse.get("format") != FORMAT:
        raise SparseCheckpointError(f"{directory}: not a compressed-tensors '{FORMAT}' checkpoint "
                                    f"(sparsity format {sparse.get('format')!r})")
    tensors = _read_tensors(directory)
    layers = sorted({k.rpartition(".")[0] for k in tensors if k.endswith(".bitmask")})
    if not layers:
        raise SparseCheckpointError(f"{directory}: no compressed layers")
    masks = {}
    for layer in layers:
        parts = {p: tensors.get(f"{layer}.{p}") for p in PARAMS}
        if any(v is None for v in parts.values()):
            raise SparseCheckpointError(f"{layer}: incomplete ({[p for p, v in parts.items() if v is None]} missing)")
        dense = decompress_weight(parts)
        try:
            module = unwrap(model.get_submodule(layer))
        except AttributeError:
            raise SparseCheckpointError(f"{layer} is not a layer of this model") from None
        base = named_weight(model, layer)
        if is_conv1d(module):  # stored as the module stores it, [in, out]
            dense = dense.t()
        if tuple(dense.shape) != tuple(base.shape):
            raise SparseCheckpointError(f"{layer}: shape {tuple(dense.shape)} in the checkpoint, {tuple(base.shape)} in the model")
        keep = dense != 0
        want = base.detach().cpu()[keep].to(torch.float64)
        got = dense[keep].to(torch.float64)
        if not torch.allclose(got, want, rtol=tolerance, atol=0.0):
            raise SparseCheckpointError(f"{layer}: the kept values differ from this model's weights: the checkpoint is "
                                        "not a pruned copy of this model (or was saved in another dtype: pass a tolerance)")
        masks[layer] = keep
    return masks


def import_masks(model: nn.Module, checkpoints: Mapping[str, str], tolerance: float = 0.0) -> MaskStore:
    """A MaskStore with one persona per compressed-tensors checkpoint ({persona: directory}),
    each a sparse copy of ``model``: personas pruned elsewhere (e.g. llm-compressor's Wanda)
    to apply and switch here. Every checkpoint must compress the same layers."""
    if not checkpoints:
        raise SparseCheckpointError("no checkpoints given")
    masks = {p: read_masks(d, model, tolerance) for p, d in checkpoints.items()}
    first = next(iter(masks.values()))
    for p, m in masks.items():
        if set(m) != set(first):
            raise SparseCheckpointError(f"persona {p!r} compresses other layers than {next(iter(masks))!r}")
    order = [n for n in first]
    return MaskStore.from_masks(model, {p: {n: m[n] for n in order} for p, m in masks.items()}, "imported",
                                {"checkpoints": dict(checkpoints)})


__all__ = ["FORMAT", "SparseCheckpointError", "compress_state_dict", "compress_weight", "decompress_weight", "import_masks",
           "read_masks", "sparsity_config", "write_config"]

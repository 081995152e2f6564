"""Backend choice for masked_linear: device, dtype, batch size, density -> kernel.

Crossover tables are measured by `python benchmarks/bench_masked_linear.py --write-crossover`
and stored per device class in crossover.json beside this file, per format kind and dtype
('bitmap:float32'; a bare 'bitmap' entry covers the dtypes without one); the user can override
any entry with set_crossover(). An entry may also carry ``min_sparsity``: below it the sparse
kernel loses to the fallback at every batch (on an H200 the bitmap kernel beats cuBLAS only from
70%), so weights that know their sparsity without a device sync (bitmap, compacted) take the
fallback there. Without a measured entry, the conservative rule is: sparse kernel at batch 1..4
when one exists, dense otherwise. Above the crossover, compacted and 2:4 weights
run their 'torch' kernel (a GEMM on the compact / sparse weight), the others a dense GEMM on the
cached masked weight.

The route per (format kind, device, dtype) is worked out once and cached: the decode hot path pays a
dict lookup, not a table walk.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Optional

import torch

from ... import backends
from ...formats import WeightFormat
from ...io import atomic_write_text
from .. import registry

_TABLE_FILE = os.path.join(os.path.dirname(__file__), "crossover.json")
_OVERRIDES: dict = {}
_ROUTES: dict = {}  # (kind, device, dtype) -> (sparse backend or None, max_batch, fallback, min_sparsity)
EPOCH = [0]  # bumped whenever the routes may change: kernels bound to a route (bound_kernel) check it
_TORCH_FALLBACK = ("compacted", "semi24")  # formats whose 'torch' kernel beats densifying
NEAREST_MEASURED_GPU = "h200"  # the table a GPU without one of its own uses (see table_class)


def device_class(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        return "h100" if "h100" in name else "h200" if "h200" in name else "cuda"
    return "cpu"


@functools.lru_cache(maxsize=1)
def _stored_table() -> dict:
    try:
        with open(_TABLE_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _table() -> dict:
    table = {k: dict(v) for k, v in _stored_table().items()}
    for k, v in _OVERRIDES.items():
        table.setdefault(k[0], {})[k[1]] = v
    return table


def reload_table() -> None:
    """Re-read crossover.json (after a benchmark wrote a new one)."""
    _stored_table.cache_clear()
    _ROUTES.clear()
    EPOCH[0] += 1


def store_entries(entries: dict) -> str:
    """Fold measured entries {device class: {key: entry}} into crossover.json (written atomically,
    io.atomic_write_text) and route by the new table; returns the file's path."""
    try:
        with open(_TABLE_FILE) as f:
            table = json.load(f)
    except (OSError, ValueError):
        table = {}
    for cls, new in entries.items():
        table.setdefault(cls, {}).update(new)
    atomic_write_text(_TABLE_FILE, json.dumps(table, indent=2, sort_keys=True) + "\n")
    reload_table()
    return _TABLE_FILE


def set_crossover(device_cls: str, kind: str, max_batch: int, backend: Optional[str] = None,
                  dtype: Optional[torch.dtype] = None, min_sparsity: Optional[float] = None) -> None:
    """Use the sparse kernel of ``kind`` up to ``max_batch`` rows on ``device_cls`` (0: never),
    for weights of at least ``min_sparsity`` (None: any), for ``dtype`` only or (None) for every
    dtype without an entry of its own."""
    if min_sparsity is not None and not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    key = kind if dtype is None else table_key(kind, dtype)
    _OVERRIDES[(device_cls, key)] = {"max_batch": int(max_batch), "backend": backend, "min_sparsity": min_sparsity}
    _ROUTES.clear()
    EPOCH[0] += 1


def _sparse_backend(kind: str, device: torch.device) -> Optional[str]:
    name = registry.resolve("masked_linear", "auto", device, kind, order=registry.preference(device))
    return None if name == "reference" else name


def graph_route(name: str, kind: str, device: torch.device) -> str:
    """The route a call inside a compiled graph takes. On a GPU the graph may be captured by CUDA
    graphs (torch.compile mode='reduce-overhead'), which record raw pointers and allocate into
    their own pool: a cached dense weight would be read through a pointer that a persona switch
    later frees, or built inside that pool (inductor refuses it), and densifying afresh needs a
    host sync (illegal while capturing). So on a GPU the 'dense' route becomes the format's
    sparse kernel (bitmap: 0.94x cuBLAS at 50% on an H200 instead of 1.0x); elsewhere it stays."""
    if name != "dense" or device.type != "cuda":
        return name
    return _sparse_backend(kind, device) or name


def fallback_route(kind: str) -> str:
    """What runs where no sparse kernel does (or above the crossover): 'torch' (a GEMM on the
    compact / 2:4 weight) or 'dense' (a GEMM on the cached masked dense weight)."""
    return "torch" if kind in _TORCH_FALLBACK else "dense"


def table_key(kind: str, dtype: torch.dtype) -> str:
    """Key of a crossover entry measured at ``dtype`` ('bitmap:bfloat16'); an entry keyed by the
    bare kind applies to the dtypes without their own."""
    return f"{kind}:{str(dtype).removeprefix('torch.')}"


# torch.compile runs this at trace time and keeps the result as a constant (it imports kernel
# modules and reads files, which Dynamo cannot trace)
@torch.compiler.assume_constant_result
def _route(kind: str, device: torch.device, dtype: torch.dtype) -> tuple:
    fallback = fallback_route(kind)
    name = _sparse_backend(kind, device)
    entry = crossover_entry(kind, device, dtype)
    if entry is not None and entry.get("backend"):
        name = entry["backend"] if backends.available(entry["backend"], device) else name
    max_batch = entry["max_batch"] if entry is not None else 4
    min_sparsity = entry.get("min_sparsity") if entry is not None else None
    return name, max_batch, fallback, min_sparsity


def crossover_entry(kind: str, device: torch.device, dtype: torch.dtype) -> Optional[dict]:
    """The crossover entry (max_batch, backend, min_sparsity) that routes ``kind`` at ``dtype`` on
    ``device``: the dtype's own, else the bare kind's, else None. Kind 'dense' is the dense_linear
    op's (ops/dense_linear)."""
    used = table_class(device_class(device), device.type == "cuda")
    table = _table()[used] if used else {}
    return table.get(table_key(kind, dtype), table.get(kind))


def table_class(device_cls: str, is_gpu: bool) -> Optional[str]:
    """The crossover table a device class uses: its own, or for a GPU without one the nearest
    measured GPU's (the H200, the only one so far: the conservative rule was wrong there for
    every format but bitmap at batch 1 from 70%); None: no table, the conservative rule."""
    tables = _table()
    if tables.get(device_cls):
        return device_cls
    return NEAREST_MEASURED_GPU if is_gpu and tables.get(NEAREST_MEASURED_GPU) else None


def describe_table(device: torch.device) -> str:
    """One line for the env report: which crossover table routes masked_linear on ``device``."""
    cls = device_class(device)
    used = table_class(cls, device.type == "cuda")
    if used is None:
        return f"masked_linear crossover on {device.type} ({cls}): no measured table, sparse kernels up to batch 4"
    how = "measured here" if used == cls else f"none measured for {cls}: the {used} table"
    return f"masked_linear crossover on {device.type} ({cls}): {how} ({len(_table()[used])} entries, crossover.json)"


def choose(fmt: WeightFormat, x2: torch.Tensor, mixed: bool = False) -> str:
    """The backend for this call: a sparse kernel up to the crossover batch, else 'dense' (a GEMM
    on the cached masked dense weight) or 'torch' (compacted / 2:4).

    ``mixed``: the rows may carry different personas. Such a batch takes the sparse kernel at
    any size when one exists: the dense path would rebuild one masked weight per persona on
    every call (measured 1.8 s against 16 ms for a 4-persona batch of 4 on 14336x4096).
    """
    key = (fmt.kind, x2.device, x2.dtype)
    route = _ROUTES.get(key)
    if route is None:
        route = _ROUTES[key] = _route(fmt.kind, x2.device, x2.dtype)
    name, max_batch, fallback, min_sparsity = route
    if name is None or not (mixed or x2.shape[0] <= max_batch):
        return fallback
    if min_sparsity is not None and not mixed:
        known = fmt.known_sparsity()
        if known is not None and known < min_sparsity - 0.01:  # a row top-k rounds its keep count up
            return fallback
    return name

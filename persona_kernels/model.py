"""Drop-in persona inference: swap masked linear layers into a transformers model, and out again.

    handle = apply(model, masks, persona="extravert")   # module swap, returns a handle
    set_persona(model, "introvert")                      # O(1): no reload, no allocation
    with persona(model, "extravert"): model.generate(...)
    set_batch_personas(model, ["extravert", "introvert"])  # one persona per sequence
    apply_neurons(model, target_set, opposite_set, strength=1.0)  # NPTI induction
    apply_steering(model, vectors, layers=[20], strength=4.0)     # steering vectors, per persona
    remove(model)                                        # original modules back, bit for bit

The original modules are kept untouched inside the wrappers, so ``remove`` restores the exact
objects (and the state_dict) that were there, and persona ``None`` runs them directly.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from .bitpack import unpack_bits
from .fingerprint import check_fingerprint
from .formats import BitmapWeight, BlockSparseWeight, CompactedWeight, SharedBitmask
from .hf import (
    LayerFilter,
    activation_attr,
    check_supported,
    decoder_layers,
    gated_mlps,
    intermediate_size,
    is_output_head,
    is_plain_linear,
    linear_shape,
    linear_weight,
    output_head,
    set_module,
    sibling_groups,
    unwrap,
)
from .masks.store import MaskStore
from .moe import (
    EXPERT_PARAMS,
    expert_modules,
    experts_forward,
    experts_info,
    experts_layout,
    experts_of,
    parse_slot,
    slot_weight,
)
from .npti import INDUCTION_MODES, NeuronSet, induction_add, induction_plan
from .ops.dense_linear import dense_linear
from .ops.induce_neurons import ACTIVATIONS, induce_neurons
from .ops.masked_linear import bound_kernel, masked_linear
from .ops.masked_linear.dispatch import EPOCH as ROUTES_EPOCH
from .steering import SteeringVectors

FORMATS = ("auto", "bitmap", "shared_bitmask", "compacted", "block", "dense")
_ATTR = "_persona_kernels"


class PersonaError(ValueError):
    """Wrong use of the persona layer (applied twice, nothing applied, unknown persona...)."""


@dataclass
class PersonaHandle:
    """What apply() did to a model. ``current`` is shared by every swapped layer."""

    model: nn.Module
    personas: list
    current: Optional[int] = None            # None: the original dense model
    batch: Optional[torch.Tensor] = None     # [B] persona per sequence (mixed batch), overrides current
    gamma: float = 0.0
    swapped: dict = field(default_factory=dict)   # module name -> original module (masked layers)
    sped_up: dict = field(default_factory=dict)   # the same for modules swapped for speed only (DenseHead)
    neurons: dict = field(default_factory=dict)   # mlp name -> original activation module
    steering: dict = field(default_factory=dict)  # decoder-layer name -> forward-hook handle
    expert_neurons: dict = field(default_factory=dict)  # experts module name -> experts with NPTI induction
    steer_strength: float = 0.0
    format: str = "bitmap"

    @property
    def has_npti(self) -> bool:
        return bool(self.neurons or self.expert_neurons)

    def index(self, name: Optional[str]) -> Optional[int]:
        if name is None:
            return None
        if name not in self.personas:
            raise PersonaError(f"persona {name!r} is not applied to this model; it has {self.personas}")
        return self.personas.index(name)


def _handle(model: nn.Module) -> PersonaHandle:
    h = getattr(model, _ATTR, None)
    if h is None:
        raise PersonaError("no persona layer is applied to this model (call persona_kernels.apply first)")
    return h


def _build_format(kind: str, weight: torch.Tensor, masks: torch.Tensor, block: tuple):
    """Per-persona list (bitmap/compacted/dense) or one multi-persona format (shared_bitmask/block)."""
    if kind == "shared_bitmask":
        return SharedBitmask.from_dense(weight, masks)
    if kind == "block":
        return BlockSparseWeight.from_dense(weight, masks, block)
    if kind == "bitmap":
        return [BitmapWeight.from_dense(weight, m) for m in masks]
    if kind == "compacted":
        return [CompactedWeight.from_dense(weight, m) for m in masks]
    return [weight * m.to(weight.dtype) for m in masks]  # dense: pre-masked copies


def _strip_base(module, state_dict, prefix, local_metadata):
    """state_dict hook of the wrappers: the original's keys, not '<name>.base.<param>', so that
    save_pretrained of an applied model writes the original checkpoint unchanged."""
    for key in [k for k in state_dict if k.startswith(prefix + "base.")]:
        state_dict[prefix + key[len(prefix) + 5:]] = state_dict.pop(key)


def _add_base(base_keys, state_dict, prefix, *args):
    """load_state_dict pre-hook of the wrappers: the original's keys load into '<name>.base.<param>'."""
    for k in base_keys:
        if prefix + k in state_dict and prefix + "base." + k not in state_dict:
            state_dict[prefix + "base." + k] = state_dict.pop(prefix + k)


class _OriginalKeys(nn.Module):
    """Base of the persona wrappers: ``base`` is the original module, and state_dict() and
    load_state_dict() use its keys."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self._register_state_dict_hook(_strip_base)
        base_keys = [n for n, _ in self.base.named_parameters()] + [n for n, _ in self.base.named_buffers()]
        # a partial of a module-level function, not a closure: an applied model stays picklable (torch.save)
        self._register_load_state_dict_pre_hook(functools.partial(_add_base, tuple(base_keys)))


class _PersonaWeight:
    """One weight's persona formats: a per-persona list (bitmap / compacted / pre-masked dense
    copies) or one multi-persona format (shared_bitmask / block); called on x2 [N, in] with a
    persona index (or an int64 [N] tensor, one per row) it gives the masked product (no bias)."""

    def __init__(self, fmt, kind: str, backend: str, out_features: int):
        self._fmt, self._kind, self._backend, self.out_features = fmt, kind, backend, out_features
        self._maybe_cached: set = set()  # per-persona formats whose dense cache may be alive
        self._bound = None  # (key, kernel) of the last single-persona call (see _one)

    def __getstate__(self):  # a copy binds its own formats again (the kernel closes over these)
        return dict(self.__dict__, _bound=None)

    def _one(self, x2: torch.Tensor, p: int, exclusive: bool = True, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Masked output of persona ``p`` for a per-persona format list.

        A large batch makes the dispatcher cache persona p's dense masked weight. ``exclusive``
        (one persona per batch) frees the other personas' copies first, so a layer holds one
        such copy, not one per persona ever used; a mixed batch keeps those of its personas.
        """
        f = self._fmt[p]
        if isinstance(f, torch.Tensor):
            return torch.nn.functional.linear(x2, f, bias)
        cached = self._maybe_cached
        if p not in cached or len(cached) > 1:  # not the steady state of one persona decoding (no set built per call)
            if exclusive:
                for q in cached - {p}:
                    self._fmt[q].drop_dense_cache()
                cached &= {p}
            cached.add(p)
        if torch.compiler.is_compiling():
            return masked_linear(x2, f, bias, backend=self._backend)
        # the decode hot path: validation and routing once per (persona, rows, dtype, device, bias
        # presence, routing table); later calls go straight to the kernel
        key = (p, x2.shape[0], x2.dtype, x2.device, bias is None, ROUTES_EPOCH[0])
        bound = self._bound
        if bound is None or bound[0] != key:
            bound = self._bound = (key, bound_kernel(x2, f, bias, backend=self._backend))
        return bound[1](x2, bias)

    def __call__(self, x2: torch.Tensor, persona, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x2 [N, in]; persona an int (one persona, the decode hot path: no per-call index work)
        or an int64 [N] tensor (mixed batch) -> masked output [N, out] (+ bias, added by the
        kernel or the GEMM: no separate launch)."""
        if not isinstance(self._fmt, list):
            return masked_linear(x2, self._fmt, bias, persona=persona, backend=self._backend)
        if isinstance(persona, int):
            return self._one(x2, persona, bias=bias)
        out = torch.empty(x2.shape[0], self.out_features, dtype=x2.dtype, device=x2.device)
        for p in persona.unique().tolist():
            sel = persona == p
            out[sel] = self._one(x2[sel], p, exclusive=False, bias=bias)
        return out


class _FusedProjections:
    """Sibling projections that read the same input (q/k/v, gate/up) under one persona weight of
    their stacked rows. The first member called on an input runs one kernel call for all of them
    and keeps the others' columns; a member called next on that same tensor, persona and bias
    mode takes its columns without a call.

    Under torch.compile the first member (q, gate) runs the stacked call and leaves the output
    on the group; the others take their columns when it was made from the same traced input in
    this graph, and the last one clears it, so no tensor outlives the graph and every graph
    starts with nothing kept (a graph that calls a later member first runs the stacked call
    there)."""

    def __init__(self, weight: _PersonaWeight, widths: Sequence[int], bias: Optional[torch.Tensor]):
        self.weight, self.bias = weight, bias
        self.bounds = [0]
        for w in widths:
            self.bounds.append(self.bounds[-1] + w)
        self._source = None   # (weakref to the input, its version, persona, batch, bias mode)
        self._pending: dict = {}
        self._traced = None   # under torch.compile: (input, stacked output) of this graph

    def __getstate__(self):  # copies (deepcopy, pickle) start without the last input's columns
        return dict(self.__dict__, _source=None, _pending={}, _traced=None)

    def _columns(self, y: torch.Tensor, slot: int) -> torch.Tensor:
        return y[:, self.bounds[slot]:self.bounds[slot + 1]]

    def _compiled(self, slot: int, x: torch.Tensor, x2: torch.Tensor, persona, bias_on: bool) -> torch.Tensor:
        kept = self._traced
        if slot == 0 or kept is None or kept[0] is not x:
            kept = (x, self._stacked(x2, persona, bias_on))
        self._traced = None if slot == len(self.bounds) - 2 else kept
        return self._columns(kept[1], slot)

    def _stacked(self, x2: torch.Tensor, persona, bias_on: bool) -> torch.Tensor:
        return self.weight(x2, persona, self.bias if bias_on else None)

    def __call__(self, slot: int, x: torch.Tensor, x2: torch.Tensor, persona, h: "PersonaHandle",
                 bias_on: bool) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._compiled(slot, x, x2, persona, bias_on)
        version = None if x.is_inference() else x._version  # inference tensors keep no version counter
        src = self._source
        if (src is not None and slot in self._pending and src[0]() is x and src[1] == version and src[2] == h.current
                and src[3] is h.batch and src[4] == bias_on):
            return self._pending.pop(slot)
        y = self._stacked(x2, persona, bias_on)
        self._pending = {s: self._columns(y, s) for s in range(len(self.bounds) - 1) if s != slot}
        self._source = (weakref.ref(x), version, h.current, h.batch, bias_on)
        return self._columns(y, slot)


def _row_personas(h: "PersonaHandle", rows: int, device) -> object:
    """The persona of each of ``rows`` flattened rows: the current index, or in a mixed batch an
    int64 [rows] tensor (the rows in batch-major order: [B, ..., in] or flattened [B*T, in])."""
    if h.batch is None:
        return h.current
    B = h.batch.numel()
    if rows % B:
        raise PersonaError(f"set_batch_personas was given {B} personas but the batch has {rows} rows (not a multiple of {B})")
    return h.batch.to(device).repeat_interleave(rows // B)


class _WatchesWeights(_OriginalKeys):
    """Mixin of the masked wrappers, whose formats hold copies of the base's weights: an in-place
    edit of those weights after apply() is caught by the tensors' version counters. A copy
    (deepcopy, pickle) gets fresh tensors with new counters, so it carries whether an edit had
    happened, not the counters."""

    def _watched(self) -> tuple:
        raise NotImplementedError

    def _watch(self) -> None:
        # the tensors themselves are kept (a plain attribute): the forward's check then costs no
        # submodule lookups. model.to() swaps their data in place, so they stay the live weights.
        self._watched_tensors = self._watched()
        # inference tensors (a model built under torch.inference_mode) keep no version counter
        self._counted = tuple(t for t in self._watched_tensors if not t.is_inference())
        self._versions = tuple(t._version for t in self._counted)

    def _edited(self) -> bool:
        v = self._versions
        if v is not None and len(v) == 1:  # one watched weight (every linear wrapper): the hot path, no tuple built
            return v[0] != self._counted[0]._version
        return v != tuple(t._version for t in self._counted)

    def __getstate__(self):
        state = super().__getstate__()
        state["_versions"] = not self._edited()
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._watch()
        if state["_versions"] is not True:
            self._versions = None


class MaskedLinear(_WatchesWeights):
    """A persona-masked stand-in for nn.Linear / Conv1D; ``base`` is the untouched original."""

    _pk_wrapper = True

    def __init__(self, base: nn.Module, handle: PersonaHandle, fmt, kind: str, backend: str,
                 group: Optional[_FusedProjections] = None, slot: int = 0):
        super().__init__(base)
        self.out_features, self.in_features = linear_shape(base)
        self._handle, self._kind = handle, kind
        # a member of fused sibling projections shares the group's stacked weight (fmt is None)
        self._group, self._slot = group, slot
        self._weight = group.weight if group is not None else _PersonaWeight(fmt, kind, backend, self.out_features)
        self._bias = base.bias.detach() if getattr(base, "bias", None) is not None else None
        self._watch()

    def _watched(self) -> tuple:
        return (self.base.weight,)

    @property
    def _fmt(self):
        return self._weight._fmt

    def extra_repr(self) -> str:
        fused = f", fused={len(self._group.bounds) - 1}" if self._group is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self._kind}, "
                f"personas={len(self._handle.personas)}{fused}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._handle
        if h.batch is None and h.current is None:
            return self.base(x)
        if not torch.compiler.is_compiling() and self._edited():
            raise PersonaError("the weight of a masked layer was modified in place after apply() (load_state_dict, an "
                               "optimizer step, ...): its persona formats hold the old values. Call remove() and apply() "
                               "again to use the new weights")
        dev = self._watched_tensors[0].device  # the base weight, without a submodule lookup
        moved = x.device != dev  # e.g. accelerate's device_map hands a layer inputs from another GPU
        x2 = (x.to(dev) if moved else x).reshape(-1, self.in_features)
        if h.batch is not None:
            B = h.batch.numel()
            # [B, ..., in], or flattened tokens [B*T, in] in batch-major order (OPT's MLP, MoE shared experts)
            ok = x.ndim >= 2 and (x.shape[0] == B or (x.ndim == 2 and x.shape[0] % B == 0))
            if not ok:
                raise PersonaError(f"set_batch_personas was given {B} personas but the batch has "
                                   f"{x.shape[0] if x.ndim >= 2 else 1} sequences (or rows not a multiple of {B})")
        b = self._bias
        fused_bias = not h.gamma and (b is None or b.dtype == x2.dtype)  # added by the kernel / GEMM itself
        personas = h.current if h.batch is None else _row_personas(h, x2.shape[0], dev)
        if self._group is not None:
            y = self._group(self._slot, x, x2, personas, h, fused_bias)
        else:
            y = self._weight(x2, personas, b if fused_bias else None)
        if h.gamma:
            # soft gate G = M + gamma (1 - M): x (W*G)^T = (1 - gamma) x (W*M)^T + gamma x W^T
            dense = torch.nn.functional.linear(x2, linear_weight(self.base))
            y = (1 - h.gamma) * y + h.gamma * dense
        if b is not None and not fused_bias:
            y = y + b
        y = y.view(*x.shape[:-1], self.out_features)
        return y.to(x.device) if moved else y


class MaskedEmbedding(_OriginalKeys):
    """The input embedding of a model whose tied output head is masked, with the head's mask
    applied to the looked-up rows (``apply(..., tied_embedding='mask')``): what masking the shared
    weight in place, as the released Persona code does, gives. Rows are gathered, then masked
    with the persona's bits: no masked copy of the table is kept."""

    _pk_wrapper = True

    def __init__(self, base: nn.Module, handle: PersonaHandle, packed: torch.Tensor):
        super().__init__(base)
        self._handle, self._packed, self._dim = handle, packed, base.weight.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        h = self._handle
        if h.batch is None and h.current is None:
            return out
        packed = self._packed.to(ids.device)
        rows = packed[h.batch.to(ids.device).view(-1, *([1] * (ids.ndim - 1))).expand(ids.shape), ids] \
            if h.batch is not None else packed[h.current][ids]
        gate = unpack_bits(rows, self._dim).to(out.dtype)
        if h.gamma:
            gate = gate + h.gamma * (1 - gate)
        return out * gate


class DenseHead(_OriginalKeys):
    """The output head of a persona model when the store leaves it unmasked (``apply(...,
    dense_head=True)``): while a persona is active it runs the dense_linear op (on the CPU at
    decode batch sizes a GEMV at the memory bandwidth, where the vendor GEMV that F.linear
    reaches can be 3x slower; F.linear elsewhere). Same function, rounding aside; persona None
    runs the original module itself. It reads the original's weight at every call, so a tied
    or edited weight is always the current one."""

    _pk_wrapper = True

    def __init__(self, base: nn.Linear, handle: PersonaHandle):
        super().__init__(base)
        self._handle = handle

    @property
    def weight(self) -> torch.Tensor:  # code that reads lm_head.weight (tying, logit lens) sees the original's
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self._handle, self.base.weight
        if (h.batch is None and h.current is None) or x.dtype != w.dtype or torch.is_autocast_enabled(x.device.type):
            return self.base(x)  # persona None; or under autocast / mixed dtypes: F.linear's own casting rules
        if x.device != w.device:  # accelerate's device_map hands the head inputs from another GPU
            return dense_linear(x.to(w.device), w, self.base.bias).to(x.device)
        return dense_linear(x, w, self.base.bias)


def _dense_head(model: nn.Module, masked: Sequence[str]) -> Optional[str]:
    """Name of the output head if DenseHead can stand in for it: a plain nn.Linear with resident
    weights that the store does not mask (Conv1D heads hold their weight transposed)."""
    head = output_head(model)
    if head is None or type(head) is not nn.Linear or head.weight.device.type == "meta":
        return None  # Conv1D, a wrapper already, or offloaded (its weight arrives at forward time)
    name = next((n for n, m in model.named_modules() if m is head), None)
    return None if name is None or name in masked else name


TIED_EMBEDDING = ("keep", "mask")


def _tied_embedding(model: nn.Module, head_name: str) -> Optional[str]:
    """Name of the input embedding that shares its weight with the head ``head_name``, or None."""
    head = unwrap(model.get_submodule(head_name))
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or getattr(unwrap(emb), "weight", None) is not getattr(head, "weight", None):
        return None
    return next(n for n, m in model.named_modules() if m is emb)


def fusable_activation(act: nn.Module) -> Optional[str]:
    """The induce_neurons ``act`` that computes the same as the MLP's ``act`` module, or None.

    Recognised by class name, then confirmed on a probe tensor: a look-alike is not fused.
    """
    name = type(act).__name__
    kind = ("silu" if name in ("SiLU", "SiLUActivation") else
            "gelu_tanh" if name in ("GELUTanh", "PytorchGELUTanh", "GELUPytorchTanh") or
            (isinstance(act, nn.GELU) and act.approximate == "tanh") else None)
    if kind is None:
        return None
    probe = torch.linspace(-8.0, 8.0, 97)
    with torch.no_grad():
        same = torch.allclose(act(probe), ACTIVATIONS[kind](probe), rtol=1e-5, atol=1e-6)
    return kind if same else None


class _Induction:
    """One activation site's NPTI edit: the fixed plan (deactivated neurons, pushes) built once,
    the keep draw made per step; fused into the activation when ``act`` is one induce_neurons
    reproduces. Under torch.compile the draw uses the global RNG (seed it with
    torch.manual_seed), since a torch.Generator cannot be traced."""

    def __init__(self, act: nn.Module, target: NeuronSet, opposite: Optional[NeuronSet], site: str, neurons: int,
                 strength: float, keep_prob: float, generator: torch.Generator, backend: str, device, mode: str):
        self.deactivate, self.index, self.push = induction_plan(target, opposite, site, neurons, strength, device, mode)
        self.neurons, self.keep_prob, self.generator, self.backend = neurons, keep_prob, generator, backend
        self.fused = fusable_activation(act)

    def __call__(self, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """act(x) with the edit; ``x`` is the activation's input (the gate projection)."""
        compiling = torch.compiler.is_compiling()
        if not compiling and self.push.device != x.device:  # e.g. a layer moved after apply_neurons
            self.deactivate, self.index, self.push = (t.to(x.device) for t in (self.deactivate, self.index, self.push))
        add = induction_add(self.index, self.push, self.neurons, self.keep_prob, None if compiling else self.generator)
        if self.fused:
            return induce_neurons(x, self.deactivate, add, backend=self.backend, act=self.fused, validate=False)
        return induce_neurons(act(x), self.deactivate, add, backend=self.backend, validate=False)


class InducedActivation(_OriginalKeys):
    """The MLP's act_fn with NPTI induction fused in: one induce_neurons pass computes
    act(gate) and the edit together (activations it cannot fuse run first, then the edit)."""

    _pk_wrapper = True

    def __init__(self, base: nn.Module, target: NeuronSet, opposite: Optional[NeuronSet], site: str, neurons: int,
                 strength: float, keep_prob: float, generator: torch.Generator, backend: str, device="cpu",
                 mode: str = "package"):
        super().__init__(base)
        self._induction = _Induction(base, target, opposite, site, neurons, strength, keep_prob, generator, backend, device,
                                     mode)
        self.decode_only = mode == "npti-code"  # the released code edits decode steps only
        self._strength, self._aspect = strength, target.aspect
        self.enabled = True

    @property
    def fused(self) -> Optional[str]:
        return self._induction.fused

    def extra_repr(self) -> str:
        ind = self._induction
        return (f"npti target={self._aspect!r}, pushed={ind.index.numel()}/{ind.neurons}, strength={self._strength}, "
                f"keep_prob={ind.keep_prob}, fused={self.fused or 'no'}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or (self.decode_only and x.ndim >= 3 and x.shape[-2] != 1):
            return self.base(x)
        return self._induction(self.base, x)


class PersonaExperts(_WatchesWeights):
    """A fused-experts module (moe.py) under the persona layer: persona masks on its routed
    experts' projections (one _PersonaWeight per expert projection) and/or NPTI induction on
    their activations, computed through moe.experts_forward. In a mixed batch each token
    carries its sequence's persona."""

    _pk_wrapper = True

    def __init__(self, base: nn.Module, handle: PersonaHandle):
        super().__init__(base)
        self._handle = handle
        self.weights: dict = {}      # (param, expert) -> _PersonaWeight
        self.inductions: dict = {}   # expert -> _Induction
        self._watch()

    def _watched(self) -> tuple:
        return tuple(getattr(self.base, p) for p in EXPERT_PARAMS)

    def extra_repr(self) -> str:
        return f"masked expert projections={len(self.weights)}, induced experts={len(self.inductions)}"

    def forward(self, *args, **kwargs):
        h = self._handle
        masked = bool(self.weights) and not (h.batch is None and h.current is None)
        if not masked and not self.inductions:
            return self.base(*args, **kwargs)
        if masked and not torch.compiler.is_compiling() and self._edited():
            raise PersonaError("the expert weights of a masked layer were modified in place after apply(); its persona "
                               "formats hold the old values. Call remove() and apply() again")
        personas = {}

        def project(param, e, x, tok):
            pw = self.weights.get((param, e)) if masked else None
            w = slot_weight(self.base, param, e)
            if pw is None:
                return torch.nn.functional.linear(x, w)
            if h.batch is None:
                persona = h.current
            else:
                if "rows" not in personas:  # one persona per token: [N] from the sequences' personas
                    first = args[0] if args else next(iter(kwargs.values()))
                    personas["rows"] = _row_personas(h, self._tokens(first), x.device)
                persona = personas["rows"][tok]
            y = pw(x, persona)
            if h.gamma:
                y = (1 - h.gamma) * y + h.gamma * torch.nn.functional.linear(x, w)
            return y

        def activate(e, gate, tok):
            ind = self.inductions.get(e)
            return self.base.act_fn(gate) if ind is None else ind(self.base.act_fn, gate)

        return experts_forward(self.base, args, kwargs, project, activate)

    def _tokens(self, hidden: torch.Tensor) -> int:
        """Tokens in the batch: the rows of the routed layout's input, 1/E of the stacked layout's."""
        return hidden.shape[0] // (self.base.gate_up_proj.shape[0] if experts_layout(self.base) == "stacked" else 1)


def _resolve_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    return "bitmap" if fmt == "auto" else fmt


def _persona_masks(masks: MaskStore, name: str) -> torch.Tensor:
    """[personas, out, in] bool: every persona's mask of layer ``name``, in the store's order."""
    return torch.stack([masks.mask(p, name) for p in masks.personas])


def _fusable(members: Sequence[nn.Module]) -> bool:
    """Sibling projections can share a stacked weight: one input width, one weight dtype and
    device, resident weights, and biases on all (of one dtype) or none."""
    ws = [linear_weight(m) for m in members]
    bs = [getattr(unwrap(m), "bias", None) for m in members]
    return (len({w.shape[1] for w in ws}) == 1 and len({(w.dtype, w.device) for w in ws}) == 1
            and ws[0].device.type != "meta"
            and (all(b is None for b in bs) or (all(b is not None for b in bs) and len({b.dtype for b in bs}) == 1)))


def apply(model: nn.Module, masks: MaskStore, persona: Optional[str] = None, format: str = "auto",
          backend: str = "auto", layers: Optional[Sequence[str]] = None, gamma: float = 0.0,
          block: tuple = (16, 16), filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
          tied_embedding: str = "keep", fuse: bool = True, dense_head: bool = True) -> PersonaHandle:
    """Swap every masked linear layer of ``model`` (or the named ``layers``) for a MaskedLinear.

    ``persona``: the active persona (None: the original dense model until set_persona).
    ``format``: 'auto' (bitmap), 'bitmap', 'shared_bitmask', 'compacted', 'block' or 'dense'.
    ``gamma``: soft gate, G = M + gamma (1 - M).
    ``filter_fn``: ``filter_fn(module, name) -> bool`` keeps a masked layer (torchao's
    quantize_ convention); for name-based selection see hf.LayerFilter.
    ``tied_embedding``: when the store masks an output head that shares its weight with the
    input embedding: 'keep' (default: the embedding lookup stays unmasked) or 'mask' (the
    looked-up rows are masked too, as masking the shared weight in place does).
    ``fuse``: sibling projections that read the same input (q/k/v, gate/up) share one stacked
    persona weight, streamed by one kernel call per input (fewer calls per decode step; the
    same outputs), also under torch.compile.
    ``dense_head``: an output head the store leaves unmasked runs the dense_linear kernel while
    a persona is active (DenseHead: the same function; on SmolLM2's CPU decode step the head
    went from 7.1 to 2.3 ms of a 19 ms step). False keeps the original module.
    """
    if tied_embedding not in TIED_EMBEDDING:
        raise ValueError(f"tied_embedding must be one of {TIED_EMBEDDING}, got {tied_embedding!r}")
    if getattr(model, _ATTR, None) is not None:
        raise PersonaError("a persona layer is already applied to this model; call remove(model) first")
    if not isinstance(masks, MaskStore):
        raise TypeError(f"masks must be a MaskStore, got {type(masks).__name__}")
    check_supported(model)
    check_fingerprint(model, masks.fingerprint, "this mask store")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    names = list(masks.layers) if layers is None else list(layers)
    unknown = [n for n in names if n not in masks.shapes]
    if unknown:
        raise PersonaError(f"layers without masks in the store: {unknown[:5]}")
    modules = dict(model.named_modules())
    slots = {n: parse_slot(n) for n in names}
    slots = {n: sl for n, sl in slots.items() if sl is not None and experts_of(model, sl) is not None}
    for n, sl in slots.items():  # filter_fn sees an expert projection's experts module
        modules.setdefault(n, modules[sl.module])
    not_plain = [n for n in names if n in modules and n not in slots and not is_plain_linear(modules[n])]
    if not_plain:
        raise PersonaError(f"{not_plain[:3]}: not plain linear maps (a subclass of nn.Linear with its own forward, e.g. "
                           "a router returning a tuple); they cannot be swapped. Drop them from the mask store")
    if filter_fn is not None:
        names = LayerFilter(filter_fn=filter_fn).select(names, modules)
        if not names:
            raise PersonaError("filter_fn kept none of the masked layers")
    kind = _resolve_format(format)
    handle = PersonaHandle(model, list(masks.personas), gamma=gamma, format=kind)
    handle.current = handle.index(persona)
    built = {}
    if fuse and kind != "block":  # block tiles need each member's rows whole: not stacked
        for group in sibling_groups([n for n in names if n not in slots]):
            members = [modules[n] for n in group]
            if _fusable(members):
                w = torch.cat([linear_weight(m).detach() for m in members])
                stacked = torch.cat([_persona_masks(masks, n) for n in group], -2)
                bias = torch.cat([m.bias.detach() for m in members]) if members[0].bias is not None else None
                fused = _FusedProjections(_PersonaWeight(_build_format(kind, w.contiguous(), stacked.to(w.device), block),
                                                         kind, backend, w.shape[0]),
                                          [linear_shape(m)[0] for m in members], bias)
                for slot, (n, m) in enumerate(zip(group, members)):
                    built[n] = MaskedLinear(m, handle, None, kind, backend, group=fused, slot=slot)
    for name in names:  # build everything first: a failure leaves the model unchanged
        if name in built:
            continue
        slot = slots.get(name)
        base = modules[slot.module] if slot else modules[name]
        w = (slot_weight(base, slot.param, slot.expert) if slot else linear_weight(base)).detach()
        if w.device.type == "meta":
            raise PersonaError(f"{name}: its weights are offloaded (on the meta device, loaded only at forward time by "
                               "accelerate); persona formats are built from resident weights. Load the model without "
                               "CPU/disk offload: a device_map over GPUs only, or device_map='cpu'")
        stacked = _persona_masks(masks, name).to(w.device)
        fmt = _build_format(kind, w.contiguous(), stacked, block)
        if slot:  # one routed expert's projection: a weight of the experts module's wrapper
            experts = built.setdefault(slot.module, PersonaExperts(base, handle))
            experts.weights[(slot.param, slot.expert)] = _PersonaWeight(fmt, kind, backend, w.shape[0])
            continue
        built[name] = MaskedLinear(base, handle, fmt, kind, backend)
        emb = _tied_embedding(model, name) if tied_embedding == "mask" and is_output_head(model, name, base) else None
        if emb is not None:
            built[emb] = MaskedEmbedding(modules[emb], handle, masks.packed[name].to(w.device))
    head = _dense_head(model, names) if dense_head else None
    for name, wrapper in [*built.items(), *([(head, DenseHead(modules[head], handle))] if head else [])]:
        (handle.sped_up if name == head else handle.swapped)[name] = wrapper.base
        set_module(model, name, wrapper)
    setattr(model, _ATTR, handle)
    return handle


def apply_neurons(model: nn.Module, target: NeuronSet, opposite: Optional[NeuronSet] = None, strength: float = 1.0,
                  keep_prob: float = 0.9, seed: int = 0, backend: str = "auto", mode: str = "package") -> PersonaHandle:
    """NPTI induction at every gated MLP of ``target``'s sites (combinable with apply()).

    ``mode='package'`` (default): every forward is edited (prompt included), the opposite
    neurons are deactivated at every site, a neuron in both sets is only pushed.
    ``'npti-code'``: the released code's induction: only decode steps (forwards of one new
    token: not the prompt, not the first generated token), a layer without a target neuron is
    left alone (its opposite neurons too), a neuron in both sets is clamped, then pushed.
    """
    if mode not in INDUCTION_MODES:
        raise ValueError(f"unknown induction mode {mode!r}; choose one of {INDUCTION_MODES}")
    mlps = dict(gated_mlps(model))
    if not mlps and not expert_modules(model):
        raise PersonaError(f"NPTI is not applicable to {type(model).__name__}: it has no gated MLP "
                           "(act_fn(gate_proj(x)) * up_proj(x)); supported: Llama, Mistral, Qwen2/3, Gemma2, Phi-3, "
                           "and the routed experts of MoE models")
    check_fingerprint(model, target.fingerprint, "this neuron set")
    handle = getattr(model, _ATTR, None)
    if handle is not None and handle.has_npti:
        raise PersonaError("NPTI induction is already applied; remove(model) first")
    if not 0.0 <= keep_prob <= 1.0:
        raise ValueError(f"keep_prob must be in [0, 1], got {keep_prob}")
    gen = torch.Generator().manual_seed(seed)
    built, experts = {}, {}
    for site in target.sites:
        if mode == "npti-code" and not target.at(site)[0].numel():
            continue
        slot = parse_slot(site)
        if slot is not None and slot.param == "act_fn" and experts_of(model, slot) is not None:
            if mode == "npti-code":
                raise PersonaError(f"{site}: mode='npti-code' reproduces the released NPTI code, which has no "
                                   "mixture-of-experts layers; use mode='package' for routed experts")
            base = experts_of(model, slot)
            experts.setdefault(slot.module, {})[slot.expert] = _Induction(
                base.act_fn, target, opposite, site, experts_info(base).intermediate, strength, keep_prob, gen, backend,
                base.down_proj.device, mode)
            continue
        mlp_name = site.rpartition(".")[0]
        mlp = mlps.get(mlp_name)
        if mlp is None:
            raise PersonaError(f"{site} is not a gated MLP activation of this model")
        attr = activation_attr(mlp)
        neurons = intermediate_size(mlp)
        device = linear_weight(mlp.down_proj).device
        built[mlp_name] = (attr, InducedActivation(getattr(mlp, attr), target, opposite, site, neurons, strength, keep_prob,
                                                   gen, backend, "cpu" if device.type == "meta" else device, mode))
    if handle is None:
        handle = PersonaHandle(model, [])
        setattr(model, _ATTR, handle)
    for mlp_name, (attr, wrapper) in built.items():  # everything built first: a failure changes nothing
        mlp = mlps[mlp_name]
        handle.neurons[mlp_name] = getattr(mlp, attr)
        setattr(mlp, attr, wrapper)
    for name, inductions in experts.items():
        wrapper = model.get_submodule(name)
        if not isinstance(wrapper, PersonaExperts):  # no masks there: a wrapper for the induction alone
            wrapper = PersonaExperts(wrapper, handle)
            handle.swapped[name] = wrapper.base
            set_module(model, name, wrapper)
        wrapper.inductions.update(inductions)
        handle.expert_neurons[name] = sorted(inductions)
    return handle


class _SteeringHook:
    """Forward hook of one decoder layer: adds strength * v[persona] to its output, the residual
    stream (one vector per sequence in a mixed batch; nothing with persona None). The table holds
    a row per persona of the handle, in the layer's dtype and device."""

    def __init__(self, handle: PersonaHandle, table: torch.Tensor):
        self.handle, self.table = handle, table

    def __call__(self, module, args, out):
        h = self.handle
        if (h.batch is None and h.current is None) or not h.steer_strength:
            return None
        hidden = out[0] if isinstance(out, tuple) else out
        if h.batch is not None:
            if hidden.shape[0] != h.batch.numel():
                raise PersonaError(f"set_batch_personas was given {h.batch.numel()} personas but the batch has "
                                   f"{hidden.shape[0]} sequences")
            add = self.table.index_select(0, h.batch.to(self.table.device)).view(-1, *([1] * (hidden.ndim - 2)),
                                                                                 self.table.shape[1])
        else:
            add = self.table[h.current]
        hidden = hidden + h.steer_strength * add.to(hidden.device)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


def apply_steering(model: nn.Module, vectors: SteeringVectors, layers: Optional[Sequence] = None, strength: float = 1.0,
                   persona: Optional[str] = None) -> PersonaHandle:
    """Add ``strength * v[persona]`` to the output of the given decoder layers (indices or names;
    None: every layer of ``vectors``), switched with the persona like a mask (set_persona,
    set_batch_personas, unmodified) and combinable with apply() and apply_neurons() (in that
    order). On a model with masks, personas without a vector get none; ``remove`` takes the
    hooks out (no weight is touched)."""
    if not isinstance(vectors, SteeringVectors):
        raise TypeError(f"vectors must be SteeringVectors, got {type(vectors).__name__}")
    check_fingerprint(model, vectors.fingerprint, "these steering vectors")
    handle = getattr(model, _ATTR, None)
    if handle is not None and handle.steering:
        raise PersonaError("steering vectors are already applied; remove(model) first")
    names = vectors.select(layers)
    modules = dict(decoder_layers(model))
    missing = [n for n in names if n not in modules]
    if missing:
        raise PersonaError(f"{missing[0]} is not a decoder layer of this model")
    personas = handle.personas if handle is not None and handle.personas else list(vectors.personas)
    foreign = [p for p in vectors.personas if p not in personas]
    if foreign:
        raise PersonaError(f"steering persona {foreign[0]!r} is not among the applied personas {personas}")
    strength = float(strength)
    if persona is not None and persona not in personas:
        raise PersonaError(f"persona {persona!r} is not applied to this model; it has {personas}")
    tables = {}
    for name in names:  # built first: a failure changes nothing
        ref = next(modules[name].parameters())
        table = torch.zeros(len(personas), vectors.vectors[name].shape[1])
        for k, p in enumerate(vectors.personas):
            table[personas.index(p)] = vectors.vectors[name][k]
        tables[name] = table.to(device="cpu" if ref.device.type == "meta" else ref.device, dtype=ref.dtype)
    if handle is None:
        handle = PersonaHandle(model, personas)
        setattr(model, _ATTR, handle)
    handle.personas = personas
    handle.steer_strength = strength
    for name, table in tables.items():
        handle.steering[name] = modules[name].register_forward_hook(_SteeringHook(handle, table))
    if persona is not None:
        handle.current = handle.index(persona)
    return handle


def set_steering_strength(model: nn.Module, strength: float) -> None:
    """Scale of the applied steering vectors (0: off). Constant time."""
    h = _handle(model)
    if not h.steering:
        raise PersonaError("no steering vectors are applied to this model (apply_steering first)")
    h.steer_strength = float(strength)


def remove(model: nn.Module) -> None:
    """Put every original module back (the state_dict is then bit-for-bit the original)."""
    h = _handle(model)
    for hook in h.steering.values():
        hook.remove()
    replaced = []
    for name, base in [*h.swapped.items(), *h.sped_up.items()]:
        if _ours(model, name, base):
            set_module(model, name, base)
        else:  # the user put another module there: keep it, never overwrite it with the original
            replaced.append(name)
    for mlp_name, act in h.neurons.items():
        mlp = model.get_submodule(mlp_name)
        attr = activation_attr(mlp)
        if _ours(model, f"{mlp_name}.{attr}", act):
            setattr(mlp, attr, act)
        else:
            replaced.append(f"{mlp_name}.{attr}")
    delattr(model, _ATTR)
    if replaced:
        warnings.warn(f"remove(): {len(replaced)} persona layer(s) had been replaced by other modules since apply() "
                      f"(first: {replaced[0]}); those modules were kept, not the originals", stacklevel=2)


def _ours(model: nn.Module, name: str, original: nn.Module) -> bool:
    """The module at ``name`` is still the persona wrapper around ``original``."""
    try:
        current = model.get_submodule(name)
    except AttributeError:
        return False
    return bool(getattr(current, "_pk_wrapper", False)) and current.base is original


def set_persona(model: nn.Module, name: Optional[str]) -> None:
    """Activate a persona (None: the original dense model). Constant time: nothing is rebuilt."""
    h = _handle(model)
    h.current = h.index(name)
    h.batch = None


def set_gamma(model: nn.Module, gamma: float) -> None:
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    _handle(model).gamma = float(gamma)


def set_batch_personas(model: nn.Module, names: Optional[Sequence[str]]) -> None:
    """One persona per sequence of the next batches (None: back to the single current persona)."""
    h = _handle(model)
    if names is None:
        h.batch = None
        return
    idx = [h.index(n) for n in names]
    if any(i is None for i in idx):
        raise PersonaError("mixed batches need a persona for every sequence (None is not allowed here)")
    h.batch = torch.tensor(idx, dtype=torch.int64)


@contextlib.contextmanager
def persona(model: nn.Module, name: Optional[str]):
    """Temporarily activate a persona."""
    h = _handle(model)
    before = (h.current, h.batch)
    set_persona(model, name)
    try:
        yield model
    finally:
        h.current, h.batch = before


@contextlib.contextmanager
def unmodified(model: nn.Module):
    """Temporarily run the original model: persona None and NPTI induction off (the baseline of an
    evaluation on the same items, without removing anything)."""
    h = _handle(model)
    before = (h.current, h.batch)
    acts = [m for m in model.modules() if isinstance(m, InducedActivation)]
    enabled = [m.enabled for m in acts]
    h.current, h.batch = None, None
    for m in acts:
        m.enabled = False
    try:
        yield model
    finally:
        h.current, h.batch = before
        for m, e in zip(acts, enabled):
            m.enabled = e


def is_applied(model: nn.Module) -> bool:
    return getattr(model, _ATTR, None) is not None


__all__ = ["InducedActivation", "MaskedLinear", "fusable_activation", "PersonaError", "PersonaHandle", "apply", "apply_neurons",
           "apply_steering", "is_applied", "persona", "remove", "set_batch_personas", "set_gamma", "set_persona",
           "set_steering_strength", "unmodified"]

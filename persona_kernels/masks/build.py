"""Build persona masks for a whole model from calibration statistics."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..calibrate import CalibrationResult
from ..fingerprint import check_fingerprint
from ..hf import LayerFilter, linear_weight, named_weight, output_head  # noqa: F401 (linear_weight: re-exported)
from . import methods
from .store import MaskStore

METHODS = ("wanda", "contrastive_wanda", "contrastive_sparse", "contrastive_sparse_code", "random", "magnitude")
CONTROLS = ("random", "magnitude")  # same sparsity and layers as a persona mask, no persona in them
STATISTICS = ("sample_norm", "token_norm")
MODES = ("prune", "difference")
LAYER_SETS = ("all", "first_third", "middle_third", "last_third", "first_half", "last_half")


def layer_range(num_layers: int, name: str) -> Optional[list]:
    """Decoder-layer indices of a named set ('all' -> None, 'last_third', 'middle_third', ...)."""
    if name not in LAYER_SETS:
        raise ValueError(f"unknown layer set {name!r}; choose one of {LAYER_SETS}")
    if name == "all":
        return None
    part, _, frac = name.partition("_")
    k = 3 if frac == "third" else 2
    bounds = [round(num_layers * i / k) for i in range(k + 1)]
    i = {"first": 0, "middle": 1, "last": k - 1}[part]
    return list(range(bounds[i], bounds[i + 1]))


@dataclass
class MaskConfig:
    """How to build masks.

    method:      'wanda' (one mask per persona), 'contrastive_wanda', 'contrastive_sparse' or
                 'contrastive_sparse_code' (the released code's algorithm; two opposing personas,
                 given as (positive, negative)); the controls 'random'
                 (seeded, a different mask per persona) and 'magnitude' (|W| only, the same for
                 every persona) at the same sparsity and layer set.
    sparsity:    fraction of weights removed, in [0, 1) (N:M fixes it at 1 - N/M).
    granularity: 'row' (top-k per output row, default), 'layer' or 'nm'.
    statistic:   A for Wanda scores: 'sample_norm' (mean over samples of the per-sample L2
                 norm, the paper's default) or 'token_norm' (Wanda's sqrt(sum_t x_tj^2)).
    contrast, tau: g in Contrastive-Wanda: 'relu' or 'softplus' (softplus(z / tau)).
    tie_break:   Contrastive-Wanda's ties (most of a row under relu on real models): 'wanda'
                 (the persona's own Wanda score, then the column; default) or 'column' (the
                 parity mode with the released code's k = max(1, int(in (1 - s)))).
    mlp_only, layers, include, exclude: which linear layers get masks (default all that
                 were calibrated, i.e. every linear layer but the LM head); ``layers`` takes
                 decoder-layer indices (``layer_range(num_layers, "last_third")`` names common sets).
    layer_sparsity: {decoder-layer index: sparsity} overriding ``sparsity`` at those layers.
    include_head: also mask the output head (calibrated with include_head=True), as the released
                 Persona code does; off by default. With tied input/output embeddings the
                 persona layer masks the head's product only (apply's ``tied_embedding``).
    mode:        'prune' (default: each persona keeps its own selection) or 'difference' (two
                 personas: start from the unmasked model and remove only the weights that this
                 persona drops and the other keeps, so the persona is a small edit, not a pruning).
    """

    method: str = "wanda"
    sparsity: float = 0.5
    granularity: str = "row"
    n: int = 2
    m: int = 4
    statistic: str = "sample_norm"
    contrast: str = "relu"
    tau: float = 2.0
    mlp_only: bool = False
    layers: Optional[list] = None
    include: Optional[str] = None
    exclude: Optional[str] = None
    backend: str = "auto"
    seed: int = 0
    tie_break: str = "wanda"
    layer_sparsity: Optional[dict] = None
    mode: str = "prune"
    include_head: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown mask method {self.method!r}; choose one of {METHODS}")
        methods.check_sparsity(self.sparsity)
        if self.granularity not in methods.GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; choose one of {methods.GRANULARITIES}")
        if self.statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {self.statistic!r}; choose one of {STATISTICS}")
        if self.tie_break not in methods.TIE_BREAKS:
            raise ValueError(f"unknown tie_break {self.tie_break!r}; choose one of {methods.TIE_BREAKS}")
        if self.contrast not in ("relu", "softplus"):
            raise ValueError(f"unknown contrast {self.contrast!r}; use 'relu' or 'softplus'")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {MODES}")
        if self.layer_sparsity is not None:
            self.layer_sparsity = {int(k): float(v) for k, v in dict(self.layer_sparsity).items()}
            for v in self.layer_sparsity.values():
                methods.check_sparsity(v)
        if self.method.startswith("contrastive_sparse") and self.granularity != "row":
            raise ValueError("contrastive_sparse selects per row; granularity must be 'row'")


def _layers(model: nn.Module, calib: CalibrationResult, cfg: MaskConfig) -> list[str]:
    head = output_head(model)
    heads = [n for n, s in calib.sites.items() if s.kind == "linear" and s.expert is None and head is not None and
             model.get_submodule(n) is head]
    names = [n for n, s in calib.sites.items() if s.kind == "linear" and n not in heads]
    names = LayerFilter(cfg.layers, cfg.mlp_only, cfg.include, cfg.exclude).select(names)
    if cfg.include_head:
        if not heads:
            raise ValueError("include_head=True, but the statistics hold no output-head site; calibrate with "
                             "include_head=True (--include-head)")
        names += heads
    if not names:
        raise ValueError("no calibrated linear layers match the mask configuration")
    return names


def _act(st, i: int, statistic: str) -> torch.Tensor:
    return st.sample_norm_mean()[i] if statistic == "sample_norm" else st.wanda_norm()[i]


@torch.no_grad()
def build_masks(model: nn.Module, calib: CalibrationResult, personas: Optional[Sequence[str]] = None,
                config: Optional[MaskConfig] = None, **overrides) -> MaskStore:
    """Masks for ``personas`` (default: all calibrated; two, (positive, negative), for contrastive methods)."""
    cfg = config or MaskConfig()
    if overrides:
        cfg = MaskConfig(**{**asdict(cfg), **overrides})
    check_fingerprint(model, calib.fingerprint, "the calibration statistics")
    personas = list(personas) if personas is not None else list(calib.personas)
    idx = [calib.persona_index(p) for p in personas]
    if cfg.method not in ("wanda",) + CONTROLS and len(personas) != 2:
        raise ValueError(f"{cfg.method} needs exactly two opposing personas (positive, negative), got {personas}")
    if cfg.mode == "difference" and len(personas) != 2:
        raise ValueError(f"mode 'difference' needs exactly two personas, got {personas}")
    out = {p: {} for p in personas}
    for layer in _layers(model, calib, cfg):
        st = calib.stats[layer]
        w = named_weight(model, layer)
        if not bool(torch.isfinite(w).all()):  # else the top-k fails later without naming the layer
            raise ValueError(f"{layer}: its weight holds NaN or Inf values; no mask can be scored from it (a broken "
                             "checkpoint, or weights edited after loading)")
        sparsity = (cfg.layer_sparsity or {}).get(calib.sites[layer].layer, cfg.sparsity)
        sel = dict(sparsity=sparsity, granularity=cfg.granularity, n=cfg.n, m=cfg.m, backend=cfg.backend)
        # a routed expert that saw none of a persona's tokens has no activation to score by: |W| alone
        unseen = [int(st.samples[i]) == 0 for i in idx]
        if cfg.method == "wanda":
            for p, i, u in zip(personas, idx, unseen):
                out[p][layer] = (methods.magnitude_mask(w, **sel) if u else
                                 methods.wanda_mask(w, _act(st, i, cfg.statistic), **sel)).cpu()
            continue
        if cfg.method not in CONTROLS and any(unseen):
            for p in personas:
                out[p][layer] = methods.magnitude_mask(w, **sel).cpu()
            continue
        if cfg.method == "magnitude":
            mask = methods.magnitude_mask(w, **sel).cpu()
            for p in personas:
                out[p][layer] = mask
            continue
        if cfg.method == "random":
            for k, p in enumerate(personas):
                seed = cfg.seed * 1_000_003 + k * 7919 + sum(map(ord, layer))
                out[p][layer] = methods.random_mask(w, **sel, seed=seed).cpu()
            continue
        i, j = idx
        if cfg.method == "contrastive_wanda":
            pos, neg = methods.contrastive_wanda_masks(
                w, st.sample_norm_mean()[i], st.sample_norm_var()[i], st.sample_norm_mean()[j], st.sample_norm_var()[j],
                contrast=cfg.contrast, tau=cfg.tau, tie_break=cfg.tie_break,
                act_pos=_act(st, i, cfg.statistic), act_neg=_act(st, j, cfg.statistic), **sel)
        elif cfg.method == "contrastive_sparse_code":
            pos, neg = methods.contrastive_sparse_code_masks(w, st.mean[i], st.var()[i], st.mean[j], st.var()[j],
                                                             sparsity, cfg.backend)
        else:
            pos, neg = methods.contrastive_sparse_masks(w, _act(st, i, cfg.statistic), _act(st, j, cfg.statistic),
                                                        sparsity, cfg.backend)
        out[personas[0]][layer], out[personas[1]][layer] = pos.cpu(), neg.cpu()
    if cfg.mode == "difference":
        a, b = personas
        for layer in out[a]:  # removed only where this persona drops a weight the other keeps
            ka, kb = out[a][layer], out[b][layer]
            out[a][layer], out[b][layer] = ka | ~kb, kb | ~ka
    return MaskStore.from_masks(model, out, cfg.method, asdict(cfg))

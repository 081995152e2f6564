"""NPTI (Neuron-based Personality Trait Induction, arXiv 2410.12327): find the MLP neurons of a
trait's two poles, and the induction vectors.

Identification uses the statistics of the gated-MLP activation sites ('act') of a
CalibrationResult: firing probability P = #(a > 0) / #tokens and the 95th percentile of a from
the histogram. diff = P_target - P_opposite; every neuron with diff >= threshold is kept, and at
least the top ``min_neurons`` by diff (capped by the model's neuron count). Ranking ties go to
the earlier layer, then the lower neuron index.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from .calibrate import CalibrationResult
from .fingerprint import check_fingerprint
from .io import load_artifact, save_artifact

KIND = "neurons"


@dataclass
class NeuronSet:
    """The neurons of one aspect (target pole) against its opposite, over a model's MLP sites."""

    aspect: str
    opposite: str
    sites: list                  # act-site names, in model order
    site: torch.Tensor           # [N] int64 index into ``sites``
    index: torch.Tensor          # [N] int64 neuron index within the site
    diff: torch.Tensor           # [N] f64 P_aspect - P_opposite
    p_aspect: torch.Tensor       # [N] f64
    p_opposite: torch.Tensor     # [N] f64
    p95: torch.Tensor            # [N] f64 95th percentile of the activation under the aspect
    fingerprint: str
    architecture: str
    params: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.index.numel()

    def at(self, site: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(neuron indices, diff, p95) of this set at one act site."""
        if site not in self.sites:
            raise KeyError(f"{site!r} is not an MLP activation site of this neuron set")
        sel = self.site == self.sites.index(site)
        return self.index[sel], self.diff[sel], self.p95[sel]

    def per_layer_counts(self) -> dict:
        return {s: int((self.site == i).sum()) for i, s in enumerate(self.sites)}

    def tensors(self) -> dict:
        return {k: getattr(self, k) for k in ("site", "index", "diff", "p_aspect", "p_opposite", "p95")}

    def save(self, path) -> str:
        meta = {"aspect": self.aspect, "opposite": self.opposite, "sites": self.sites, "fingerprint": self.fingerprint,
                "architecture": self.architecture, "params": self.params}
        return save_artifact(path, self.tensors(), KIND, meta)

    @classmethod
    def load(cls, path, model: Optional[nn.Module] = None) -> "NeuronSet":
        tensors, meta = load_artifact(path, KIND)
        if model is not None:
            check_fingerprint(model, meta["fingerprint"], f"neuron file {path}")
        need = ("site", "index", "diff", "p_aspect", "p_opposite", "p95")
        if any(k not in tensors for k in need) or len({tensors[k].numel() for k in need}) != 1:
            raise ValueError(f"{path}: neuron set tensors are missing or of different lengths")
        return cls(meta["aspect"], meta["opposite"], list(meta["sites"]), **{k: tensors[k] for k in need},
                   fingerprint=meta["fingerprint"], architecture=meta["architecture"], params=meta.get("params", {}))


IDENTIFY_MODES = ("package", "npti-code")


def identify_neurons(calib: CalibrationResult, aspect: str, opposite: str, threshold: float = 0.1,
                     min_neurons: int = 2000, percentile_method: str = "reference", mode: str = "package") -> NeuronSet:
    """Neurons that fire more under ``aspect`` than under ``opposite`` (NPTI identification).

    ``mode='package'``: diff in float64, a stable sort (ties in model order) and a 1e-12 slack at
    the threshold, so a count difference of exactly the threshold is kept. ``'npti-code'``: the
    released code's cut (search_neuron.py): diff in float32, an unstable descending sort, the first
    max(min_neurons, #(diff >= threshold)); with it use ``percentile_method='npti-code'`` and
    statistics calibrated on ``npti_reference_edges()`` for the released p95.
    """
    if mode not in IDENTIFY_MODES:
        raise ValueError(f"unknown identification mode {mode!r}; choose one of {IDENTIFY_MODES}")
    if aspect == opposite:
        raise ValueError("aspect and opposite must be different personas")
    i, j = calib.persona_index(aspect), calib.persona_index(opposite)
    if not isinstance(min_neurons, int) or min_neurons < 0:
        raise ValueError(f"min_neurons must be a non-negative int, got {min_neurons!r}")
    sites = [n for n, s in calib.sites.items() if s.kind == "act"]
    if not sites:
        raise ValueError(f"NPTI is not applicable: the statistics hold no gated-MLP activation sites "
                         f"({calib.architecture} has no gated MLP, or calibration excluded kind 'act')")
    site_idx, index, diff, pa, po, p95 = [], [], [], [], [], []
    for k, name in enumerate(sites):
        st = calib.stats[name]
        if st.hist is None:
            raise ValueError(f"site {name} has no histogram; calibrate with histogram_kinds including 'act'")
        if int(st.count[i]) == 0 or int(st.count[j]) == 0:
            raise ValueError(f"site {name}: persona {aspect if int(st.count[i]) == 0 else opposite!r} has no tokens")
        p_a, p_o = st.firing_prob()[i], st.firing_prob()[j]
        site_idx.append(torch.full_like(p_a, k, dtype=torch.int64))
        index.append(torch.arange(p_a.numel()))
        diff.append(p_a - p_o)
        pa.append(p_a)
        po.append(p_o)
        p95.append(st.percentile(95, percentile_method)[i])
    site_t, index_t, diff_t = torch.cat(site_idx), torch.cat(index), torch.cat(diff)
    if mode == "npti-code":
        d32 = torch.cat([p.float() for p in pa]) - torch.cat([p.float() for p in po])
        order = torch.sort(d32, descending=True).indices
        n_keep = min(max(min_neurons, int((d32 >= threshold).sum())), d32.numel())
        diff_t = d32.double()
    else:
        # stable sort: ties keep model order (earlier site, lower neuron index)
        order = torch.sort(diff_t, descending=True, stable=True).indices
        # 1e-12 slack: a count difference of exactly the threshold must not be lost to rounding
        n_keep = max(int((diff_t >= threshold - 1e-12).sum()), min(min_neurons, diff_t.numel()))
    keep = order[:n_keep]
    keep = keep[torch.argsort(site_t[keep] * diff_t.numel() + index_t[keep])]  # back to model order
    return NeuronSet(aspect, opposite, sites, site_t[keep], index_t[keep], diff_t[keep], torch.cat(pa)[keep],
                     torch.cat(po)[keep], torch.cat(p95)[keep], calib.fingerprint, calib.architecture,
                     {"threshold": threshold, "min_neurons": min_neurons, "percentile_method": percentile_method,
                      "mode": mode})


def push_strength(diff: torch.Tensor, p95: torch.Tensor, strength: float) -> torch.Tensor:
    """p95 * val * sigmoid(10 * (diff - 0.15)); a p95 at or below 0 (rarely firing) pushes nothing."""
    return p95.clamp(min=0.0).nan_to_num(0.0) * strength * torch.sigmoid(10.0 * (diff - 0.15))


INDUCTION_MODES = ("package", "npti-code")


def induction_plan(target: NeuronSet, opposite: Optional[NeuronSet], site: str, num_neurons: int,
                   strength: float = 1.0, device="cpu", mode: str = "package") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed part of the induction at one act site: (deactivate [I] bool, target index [n]
    int64, push [n] float32). Each step then keeps every target neuron with some probability
    (induction_add). A neuron in both sets is treated as a target neuron (``mode='package'``),
    or clamped and then pushed as the released code does (``'npti-code'``)."""
    if mode not in INDUCTION_MODES:
        raise ValueError(f"unknown induction mode {mode!r}; choose one of {INDUCTION_MODES}")
    if not 0.0 <= strength:
        raise ValueError(f"strength must be >= 0, got {strength}")
    idx, diff, p95 = target.at(site)
    if idx.numel() and int(idx.max()) >= num_neurons:
        raise ValueError(f"neuron index {int(idx.max())} out of range for a site of {num_neurons} neurons")
    deactivate = torch.zeros(num_neurons, dtype=torch.bool)
    if opposite is not None:
        deactivate[opposite.at(site)[0]] = True
    if mode == "package":
        deactivate[idx] = False
    push = push_strength(diff, p95, strength).float()
    if not bool(torch.isfinite(push).all()):  # checked once here: the per-step op skips the check
        raise ValueError(f"{site}: the neuron set's push (p95, diff) holds NaN or Inf values (an edited or corrupt file?)")
    return deactivate.to(device), idx.to(device), push.to(device)


def induction_add(index: torch.Tensor, push: torch.Tensor, num_neurons: int, keep_prob: float,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """add [I] float32 for one step: push[j] at index[j] for the neurons drawn to be kept.

    The draw is ``torch.rand(n, generator=generator) < keep_prob`` on the CPU (seeded, the same
    stream on every device). Without a generator it is drawn on ``push``'s device from the
    global generator: what torch.compile traces (it cannot trace a torch.Generator).
    """
    if not 0.0 <= keep_prob <= 1.0:
        raise ValueError(f"keep_prob must be in [0, 1], got {keep_prob}")
    if generator is not None:
        keep = (torch.rand(index.numel(), generator=generator) < keep_prob).to(push.device)
    else:
        keep = torch.rand(index.numel(), device=push.device) < keep_prob
    kept = torch.where(keep, push, torch.zeros((), dtype=push.dtype, device=push.device))
    return torch.zeros(num_neurons, dtype=torch.float32, device=push.device).scatter(0, index, kept)


def induction_vectors(target: NeuronSet, opposite: Optional[NeuronSet], site: str, num_neurons: int,
                      strength: float = 1.0, keep_prob: float = 0.9, generator: Optional[torch.Generator] = None,
                      device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(deactivate [I] bool, add [I] float32) for one forward step at one act site.

    Target neurons are pushed, each kept independently with probability ``keep_prob`` (drawn
    from ``generator``, a fresh unseeded CPU one if None); the opposite set's neurons are
    deactivated. A neuron in both sets is treated as a target neuron.
    """
    if not 0.0 <= keep_prob <= 1.0:
        raise ValueError(f"keep_prob must be in [0, 1], got {keep_prob}")
    deactivate, index, push = induction_plan(target, opposite, site, num_neurons, strength)
    add = induction_add(index, push, num_neurons, keep_prob, generator if generator is not None else torch.default_generator)
    return deactivate.to(device), add.to(device)

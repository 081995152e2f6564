"""accumulate_stats: one pass over an activation updates every per-channel statistic.

Public entry point, input validation and backend dispatch. The kernels live beside this file
(reference.py, triton.py, cpp.py, cuda.py, registered in ops/registry.py); each writes chunk
partials that partials.reduce_partials folds into a StatsState. Under torch.compile the call
goes through the torch.library op ``persona_kernels::accumulate_stats`` (ops/library.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from ...stats import StatsConfig, StatsState
from .. import registry
from .partials import (
    MAX_ABS_ACTIVATION,
    PARTIAL_FIELDS,
    Chunks,
    Partials,
    nonfinite_channels,
    nonfinite_flag,
    reduce_partials,
    valid_counts,
)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# StatsState fields in the order the torch.library op returns them (then hist, with edges)
DELTA_FIELDS = ("count", "sum", "mean", "m2", "sumsq", "sumabs", "pos", "min", "max", "absmax", "samples", "norm_mean", "norm_m2")


class NonFiniteActivationError(ValueError):
    """The activation holds NaN or Inf among its valid tokens; nothing was accumulated."""


def accumulate_delta(x3: torch.Tensor, valid3: torch.Tensor, seg: torch.Tensor, edges: Optional[torch.Tensor],
                     num_personas: int, backend: str) -> StatsState:
    """One call's statistics as a fresh StatsState: the backend's partials, checked, then reduced."""
    part = registry.kernel("accumulate_stats", backend)(x3, valid3, seg, edges, num_personas)
    bad = nonfinite_channels(part)
    if bad.numel():
        raise NonFiniteActivationError(_nonfinite_message(bad) + "; nothing was accumulated")
    n = valid_counts(part.chunks, valid3.reshape(-1))
    return reduce_partials(part, n, x3.shape[0], num_personas, edges)


def _as_samples(x: torch.Tensor, valid, segment_ids, num_personas: int):
    """Validate and flatten to x [B, T, C], valid [B, T] bool, persona per sample [B] int64."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"accumulate_stats supports float32, float16 and bfloat16 activations, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"x must have shape [..., tokens, channels] (at least 2-D), got {tuple(x.shape)}")
    *lead, T, C = x.shape
    B = 1
    for d in lead:
        B *= d
    if valid is None:
        valid3 = torch.ones(B, T, dtype=torch.bool, device=x.device)
    else:
        if not isinstance(valid, torch.Tensor) or tuple(valid.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"valid must be a tensor of shape {tuple(x.shape[:-1])} (x without its channel dim), "
                             f"got {tuple(valid.shape) if isinstance(valid, torch.Tensor) else type(valid).__name__}")
        if valid.dtype != torch.bool:
            if valid.dtype.is_floating_point or valid.dtype.is_complex or bool(((valid != 0) & (valid != 1)).any()):
                raise ValueError(f"valid must be boolean (or 0/1 integers), got {valid.dtype}")
        valid3 = valid.to(device=x.device, dtype=torch.bool).reshape(B, T)
    if segment_ids is None:
        seg = torch.zeros(B, dtype=torch.int64, device=x.device)
    else:
        seg = torch.as_tensor(segment_ids, device=x.device)
        if seg.dtype.is_floating_point or seg.dtype == torch.bool:
            raise TypeError(f"segment_ids must be integers, got {seg.dtype}")
        if tuple(seg.shape) != tuple(lead) and not (seg.numel() == B == 1):
            raise ValueError(f"segment_ids must have shape {tuple(lead)} (one persona per sample), got {tuple(seg.shape)}")
        seg = seg.reshape(B).to(torch.int64)
        if B and (int(seg.min()) < 0 or int(seg.max()) >= num_personas):
            raise ValueError(f"segment_ids must be in [0, {num_personas}) for a state of {num_personas} personas, "
                             f"got values in [{int(seg.min())}, {int(seg.max())}]")
    return x.reshape(B, T, C).contiguous(), valid3.contiguous(), seg


def accumulate_stats(x: torch.Tensor, state: Optional[StatsState] = None, *, valid: Optional[torch.Tensor] = None,
                     segment_ids=None, config: Optional[StatsConfig] = None, backend: str = "auto") -> StatsState:
    """Accumulate statistics of activation ``x`` into ``state`` (created if None) and return it.

    x:           [..., T, C] activation (float32/float16/bfloat16); every leading index is one
                 *sample* (a text), T its tokens, C channels. Each call must see whole samples:
                 the per-sample norm of a sample split over two calls counts as two samples.
    valid:       optional [..., T] bool; False marks padding, which counts nowhere.
    segment_ids: optional [...] ints, the persona of each sample (default 0), so several
                 personas accumulate in one launch.
    config:      StatsConfig for a new state (ignored when ``state`` is given).
    backend:     'auto' (default), 'reference', 'triton', 'cpp' or 'cuda'.

    NaN/Inf among valid tokens, and |x| > 1e15 (MAX_ABS_ACTIVATION: beyond it a float32 sum of
    squares could overflow, so every backend refuses alike), raise NonFiniteActivationError and
    leave ``state`` unchanged:
    non-finite activations are a bug upstream, and silently skipping them would bias every
    statistic. The state is only modified after the whole call succeeded.
    """
    if state is None:
        if not isinstance(x, torch.Tensor) or x.ndim < 1:
            raise TypeError("x must be a torch.Tensor with a channel dimension")
        state = StatsState.empty(x.shape[-1], config or StatsConfig(), device=x.device)
    elif not isinstance(state, StatsState):
        raise TypeError(f"state must be a StatsState, got {type(state).__name__}")
    if isinstance(x, torch.Tensor) and x.ndim >= 1 and x.shape[-1] != state.num_channels:
        raise ValueError(f"x has {x.shape[-1]} channels but the statistics state has {state.num_channels}")
    if isinstance(x, torch.Tensor) and x.device != state.device:
        raise ValueError(f"x is on {x.device} but the statistics state is on {state.device}; move one of them")
    x3, valid3, seg = _as_samples(x, valid, segment_ids, state.num_personas)
    B, T, C = x3.shape
    if B == 0 or T == 0:
        return state
    name = registry.resolve("accumulate_stats", backend, x3.device, dtype=x3.dtype)
    if torch.compiler.is_compiling():
        out = torch.ops.persona_kernels.accumulate_stats(x3, valid3, seg, state.edges, state.num_personas, name)
        delta = StatsState(**dict(zip(DELTA_FIELDS, out)), hist=out[len(DELTA_FIELDS)] if state.edges is not None else None,
                           edges=state.edges)
    else:
        delta = accumulate_delta(x3, valid3, seg, state.edges, state.num_personas, name)
    return state.merge_(delta)


# PendingStats checks each call for NaN/Inf at once on the CPU (free there) and, on an
# accelerator, at flush and every CHECK_EVERY calls: an immediate check reads a flag back to
# the host, a sync per site per batch that stalled GPU calibration (4.2x a plain forward on an
# H200, 2026-12-04). Tests set DEFER_CHECKS_ON_CPU to run the deferred path here.
DEFER_CHECKS_ON_CPU = False
CHECK_EVERY = 64


class PendingStats:
    """accumulate_stats over many calls into one ``state``, with stage 2 deferred.

    Stage 1 (one pass of the kernel over the activation) runs at every ``add``; the partials are
    kept and folded into ``state`` by one stage-2 reduction per ``flush`` (or when ``max_rows``
    chunk rows are pending). Stage 2 is a fixed cost of a few dozen small tensor ops per call,
    more than the kernel itself for the activations of a small model's calibration batch, so
    deferring it divides that cost by the number of calls folded together. The result equals
    accumulating call by call (one multi-way Chan merge instead of several two-way ones: float
    rounding).

    NaN/Inf: on the CPU the call that sees one raises and nothing of it is accumulated. On an
    accelerator the check is deferred (see CHECK_EVERY): the error is raised at the next check,
    names the call, and none of the calls pending since the last flush is accumulated.
    """

    def __init__(self, state: StatsState, backend: str = "auto", max_rows: int = 4096):
        self.state, self.backend, self.max_rows = state, backend, max_rows
        self._parts: list = []     # (Partials, valid counts, sample offset) of pending calls
        self._flags: list = []     # deferred mode: a 0-dim bool per pending call, True if it saw NaN/Inf
        self._samples = self._rows = self._tokens = 0
        self._hist: Optional[torch.Tensor] = None
        self.deferred = state.device.type != "cpu" or DEFER_CHECKS_ON_CPU

    def add(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None, segment_ids=None) -> None:
        state = self.state
        if x.shape[-1] != state.num_channels or x.device != state.device:
            raise ValueError(f"x ({tuple(x.shape)} on {x.device}) does not fit the statistics state "
                             f"({state.num_channels} channels on {state.device})")
        x3, valid3, seg = _as_samples(x, valid, segment_ids, state.num_personas)
        if x3.shape[0] == 0 or x3.shape[1] == 0:
            return
        name = registry.resolve("accumulate_stats", self.backend, x3.device, dtype=x3.dtype)
        kernel = registry.kernel("accumulate_stats", name)
        if state.edges is not None and self._hist is None:
            # the kernels count into one running int32 histogram (flushed long before it could
            # overflow): no call allocates, zeroes and adds a [P, C, bins] histogram of its own
            self._hist = torch.zeros((state.num_personas, state.num_channels, state.edges.numel() - 1),
                                     dtype=torch.int32, device=state.device)
        part = kernel(x3, valid3, seg, state.edges, state.num_personas, hist_out=self._hist)
        part.hist = None
        if self.deferred:
            self._flags.append(nonfinite_flag(part))
        else:
            bad = nonfinite_channels(part)
            if bad.numel():
                if self._hist is not None:  # take this call's counts back out: a recount is exact
                    self._hist.sub_(kernel(x3, valid3, seg, state.edges, state.num_personas).hist)
                raise NonFiniteActivationError(_nonfinite_message(bad) + "; nothing was accumulated")
        self._parts.append((part, valid_counts(part.chunks, valid3.reshape(-1)), self._samples))
        self._samples += x3.shape[0]
        self._rows += len(part.chunks)
        self._tokens += x3.shape[0] * x3.shape[1]
        if self._rows >= self.max_rows or self._tokens >= 2 ** 30:  # int32 histogram counts stay exact
            self.flush()
        elif len(self._flags) >= CHECK_EVERY:
            self._check_deferred()

    def _check_deferred(self) -> None:
        """One host read for all the pending calls' flags; on a bad one, drop everything pending."""
        if not self._flags:
            return
        flags = torch.stack(self._flags).cpu()
        self._flags = []
        if bool(flags.any()):
            first = int(flags.nonzero()[0])
            bad = nonfinite_channels(self._parts[first][0])
            pending = len(self._parts)
            self._reset()
            raise NonFiniteActivationError(
                f"{_nonfinite_message(bad)} (call {first + 1} of the {pending} since the last flush; the check is "
                "deferred on an accelerator); none of those calls was accumulated")

    def _reset(self) -> None:
        self._parts, self._flags, self._samples, self._hist, self._rows, self._tokens = [], [], 0, None, 0, 0

    def flush(self) -> StatsState:
        """Fold the pending partials into the state; returns it."""
        self._check_deferred()
        if self._parts:
            parts = [p for p, _, _ in self._parts]
            chunks = Chunks(*(torch.cat([getattr(p.chunks, f) + (off if f == "sample" else 0) for p, _, off in self._parts])
                              for f in ("start", "length", "sample", "persona")))
            fields = {f: torch.cat([getattr(p, f) for p in parts]) for f in PARTIAL_FIELDS}
            merged = Partials(chunks=chunks, **fields, hist=self._hist)
            n = torch.cat([n for _, n, _ in self._parts])
            self.state.merge_(reduce_partials(merged, n, self._samples, self.state.num_personas, self.state.edges))
        self._reset()
        return self.state


def _nonfinite_message(bad: torch.Tensor) -> str:
    return (f"activation contains NaN or Inf in {bad.numel()} channel(s) (first: {bad[:8].tolist()}), or values beyond "
            f"|x| = {MAX_ABS_ACTIVATION:g}, the largest every backend can square and sum")


__all__ = ["accumulate_delta", "accumulate_stats", "NonFiniteActivationError", "PendingStats", "SUPPORTED_DTYPES"]

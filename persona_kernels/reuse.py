"""Reuse of the hidden states below the first modified decoder layer across evaluations.

A study evaluates many configurations (masks, NPTI, steering) of one model over the same
inputs. A configuration that changes nothing below decoder layer L leaves the input of layer L
exactly as the unmodified model computes it, so it need not be computed again:

    reuse = LowerLayers(model)
    with reuse.session(("ppl",), first_modified_layer(model)):
        perplexity(model, tok, texts)

The first session of a workload at layer L runs the model whole and records, for each forward
call in order, what layer L - 1 handed on. Later sessions of that workload and L replace layers
0 .. L - 1 with stand-ins that skip their work: the last one hands on the recorded tensor, and
each keeps the KV cache's length right with entries of one head of width 1, so positions and
attention masks are those of a whole run. A call whose shape does not match the record (another
workload under the same key) is an error, never a silent answer. Exact: layers >= L see the
same inputs as in a whole run, bit for bit.
"""
from __future__ import annotations

import contextlib
from typing import Hashable, Optional

import torch
import torch.nn as nn

from .hf import decoder_layers, is_output_head, layer_index

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")
# Architectures on which replaying is tested bit for bit (tests/test_reuse.py). Elsewhere a layer
# might read another layer's cache entries (cross-layer KV sharing, e.g. Gemma 3n), which the
# stand-ins leave empty: sessions run whole unless LowerLayers(..., any_architecture=True).
TESTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "olmo2"})


def first_modified_layer(model: nn.Module) -> Optional[int]:
    """The lowest decoder layer the persona layer changes (masks, NPTI, steering), the depth when
    only the output head is masked, 0 when the input embedding is; None when nothing is applied."""
    h = getattr(model, "_persona_kernels", None)
    if h is None:
        return None
    depth = len(decoder_layers(model))
    found = []
    for name in [*h.swapped, *h.neurons, *h.expert_neurons, *h.steering]:
        idx = layer_index(name)
        if idx is None:  # outside the decoder layers: the head changes nothing below it, anything else may
            module = model.get_submodule(name)
            idx = depth if is_output_head(model, name, module) else 0
        found.append(idx)
    return min(found) if found else None


class _Skipped(nn.Module):
    """Stand-in for decoder layer ``index`` < L: no work; the last one hands on the recorded input of
    layer L. Its KV cache entry is one head of width 1, as long as the layer's would be."""

    def __init__(self, original: nn.Module, index: int, owner: "LowerLayers", last: bool):
        super().__init__()
        self.index, self.last = index, last
        self.__dict__["owner"] = owner  # a plain reference, not a submodule
        if hasattr(original, "attention_type"):  # models that pick each layer's mask by it (sliding window)
            self.attention_type = original.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        # by keyword (Llama and most) or by position (GPT-2 passes it second)
        cache = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None),
                     next((a for a in args if hasattr(a, "get_seq_length")), None))
        if cache is not None and hasattr(cache, "update"):
            B, T = hidden_states.shape[:2]
            # one head of width 1: a cache counts its length from its entries, so they may not be empty
            stub = hidden_states.new_zeros(B, 1, T, 1)
            cache.update(stub, stub, self.index)
        out = self.owner._next(hidden_states) if self.last else hidden_states
        return (out,) if self.owner._tuple else out


class LowerLayers:
    """Recorded inputs of decoder layers, per (workload key, layer); see the module docstring.

    ``max_bytes``: a workload whose record would take the total past it is not kept (its
    sessions run whole). Only the architectures of TESTED_MODEL_TYPES replay unless
    ``any_architecture``.
    """

    def __init__(self, model: nn.Module, max_bytes: int = 4 << 30, any_architecture: bool = False):
        self.model, self.max_bytes = model, max_bytes
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        self.enabled = any_architecture or model_type in TESTED_MODEL_TYPES
        self.records: dict = {}   # (key, L) -> ([tensor per forward call], layers return tuples)
        self.nbytes = 0
        self.replayed = 0         # sessions that skipped layers (for reports)
        self._tuple = False
        self._queue: list = []

    def _next(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self._queue:
            raise RuntimeError("LowerLayers: more forward calls than were recorded for this workload")
        rec = self._queue.pop(0)
        if rec.shape != hidden.shape or rec.device != hidden.device:
            raise RuntimeError(f"LowerLayers: a call of shape {tuple(hidden.shape)} where the record has "
                               f"{tuple(rec.shape)}: the workload differs from the recorded one")
        return rec

    @contextlib.contextmanager
    def session(self, key: Hashable, first_layer: Optional[int]):
        """Run the block with the layers below ``first_layer`` reused, or recorded for later.
        Yields 'whole', 'recording' or 'replaying'."""
        layers = decoder_layers(self.model)
        if not self.enabled or not layers or not first_layer:  # untested model, nothing applied, or layer 0 changed
            yield "whole"
            return
        L = min(first_layer, len(layers))
        if (key, L) not in self.records:
            with self._recording(key, L, layers[L - 1][1]):
                yield "recording"
            return
        record, self._tuple = self.records[(key, L)]
        container = self.model.get_submodule(layers[0][0].rpartition(".")[0])
        originals = [container[i] for i in range(L)]
        self._queue = list(record)
        try:
            for i in range(L):
                container[i] = _Skipped(originals[i], i, self, last=i == L - 1)
            yield "replaying"
            if self._queue:
                raise RuntimeError(f"LowerLayers: {len(self._queue)} recorded forward calls were not used: "
                                   "the workload differs from the recorded one")
            self.replayed += 1
        finally:
            for i, m in enumerate(originals):
                container[i] = m
            self._queue = []

    @contextlib.contextmanager
    def _recording(self, key: Hashable, L: int, layer: nn.Module):
        rec, state = [], {"bytes": 0, "over": False, "tuple": False}

        def keep(module, args, out):
            state["tuple"] = isinstance(out, tuple)
            hidden = out[0] if isinstance(out, tuple) else out
            size = hidden.numel() * hidden.element_size()
            if state["over"] or self.nbytes + state["bytes"] + size > self.max_bytes:
                state["over"] = True
                rec.clear()
                return
            state["bytes"] += size
            rec.append(hidden.detach().clone())  # a copy: a later layer may edit its input in place

        hook = layer.register_forward_hook(keep)
        try:
            yield
        finally:
            hook.remove()
        if not state["over"]:  # kept only when the block ran to its end
            self.records[(key, L)] = (rec, state["tuple"])
            self.nbytes += state["bytes"]

"""Steering vectors (contrastive activation addition / persona vectors) from calibration.

A persona's vector at decoder layer l is the difference of the residual-stream means, the
output of layer l averaged over the counted tokens (the answer tokens of (question, answer)
pairs by default), between its texts and the opposite persona's: ``v = mean_pos - mean_neg``
for the positive pole, ``-v`` for the negative one. Calibration keeps those means at its
'resid' sites, so the vectors cost nothing beyond the calibration run.

    vectors = steering_vectors(calib, "power", "humble")
    apply_steering(model, vectors, layers=[20], strength=4.0, persona="power")  # model.py
    project(calib, vectors)          # how strongly each persona's texts express the vector
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .calibrate import CalibrationResult
from .fingerprint import check_fingerprint
from .hf import decoder_layers, layer_index, max_positions, padded_inputs
from .io import load_artifact, save_artifact
from .prompts import PromptFormat

KIND = "steering"


@dataclass
class SteeringVectors:
    """One vector per persona and decoder layer: ``vectors[layer name]`` is float32 [P, H]."""

    personas: list
    vectors: dict
    fingerprint: str
    architecture: str
    params: dict = field(default_factory=dict)

    @property
    def layers(self) -> dict:
        """decoder-layer name -> index, in model order."""
        return {n: layer_index(n) for n in self.vectors}

    def select(self, layers: Optional[Sequence[Union[int, str]]] = None) -> list[str]:
        """Layer names for indices or names (None: every layer of these vectors)."""
        if layers is None:
            return list(self.vectors)
        by_index = {i: n for n, i in self.layers.items()}
        names = []
        for key in layers:
            name = by_index.get(key) if isinstance(key, int) else key if key in self.vectors else None
            if name is None:
                raise KeyError(f"layer {key!r} has no steering vector; these vectors cover layers {sorted(by_index)}")
            names.append(name)
        return names

    def vector(self, persona: str, layer: Union[int, str]) -> torch.Tensor:
        if persona not in self.personas:
            raise KeyError(f"persona {persona!r} has no steering vector; these hold {self.personas}")
        return self.vectors[self.select([layer])[0]][self.personas.index(persona)]

    def norms(self) -> dict:
        """Layer index -> L2 norm of the positive persona's vector."""
        return {self.layers[n]: float(v[0].norm()) for n, v in self.vectors.items()}

    def save(self, path) -> str:
        meta = {"personas": self.personas, "fingerprint": self.fingerprint, "architecture": self.architecture,
                "params": self.params, "layers": list(self.vectors)}
        return save_artifact(path, dict(self.vectors), KIND, meta)

    @classmethod
    def load(cls, path, model: Optional[nn.Module] = None) -> "SteeringVectors":
        tensors, meta = load_artifact(path, KIND)
        if model is not None:
            check_fingerprint(model, meta["fingerprint"], f"steering vectors {path}")
        if set(tensors) != set(meta["layers"]):
            raise ValueError(f"{path}: tensors and layer list disagree (truncated or edited file?)")
        vectors = {n: tensors[n] for n in meta["layers"]}
        P = len(meta["personas"])
        bad = [n for n, v in vectors.items() if v.ndim != 2 or v.shape[0] != P]
        if bad:
            raise ValueError(f"{path}: {bad[0]} holds shape {tuple(vectors[bad[0]].shape)}, expected [{P}, hidden]")
        return cls(list(meta["personas"]), vectors, meta["fingerprint"], meta["architecture"], meta.get("params", {}))


def steering_vectors(calib: CalibrationResult, positive: str, negative: str,
                     layers: Optional[Sequence[int]] = None) -> SteeringVectors:
    """Mean-difference vectors of ``positive`` against ``negative`` at every calibrated decoder
    layer (or the given indices): rows [v, -v] for personas [positive, negative]."""
    if positive == negative:
        raise ValueError(f"positive and negative must be different personas, got {positive!r} twice")
    i, j = calib.persona_index(positive), calib.persona_index(negative)
    sites = [n for n, s in calib.sites.items() if s.kind == "resid" and (layers is None or s.layer in set(layers))]
    if not sites:
        raise ValueError("these statistics have no residual-stream sites" + (f" at layers {list(layers)}" if layers else "")
                         + "; calibrate with kinds including 'resid' (the default)")
    vectors = {}
    for name in sites:
        st = calib.stats[name]
        empty = [p for p, k in ((positive, i), (negative, j)) if int(st.count[k]) == 0]
        if empty:
            raise ValueError(f"persona {empty[0]!r} has no counted tokens at {name}")
        v = (st.mean[i] - st.mean[j]).to(torch.float32).cpu()
        vectors[name] = torch.stack([v, -v])
    params = {"positive": positive, "negative": negative, "tokens": [int(calib.stats[sites[0]].count[k]) for k in (i, j)],
              "calibration": {k: calib.config.get(k) for k in ("pair_scope", "token_scope", "chat_template", "system_prompt")}}
    return SteeringVectors([positive, negative], vectors, calib.fingerprint, calib.architecture, params)


def project(source: Union[CalibrationResult, Mapping], vectors: SteeringVectors, persona: Optional[str] = None,
            layers: Optional[Sequence[Union[int, str]]] = None) -> dict:
    """How strongly activations point along ``persona``'s vector (default: the first persona):
    the dot product with the unit vector, per layer index.

    ``source``: a CalibrationResult (-> {persona: {layer: projection of its mean}}), or a mapping
    {layer index or name: hidden states [..., H]} (-> {layer: projections [...]}).
    """
    persona = persona or vectors.personas[0]
    names = vectors.select(layers)
    units = {n: vectors.vector(persona, n) / vectors.vector(persona, n).norm().clamp_min(1e-12) for n in names}
    if isinstance(source, CalibrationResult):
        missing = [n for n in names if n not in source.stats]
        if missing:
            raise KeyError(f"the statistics have no residual site {missing[0]!r}")
        return {p: {vectors.layers[n]: float(source.stats[n].mean[k].float().cpu() @ units[n]) for n in names}
                for k, p in enumerate(source.personas)}
    out = {}
    for key, hidden in source.items():
        name = vectors.select([key])[0]
        if name not in units:
            continue
        u = units[name]
        if hidden.shape[-1] != u.numel():
            raise ValueError(f"layer {key!r}: hidden states of width {hidden.shape[-1]}, the vector has {u.numel()}")
        out[vectors.layers[name]] = hidden.float() @ u.to(hidden.device)
    return out


@torch.inference_mode()
def text_projections(model: nn.Module, tokenizer, texts: Sequence, vectors: SteeringVectors,
                     layers: Optional[Sequence[Union[int, str]]] = None, persona: Optional[str] = None,
                     batch_size: int = 8, prompt: Optional[PromptFormat] = None) -> tuple[list, torch.Tensor]:
    """Per-text mean projection (over the counted tokens) onto the persona's unit vector at each
    layer: (layer indices, float32 [len(texts), L]). Texts are strings (every token counts) or
    (question, answer) pairs formatted like calibration (answer tokens count) — persona-vector
    monitoring of how strongly a text expresses a persona."""
    check_fingerprint(model, vectors.fingerprint, "these steering vectors")
    if not texts:
        raise ValueError("no texts to project")
    names = vectors.select(layers)
    modules = dict(decoder_layers(model))
    captured: dict = {}
    hooks = [modules[n].register_forward_hook(lambda m, a, o, n=n: captured.__setitem__(n, o[0] if isinstance(o, tuple) else o))
             for n in names]
    fmt = prompt or PromptFormat()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    limit = max_positions(model) or 1 << 62
    rows = []
    try:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            encoded = [fmt.encode(tokenizer, *t) if isinstance(t, tuple) else
                       (tokenizer(t, add_special_tokens=True)["input_ids"], 0) for t in chunk]
            # over-long texts keep their last tokens (the answer), as many as the model has positions for
            encoded = [(ids[-limit:], max(0, n_prompt - max(0, len(ids) - limit))) for ids, n_prompt in encoded]
            L = max(len(ids) for ids, _ in encoded)
            ids = torch.full((len(chunk), L), pad, dtype=torch.long)
            attn = torch.zeros(len(chunk), L, dtype=torch.long)
            scope = torch.zeros(len(chunk), L, dtype=torch.bool)
            for r, (t, n_prompt) in enumerate(encoded):
                ids[r, :len(t)], attn[r, :len(t)] = torch.tensor(t), 1
                scope[r, n_prompt:len(t)] = True
            model(input_ids=ids.to(device), **padded_inputs(model, attn.to(device)), use_cache=False)
            proj = project({n: captured[n] for n in names}, vectors, persona)
            w = scope.to(torch.float32)
            rows.append(torch.stack([(proj[vectors.layers[n]].cpu() * w).sum(1) / w.sum(1).clamp_min(1) for n in names], 1))
    finally:
        for h in hooks:
            h.remove()
    return [vectors.layers[n] for n in names], torch.cat(rows)


__all__ = ["SteeringVectors", "project", "steering_vectors", "text_projections"]

"""Calibration: run each persona's texts through a model and collect activation statistics.

Statistics are gathered by forward hooks at every site (see sites.py) with accumulate_stats,
all personas of a batch in one launch (segment ids), padding excluded. Hooks are always
removed, even when a batch raises.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .fingerprint import architecture, check_fingerprint, model_fingerprint
from .hf import max_positions, padded_inputs, set_module
from .io import load_artifact, save_artifact
from .moe import ACT, experts_forward, slot_weight
from .ops.accumulate_stats import NonFiniteActivationError, PendingStats
from .prompts import PromptFormat
from .sites import KINDS, Site, check_supported, discover_sites
from .stats import StatsConfig, StatsState, compact

KIND = "statistics"
TOKEN_SCOPES = ("prompt", "generated", "both", "decode")
PAIR_SCOPES = ("answer", "prompt", "both")


@dataclass
class CalibrationConfig:
    """How to calibrate.

    kinds:         site kinds: 'linear' (linear-layer inputs), 'act' (gated-MLP activations),
                   'resid' (decoder-layer outputs: the residual stream steering vectors come from).
    layers:        decoder layer indices to keep (None: all).
    mlp_only:      keep only linear/act sites inside MLP blocks.
    include/exclude: regexes on linear/act site names ('resid' sites follow ``layers`` only).
    include_head:  also calibrate the output head's input (to mask lm_head, as the released
                   Persona code does; off by default).
    share_inputs:  linear layers that read the very same input tensor (q/k/v, gate/up) share one
                   statistics state: one pass instead of three, and the artifact stores it once
                   (CalibrationResult.aliases). Off: every layer accumulates its own.
    batch_size, max_length: tokenisation and batching.
    histogram_kinds: site kinds that also keep a histogram (NPTI needs it at 'act').
    edges:         histogram edges (None: NPTI's).
    backend:       accumulate_stats backend.
    progress:      show a progress bar.
    token_scope:   which tokens count: 'prompt' (the texts themselves, default), 'generated'
                   (the model's greedy continuation of each text, as NPTI's reference does) or
                   'both', or 'decode': the tokens fed at decode steps, i.e. the continuation
                   without its last token (NPTI's released counting: the prompt and the final
                   generated token never enter the model as inputs of a decode step).
                   Generation is greedy and stops at EOS or after ``max_new_tokens``;
                   ``repetition_penalty`` as in transformers (the NPTI code uses 1.1, with up
                   to 500 new tokens).
    pair_scope:    for (question, answer) pairs, formatted like evaluation does (prompts.py):
                   the tokens that count, 'answer' (default), 'prompt' or 'both'.
    chat_template, system_prompt: the prompt format of pairs (PromptFormat; None: the
                   tokenizer's chat template when it has one). Plain texts are used as they
                   are unless ``chat_template=True``: then each is the user turn of the chat
                   template with the generation prompt (NPTI's search prompts,
                   PersonalityBench.role_play_prompts).
    """

    kinds: tuple = KINDS
    layers: Optional[list] = None
    mlp_only: bool = False
    include: Optional[str] = None
    exclude: Optional[str] = None
    batch_size: int = 8
    max_length: int = 512
    histogram_kinds: tuple = ("act",)
    edges: Optional[list] = None
    backend: str = "auto"
    progress: bool = True
    token_scope: str = "prompt"
    max_new_tokens: int = 32
    repetition_penalty: float = 1.0
    pair_scope: str = "answer"
    chat_template: Optional[bool] = None
    system_prompt: Optional[str] = None
    include_head: bool = False
    share_inputs: bool = True

    def __post_init__(self):
        self.kinds = tuple(self.kinds)
        self.histogram_kinds = tuple(self.histogram_kinds)
        if not self.kinds or any(k not in KINDS for k in self.kinds):
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {self.kinds}")
        if any(k not in KINDS for k in self.histogram_kinds):
            raise ValueError(f"histogram_kinds must be a subset of {KINDS}, got {self.histogram_kinds}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {self.max_length!r}")
        if self.edges is not None:
            StatsConfig(histogram=True, edges=self.edges)  # validates
        if self.token_scope not in TOKEN_SCOPES:
            raise ValueError(f"token_scope must be one of {TOKEN_SCOPES}, got {self.token_scope!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.pair_scope not in PAIR_SCOPES:
            raise ValueError(f"pair_scope must be one of {PAIR_SCOPES}, got {self.pair_scope!r}")


@dataclass
class CalibrationResult:
    """Statistics per site for several personas over one model."""

    personas: list
    sites: dict                      # site name -> Site
    stats: dict                      # site name -> StatsState
    fingerprint: str
    architecture: str
    config: dict = field(default_factory=dict)
    aliases: dict = field(default_factory=dict)  # site -> site whose input it shares (one state for both)

    def persona_index(self, name: str) -> int:
        if name not in self.personas:
            raise KeyError(f"persona {name!r} is not in these statistics; they hold {self.personas}")
        return self.personas.index(name)

    def summary(self) -> str:
        first = next(iter(self.stats.values()))
        acts = sum(s.kind == 'act' for s in self.sites.values())
        lines = [f"{len(self.sites)} sites on {self.architecture} ({acts} MLP activation sites)"]
        for i, p in enumerate(self.personas):
            lines.append(f"  persona {p!r}: {int(first.samples[i])} samples, {int(first.count[i])} tokens")
        return "\n".join(lines)

    def save(self, path) -> str:
        """Atomically, as safetensors: each shared state once, counts and extremes in their
        smallest exact form (stats/compact.py)."""
        tensors = {f"{site}::{k}": v for site, st in self.stats.items() if site not in self.aliases
                   for k, v in compact.pack(st.tensors()).items()}
        meta = {"fingerprint": self.fingerprint, "architecture": self.architecture, "personas": self.personas,
                "sites": {n: asdict(s) for n, s in self.sites.items()}, "config": self.config, "aliases": self.aliases}
        return save_artifact(path, tensors, KIND, meta)

    @classmethod
    def load(cls, path, model: Optional[nn.Module] = None) -> "CalibrationResult":
        tensors, meta = load_artifact(path, KIND)
        if model is not None:
            check_fingerprint(model, meta["fingerprint"], f"statistics file {path}")
        grouped: dict[str, dict] = {}
        for key, t in tensors.items():
            site, _, name = key.rpartition("::")
            grouped.setdefault(site, {})[name] = t
        sites = {n: Site(**s) for n, s in meta["sites"].items()}
        aliases = dict(meta.get("aliases", {}))
        if set(grouped) != set(sites) - set(aliases) or any(a not in sites or c not in grouped for a, c in aliases.items()):
            raise ValueError(f"{path}: tensors and site list disagree (truncated or edited file?)")
        stats = {n: StatsState.from_tensors(compact.unpack(grouped[n])) for n in grouped}
        stats.update({a: stats[c] for a, c in aliases.items()})
        return cls(list(meta["personas"]), sites, {n: stats[n] for n in sites}, meta["fingerprint"], meta["architecture"],
                   meta.get("config", {}), aliases)


def _check_texts(texts_by_persona: Mapping[str, Sequence[str]]) -> list[tuple[str, int]]:
    if not isinstance(texts_by_persona, Mapping) or not texts_by_persona:
        raise ValueError("texts_by_persona must be a non-empty mapping {persona name: [texts]}")
    items = []
    for i, (persona, texts) in enumerate(texts_by_persona.items()):
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"persona {persona!r}: expected a list of texts, got {type(texts).__name__}")
        texts = [t for t in texts]
        if not texts:
            raise ValueError(f"persona {persona!r} has no calibration texts")
        for j, t in enumerate(texts):
            if isinstance(t, tuple):
                if len(t) != 2 or not all(isinstance(v, str) for v in t):
                    raise TypeError(f"persona {persona!r}, text {j}: a pair must be (question, answer) strings")
                if not t[1].strip():
                    raise ValueError(f"persona {persona!r}, text {j}: empty answer")
            elif not isinstance(t, str):
                raise TypeError(f"persona {persona!r}, text {j}: expected str or (question, answer), got {type(t).__name__}")
            elif not t.strip():
                raise ValueError(f"persona {persona!r}, text {j} is empty")
        items.extend((t, i) for t in texts)
    kinds = {isinstance(t, tuple) for t, _ in items}
    if len(kinds) > 1:
        raise TypeError("texts_by_persona mixes plain texts and (question, answer) pairs; use one kind")
    return items


class _ExpertsObserver(nn.Module):
    """Stands in for a fused-experts module during calibration: the same computation
    (moe.experts_forward), with each routed expert's projection inputs and activation fed to the
    collector as its own sites."""

    def __init__(self, base: nn.Module, collector: "_Collector", sites: dict):
        super().__init__()
        self.base, self._collector, self._sites = base, collector, sites  # slot name -> Site

    def _project(self, param, e, x, tok):
        site = self._sites.get(f"{self._name}.{param}.{e}")
        if site is not None and self._collector.enabled:
            self._collector.collect_rows(site, x, tok)
        return nn.functional.linear(x, slot_weight(self.base, param, e))

    def _activate(self, e, gate, tok):
        a = self.base.act_fn(gate)
        site = self._sites.get(f"{self._name}.{ACT}.{e}")
        if site is not None and self._collector.enabled:
            self._collector.collect_rows(site, a, tok)
        return a

    def forward(self, *args, **kwargs):
        return experts_forward(self.base, args, kwargs, self._project, self._activate)


class _Collector:
    """Forward hooks that feed each site's activation into its StatsState (and, for routed
    experts, observers swapped in for the fused-experts modules until remove())."""

    def __init__(self, model: nn.Module, sites: list[Site], num_personas: int, cfg: CalibrationConfig):
        self.sites, self.cfg, self.P = sites, cfg, num_personas
        self.stats: dict[str, StatsState] = {}
        self.pending: dict[str, PendingStats] = {}
        self.valid: Optional[torch.Tensor] = None
        self.segments: Optional[torch.Tensor] = None
        self.enabled = True
        self.handles = []
        self.model, self.swapped = model, {}
        self.aliases: dict = {}  # site -> the site whose input tensor it reads too
        self._last: Optional[tuple] = None  # (input tensor, site) of the last linear site, this forward
        self._moved: Optional[tuple] = None  # (valid, segments, device, their copies there), see _on
        modules = dict(model.named_modules())
        for s in sites:
            if s.expert is not None:
                continue
            mod = modules[s.module]
            if s.kind == "linear":
                self.handles.append(mod.register_forward_pre_hook(self._hook(s, from_output=False)))
            else:
                self.handles.append(mod.register_forward_hook(self._hook(s, from_output=True)))
        by_module: dict = {}
        for s in sites:
            if s.expert is not None:
                by_module.setdefault(s.module, {})[s.name] = s
        for name, slots in by_module.items():
            observer = _ExpertsObserver(modules[name], self, slots)
            observer._name = name
            self.swapped[name] = modules[name]
            set_module(model, name, observer)

    def _hook(self, site: Site, from_output: bool):
        def hook(module, args, *rest):
            if self.enabled:
                x = rest[0] if from_output else args[0]
                x = x[0] if isinstance(x, tuple) else x  # decoder layers may return a tuple
                if site.kind == "linear" and self._shares_input(site, x):
                    return
                self.collect(site, x)
        return hook

    def new_batch(self) -> None:
        self._last = None

    def _shares_input(self, site: Site, x: torch.Tensor) -> bool:
        """True when ``x`` is the tensor the previous linear site read (q/k/v, gate/up): that
        site's state serves both. Decided on the first batch, checked on every later one."""
        if not self.cfg.share_inputs:
            return False
        last, self._last = self._last, (x, site.name)
        same = last is not None and last[0] is x
        canonical = self.aliases.get(last[1], last[1]) if same else None
        if site.name in self.aliases:
            if canonical != self.aliases[site.name]:
                raise RuntimeError(f"{site.name} read the same input tensor as {self.aliases[site.name]} in an earlier "
                                   "batch but not in this one; calibrate with share_inputs=False")
            return True
        if same and site.name not in self.stats:
            self.aliases[site.name] = canonical
            return True
        return False

    def collect(self, site: Site, x: torch.Tensor) -> None:
        B, T = self.valid.shape
        if x.shape[:-1] != (B, T):
            if x.ndim == 2 and x.shape[0] == B * T:
                x = x.view(B, T, -1)
            elif x.ndim > 3 and x.shape[0] == B and x.shape[-2] == T and all(d == 1 for d in x.shape[1:-2]):
                x = x.reshape(B, T, -1)  # e.g. DeepSeek's kv_b_proj sees [B, 1, T, C]
            else:
                raise RuntimeError(f"site {site.name}: activation of shape {tuple(x.shape)} does not match the batch ({B}, {T})")
        self._accumulate(site, x, self._on(x.device)[0])

    def collect_rows(self, site: Site, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Rows [n, C] of the flattened [B*T] batch (a routed expert's tokens): packed per sample,
        left-aligned, so that per-sample norms see each sample's routed tokens only."""
        B, T = self.valid.shape
        keep = self.valid.reshape(-1).to(tokens.device)[tokens]
        rows, tokens = rows[keep], tokens[keep]
        order = torch.argsort(tokens)
        sample = torch.div(tokens[order], T, rounding_mode="floor")
        counts = torch.bincount(sample, minlength=B)
        slot = torch.arange(sample.numel(), device=sample.device) - (counts.cumsum(0) - counts)[sample]
        width = max(1, int(counts.max())) if sample.numel() else 1
        packed = rows.new_zeros(B, width, rows.shape[-1])
        valid = torch.zeros(B, width, dtype=torch.bool, device=rows.device)
        packed[sample, slot] = rows[order]
        valid[sample, slot] = True
        self._accumulate(site, packed, valid)

    def _accumulate(self, site: Site, x: torch.Tensor, valid: torch.Tensor) -> None:
        pending = self.pending.get(site.name)
        if pending is None:
            hist = site.kind in self.cfg.histogram_kinds
            cfg = StatsConfig(self.P, histogram=hist, edges=self.cfg.edges if hist else None)
            self.stats[site.name] = StatsState.empty(x.shape[-1], cfg, device=x.device)
            pending = self.pending[site.name] = PendingStats(self.stats[site.name], self.cfg.backend)
        try:
            pending.add(x.detach(), valid, self._on(x.device)[1])
        except NonFiniteActivationError as exc:
            raise NonFiniteActivationError(f"site {site.name}: {exc}") from exc

    def _on(self, device: torch.device) -> tuple:
        """(valid, segments) of this batch on ``device``, copied once per batch and device, not
        once per site (a host-to-device copy from pageable memory waits for the GPU)."""
        m = self._moved  # holds the originals: compared by identity, never a reused id
        if m is None or m[0] is not self.valid or m[1] is not self.segments or m[2] != device:
            m = self._moved = (self.valid, self.segments, device, (self.valid.to(device), self.segments.to(device)))
        return m[3]

    def flush(self) -> None:
        """Fold every site's pending partials into its state (stage 2, once for many batches)."""
        for name, pending in self.pending.items():
            try:
                pending.flush()
            except NonFiniteActivationError as exc:
                raise NonFiniteActivationError(f"site {name}: {exc}") from exc

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for name, base in self.swapped.items():
            set_module(self.model, name, base)
        self.swapped.clear()


def _forward_with_generation(model, tokenizer, collector: _Collector, ids, attn, cfg: CalibrationConfig) -> None:
    """Generate greedily (hooks off), then one forward over prompt + continuation with the scope as mask."""
    collector.enabled = False
    try:
        seq = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                             repetition_penalty=cfg.repetition_penalty,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    finally:
        collector.enabled = True
    gen = seq[:, ids.shape[1]:]
    eos = tokenizer.eos_token_id
    # generated tokens before the first EOS are real; EOS and what follows is padding
    real = (torch.cumsum((gen == eos).to(torch.int64), 1) == 0) if eos is not None else torch.ones_like(gen, dtype=torch.bool)
    full_attn = torch.cat([attn.to(torch.bool), real], 1)
    if cfg.token_scope == "decode":  # the last generated token is never the input of a decode step
        real = real.clone()
        real[:, -1] = False
    scope = torch.cat([attn.to(torch.bool) if cfg.token_scope == "both" else torch.zeros_like(attn, dtype=torch.bool), real], 1)
    collector.valid = scope
    model(input_ids=seq, **padded_inputs(model, full_attn.to(attn.dtype)), use_cache=False)


def _pair_batch(encoded: list, pad: int, cfg: CalibrationConfig, limit: int):
    """Right-padded ids, attention mask and the counted tokens of (ids, prompt length) pairs,
    truncated to ``limit`` tokens (from the left of the prompt, so answers are kept)."""
    rows = []
    for ids, n_prompt in encoded:
        cut = max(0, len(ids) - limit)
        rows.append((ids[cut:], max(0, n_prompt - cut)))
    L = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    attn = torch.zeros(len(rows), L, dtype=torch.long)
    scope = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, (t, n_prompt) in enumerate(rows):
        ids[i, :len(t)] = torch.tensor(t)
        attn[i, :len(t)] = 1
        lo, hi = {"answer": (n_prompt, len(t)), "prompt": (0, n_prompt), "both": (0, len(t))}[cfg.pair_scope]
        scope[i, lo:hi] = True
    return ids, attn, scope


def _token_limit(model: nn.Module, cfg: CalibrationConfig) -> int:
    """Tokens a calibration input may have: max_length, and what the model's positions admit
    (the continuation included when generating)."""
    limit, most = cfg.max_length, max_positions(model)
    if most is not None:
        room = most - (cfg.max_new_tokens if cfg.token_scope != "prompt" else 0)
        if room < 1:
            raise ValueError(f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt: the model admits {most} positions")
        limit = min(limit, room)
    return limit


@torch.inference_mode()
def calibrate(model: nn.Module, tokenizer, texts_by_persona: Mapping[str, Sequence[str]],
              config: Optional[CalibrationConfig] = None, **overrides) -> CalibrationResult:
    """Collect activation statistics of every site for each persona's texts.

    ``texts_by_persona``: {persona name: [text, ...]} or {persona name: [(question, answer), ...]}
    (pairs are formatted with the prompt format, and by default only answer tokens count). Keyword overrides update ``config``
    (e.g. ``batch_size=4, mlp_only=True``). Returns a CalibrationResult (save()/load()).
    """
    cfg = config or CalibrationConfig()
    if overrides:
        cfg = CalibrationConfig(**{**asdict(cfg), **overrides})
    check_supported(model)
    items = _check_texts(texts_by_persona)
    personas = list(texts_by_persona)
    sites = discover_sites(model, cfg.kinds, cfg.layers, cfg.mlp_only, cfg.include, cfg.exclude, cfg.include_head)
    if not sites:
        raise ValueError("no statistics sites match the configuration (check layers/mlp_only/include/exclude)")
    pairs = isinstance(items[0][0], tuple)
    if pairs and cfg.token_scope != "prompt":
        raise ValueError("(question, answer) pairs are scored as given; token_scope 'generated'/'both'/'decode' needs plain texts")
    fmt = PromptFormat(cfg.chat_template, cfg.system_prompt)
    encoded = [fmt.encode(tokenizer, *t) for t, _ in items] if pairs else None
    # longest first: padding stays small and a batch that runs out of memory fails early
    order = sorted(range(len(items)), key=lambda i: -(len(encoded[i][0]) if pairs else len(items[i][0])))
    batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]

    pad_added = tokenizer.pad_token is None
    if pad_added:
        tokenizer.pad_token = tokenizer.eos_token
    padding_side = tokenizer.padding_side
    if cfg.token_scope != "prompt":
        tokenizer.padding_side = "left"  # generation continues every row from its last real token
    limit = _token_limit(model, cfg)
    truncated = 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collector = _Collector(model, sites, len(personas), cfg)
    try:
        from tqdm.auto import tqdm

        for batch in tqdm(batches, desc="calibrating", unit="batch", disable=not cfg.progress):
            collector.segments = torch.tensor([items[i][1] for i in batch], dtype=torch.int64)
            collector.new_batch()
            if pairs:
                ids, attn, scope = _pair_batch([encoded[i] for i in batch], tokenizer.pad_token_id, cfg, limit)
                truncated += sum(len(encoded[i][0]) > limit for i in batch)
                collector.valid = scope.to(device)
                model(input_ids=ids.to(device), **padded_inputs(model, attn.to(device)), use_cache=False)
                continue
            texts = [items[i][0] for i in batch]
            if cfg.chat_template:  # each plain text as the user turn (NPTI's search prompts); the template adds the specials
                texts = [fmt.prompt(tokenizer, t) for t in texts]
            enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=limit,
                            add_special_tokens=not cfg.chat_template)
            ids, attn = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            full = [t for t, n in zip(texts, attn.sum(1).tolist()) if n == limit]  # cut, or exactly the limit long
            if full:
                truncated += sum(len(x) > limit for x in tokenizer(full, add_special_tokens=not cfg.chat_template)["input_ids"])
            if cfg.token_scope == "prompt":
                collector.valid = attn.to(torch.bool)
                model(input_ids=ids, **padded_inputs(model, attn), use_cache=False)
            else:
                _forward_with_generation(model, tokenizer, collector, ids, attn, cfg)
        collector.flush()
    finally:
        collector.remove()
        model.train(was_training)
        tokenizer.padding_side = padding_side
        if pad_added:
            tokenizer.pad_token = None
    if truncated:
        warnings.warn(f"calibrate: {truncated} of {len(items)} texts were longer than {limit} tokens and were cut to "
                      f"their {'last' if pairs else 'first'} {limit} (max_length={cfg.max_length}, the model admits "
                      f"{max_positions(model)} positions{', minus the new tokens' if cfg.token_scope != 'prompt' else ''})",
                      stacklevel=2)
    for s in sites:  # an expert no calibration token was routed to has statistics of nothing
        if s.expert is not None and s.name not in collector.stats:
            hist = s.kind in cfg.histogram_kinds
            collector.stats[s.name] = StatsState.empty(s.channels, StatsConfig(len(personas), histogram=hist,
                                                                                 edges=cfg.edges if hist else None), device=device)
    missing = [s.name for s in sites if s.name not in collector.stats and s.name not in collector.aliases]
    if missing:
        raise RuntimeError(f"{len(missing)} site(s) were never called during the forward pass (first: {missing[:3]})")
    stats = {**collector.stats, **{a: collector.stats[c] for a, c in collector.aliases.items()}}
    return CalibrationResult(
        personas=personas, sites={s.name: s for s in sites}, stats={s.name: stats[s.name] for s in sites},
        fingerprint=model_fingerprint(model), architecture=architecture(model),
        config=json.loads(json.dumps(asdict(cfg))), aliases=dict(collector.aliases),
    )

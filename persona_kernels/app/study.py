"""`persona-kernels study` / `make demo-real`: every method against its controls, on one model.

calibrate (answer tokens, chat template) -> for each pole: persona masks of every method over a
grid (sparsity x layer set x mode x gamma), the random and magnitude controls at the same
settings, NPTI per strength, steering vectors per layer x strength, and the system-prompt
baseline -> A/B evaluation (mean answer-token scoring by default, and optionally the Persona
code's rule) -> one report: configuration x pole -> matching share +- SE, McNemar p against the
unmasked model on the same items, shorter-answer share, neutral-text perplexity, own-answer
log-probability, decode tokens/s; a plot of persona shift against damage; per-item JSON files;
the wall time of each step. ``--sweep`` chooses each method's configuration on validation items
and reports only the chosen ones on the held-out rest (see StudyConfig).

The matching share is the share of items where the model picks the power-seeking (first
persona's) answer: a configuration of the first pole should raise it, one of the second lower it.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .. import model as pm
from ..calibrate import calibrate
from ..data import neutral_texts
from ..data.loaders import MCItem
from ..evaluate import evaluate_mc, mcnemar, perplexity
from ..hf import LayerFilter, decoder_layers
from ..io import atomic_write_text
from ..masks import LAYER_SETS, MODES, build_masks, layer_range
from ..prompts import PromptFormat
from ..reuse import LowerLayers, first_modified_layer

MASK_METHODS = ("wanda", "contrastive_wanda", "contrastive_sparse")
CONTROLS = ("random", "magnitude")
ATTENTION = r"(^|\.)(self_attn|attn|attention|self_attention)(\.|$)"
STUDY_LAYER_SETS = ("all", "mlp", "attention") + tuple(s for s in LAYER_SETS if s != "all")


@dataclass
class StudyConfig:
    """What the study runs. personas: (first, second) pole names of the calibration data.

    Without ``sweep`` every configuration (method x sparsity x layer set x mode x gamma, the
    controls, NPTI per strength, steering per layer x strength, the system prompts) is evaluated
    on all items. With ``sweep`` the items are split (seeded) into a validation part
    (``validation_fraction``) and a held-out part: each method's configurations are evaluated on
    the validation items, the one with the largest two-pole shift, min(shift up for the first
    pole, shift down for the second), whose perplexity rises by at most ``max_damage`` is chosen
    (the least damaging one when none stays within it, flagged), and only the chosen ones, the
    unmasked model, the prompting baseline and the controls at the best mask's setting are
    reported on the held-out items.
    """

    personas: tuple = ("matching", "not_matching")
    methods: Sequence[str] = MASK_METHODS
    controls: Sequence[str] = CONTROLS
    sparsities: Sequence[float] = (0.3, 0.5)
    layer_sets: Sequence[str] = ("all",)       # all, mlp, attention, first_third, ..., last_half
    modes: Sequence[str] = ("prune",)          # prune and/or difference
    gammas: Sequence[float] = (0.0,)
    mlp_only: bool = False
    npti: bool = True
    npti_strength: float = 1.0
    npti_strengths: Optional[Sequence[float]] = None  # None: (npti_strength,)
    npti_min_neurons: int = 200
    steering: bool = True
    steer_layers: Optional[Sequence[int]] = None  # None: layers at 1/3, 1/2 and 2/3 of the depth
    steer_strengths: Sequence[float] = (2.0, 4.0, 8.0)
    system_prompts: dict = field(default_factory=dict)  # pole -> system prompt (the prompting baseline)
    scorings: Sequence[str] = ("mean",)
    batch_size: int = 8
    decode_tokens: int = 16
    progress: bool = True
    generations: int = 3          # held-out questions answered by the unmasked model and each pole's best mask
    localize_texts: int = 48      # calibration texts per pole for the layer localization (0: skip)
    sweep: bool = False
    validation_fraction: float = 0.5
    max_damage: float = 0.10
    seed: int = 0
    reuse_lower_layers: bool = True  # hidden states below a configuration's first modified layer: computed once

    def __post_init__(self):
        bad = [s for s in self.layer_sets if s not in STUDY_LAYER_SETS]
        if bad:
            raise ValueError(f"unknown layer set {bad[0]!r}; choose from {STUDY_LAYER_SETS}")
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"unknown mask mode {bad[0]!r}; choose from {MODES}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}")


def valid_sparsity(method: str, sparsity: float) -> bool:
    """Contrastive-Sparse's disjoint masks each keep at most half of a row."""
    return method != "contrastive_sparse" or sparsity >= 0.5


@dataclass
class Candidate:
    """One configuration of one method: ``enter(pole)`` sets the model up for a pole (and may
    return a prompt format to use), ``leave()`` undoes it."""

    family: str
    label: str
    kind: str
    sparsity: float
    enter: Callable[[str], Optional[PromptFormat]]
    leave: Callable[[], None]
    setting: dict = field(default_factory=dict)


@torch.inference_mode()
def generate_answer(model, tok, prompt: PromptFormat, question: str, max_new_tokens: int = 40) -> str:
    chat = prompt.uses_chat(tok)
    enc = tok(prompt.prompt(tok, question), return_tensors="pt", add_special_tokens=not chat).to(next(model.parameters()).device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _decode_tok_s(model, tok, tokens: int) -> float:
    if tokens <= 0:
        return float("nan")
    from .bench import decode_tokens_per_s

    return decode_tokens_per_s(model, tokens, device=next(model.parameters()).device, reps=1)


def split_items(items: Sequence[MCItem], validation_fraction: float, seed: int) -> tuple[list, list]:
    """(validation, held-out): a seeded permutation cut at the fraction."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(items), generator=g).tolist()
    n_val = max(1, min(len(items) - 1, round(len(items) * validation_fraction)))
    return [items[i] for i in order[:n_val]], [items[i] for i in order[n_val:]]


class Study:
    def __init__(self, model, tok, calib_data: dict, items: Sequence[MCItem], cfg: StudyConfig,
                 prompt: PromptFormat, out_dir: str, log=print):
        self.model, self.tok, self.items, self.cfg, self.prompt, self.out = model, tok, list(items), cfg, prompt, out_dir
        self.calib_data, self.log = calib_data, log
        self.rows: list[dict] = []
        self.validation_rows: list[dict] = []
        self.selection: list[dict] = []
        self.timings: dict = {}
        self.neutral = neutral_texts()
        self.candidates: dict = {}
        self.stores: dict = {}  # (method, sparsity, mode) -> MaskStore of every layer
        self.reuse = LowerLayers(model) if cfg.reuse_lower_layers else None
        os.makedirs(out_dir, exist_ok=True)

    def _reusing(self, key):
        """Evaluations of one workload (``key``) share the layers below the first one a
        configuration modifies (reuse.py; exact, bit for bit)."""
        if self.reuse is None:
            return contextlib.nullcontext()
        return self.reuse.session(key, first_modified_layer(self.model))

    def _timed(self, name, fn):
        t0 = time.perf_counter()
        out = fn()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0
        return out

    # ---- evaluation -----------------------------------------------------------------------
    def _evaluate(self, cand: Candidate, pole: Optional[str], items: list, base: Optional[dict], split: str,
                  prompt: Optional[PromptFormat] = None) -> dict:
        """Evaluate the model as it is now on ``items``: one row per scoring rule (kept in
        self.rows, or self.validation_rows for the sweep's validation part)."""
        prompt = prompt or self.prompt
        with self._reusing(("perplexity",)):
            ppl = self._timed("perplexity", lambda: perplexity(self.model, self.tok, self.neutral, self.cfg.batch_size))
        tps = float("nan") if split == "validation" else self._timed(
            "decode", lambda: _decode_tok_s(self.model, self.tok, self.cfg.decode_tokens))
        label = cand.label + (f"/{pole}" if pole and cand.kind != "baseline" else "")
        results = {}
        for scoring in self.cfg.scorings[:1] if split == "validation" else self.cfg.scorings:
            with self._reusing(("mc", split, scoring, repr(prompt))):
                res = self._timed("evaluate", lambda: evaluate_mc(self.model, self.tok, items, self.cfg.batch_size,
                                                                  scoring=scoring, prompt=prompt, progress=self.cfg.progress))
            ref = base.get(scoring) if base else None
            b, c, p = mcnemar(res.correct, ref.correct) if ref is not None else (0, 0, 1.0)
            row = dict(config=label, family=cand.family, kind=cand.kind, pole=pole or "-", sparsity=cand.sparsity,
                       scoring=scoring, split=split, n=res.n, matching=res.accuracy, se=res.se,
                       shift=res.accuracy - (ref.accuracy if ref else res.accuracy), mcnemar_p=p, only_here=b, only_base=c,
                       shorter=res.shorter_picked(), own_logp=res.own_logprob(matching=pole != self.cfg.personas[1]),
                       ppl=ppl, tok_s=tps, **{f"setting_{k}": v for k, v in cand.setting.items()})
            (self.validation_rows if split == "validation" else self.rows).append(row)
            tag = f"{split}-{label}-{scoring}".replace("/", "_").replace(" ", "_")
            atomic_write_text(os.path.join(self.out, "items", f"{tag}.json"), json.dumps(res.rows(items), indent=0))
            self.log(f"  [{split[:4]}] {label:<40} {scoring:<12} matching {res.accuracy:.3f} +- {res.se:.3f}  "
                     f"shift {row['shift']:+.3f}  p {p:.3g}  shorter {row['shorter']:.2f}  ppl {ppl:.2f}")
            results[scoring] = (res, row)
        return results

    def _run(self, cand: Candidate, items: list, base: Optional[dict], split: str) -> dict:
        """Both poles of a candidate (the baseline: once) -> {pole: {scoring: (result, row)}}."""
        self.candidates[cand.label] = cand
        out = {}
        for pole in ([None] if cand.kind == "baseline" else list(self.cfg.personas)):
            prompt = cand.enter(pole)
            try:
                out[pole] = self._evaluate(cand, pole, items, base, split, prompt)
            finally:
                cand.leave()
        return out

    # ---- candidates -----------------------------------------------------------------------
    def _baseline(self) -> Candidate:
        return Candidate("unmasked", "unmasked", "baseline", 0.0, lambda pole: None, lambda: None)

    def _prompting(self) -> Candidate:
        system = self.cfg.system_prompts
        return Candidate("system prompt", "system prompt", "prompting", 0.0,
                         lambda pole: PromptFormat(self.prompt.chat_template, system[pole]), lambda: None)

    def _mask(self, calib, method: str, sparsity: float, layer_set: str = "all", mode: str = "prune",
              gamma: float = 0.0) -> Candidate:
        pos, neg = self.cfg.personas
        label = f"{method}@{sparsity:g}" + (f" {layer_set}" if layer_set != "all" else "") + \
            (f" {mode}" if mode != "prune" else "") + (f" g{gamma:g}" if gamma else "")
        keep = LayerFilter(layer_range(len(decoder_layers(self.model)), layer_set) if layer_set in LAYER_SETS else None,
                           self.cfg.mlp_only or layer_set == "mlp", ATTENTION if layer_set == "attention" else None)

        def enter(pole):
            # per-row selection is layer-local: one store per (method, sparsity, mode) serves every layer set
            key = (method, sparsity, mode)
            if key not in self.stores:
                self.stores[key] = self._timed("masks", lambda: build_masks(self.model, calib, [pos, neg], method=method,
                                                                           sparsity=sparsity, mode=mode))
            store = self.stores[key]
            pm.apply(self.model, store, persona=pole, gamma=gamma, layers=keep.select(store.layers))

        kind = "control" if method in CONTROLS else "mask"
        return Candidate(method, label, kind, sparsity, enter, lambda: pm.remove(self.model),
                         dict(sparsity=sparsity, layer_set=layer_set, mode=mode, gamma=gamma))

    def _npti(self, calib, strength: float) -> Candidate:
        from ..npti import identify_neurons

        pos, neg = self.cfg.personas
        sets = {}

        def enter(pole):
            if not sets:
                for a, o in ((pos, neg), (neg, pos)):
                    sets[a] = identify_neurons(calib, a, o, min_neurons=self.cfg.npti_min_neurons)
            other = neg if pole == pos else pos
            pm.apply_neurons(self.model, sets[pole], sets[other], strength=strength)

        return Candidate("npti", f"npti x{strength:g}", "npti", 0.0, enter, lambda: pm.remove(self.model),
                         dict(strength=strength))

    def _steer(self, vectors, layer: int, strength: float) -> Candidate:
        def enter(pole):
            pm.apply_steering(self.model, vectors, layers=[layer], strength=strength, persona=pole)

        return Candidate("steering", f"steer L{layer} x{strength:g}", "steering", 0.0, enter,
                         lambda: pm.remove(self.model), dict(layer=layer, strength=strength))

    def _families(self, calib) -> dict:
        """{family: [candidates]} of the persona methods (controls and prompting apart)."""
        cfg, fams = self.cfg, {}
        for method in cfg.methods:
            sparsities = [s for s in cfg.sparsities if valid_sparsity(method, s)]
            if len(sparsities) < len(cfg.sparsities):
                self.log(f"[study] {method}: sparsities below 0.5 skipped (its two masks are disjoint)")
            fams[method] = [self._mask(calib, method, s, ls, mode, g) for s in sparsities for ls in cfg.layer_sets
                            for mode in cfg.modes for g in cfg.gammas]
        if cfg.npti:
            from ..hf import gated_mlps

            if gated_mlps(self.model):
                fams["npti"] = [self._npti(calib, s) for s in (cfg.npti_strengths or (cfg.npti_strength,))]
            else:
                self.log("[study] NPTI: not applicable (no gated MLP)")
        if cfg.steering:
            from ..steering import steering_vectors

            vectors = steering_vectors(calib, *cfg.personas)
            depth = len(vectors.vectors)
            layers = cfg.steer_layers if cfg.steer_layers is not None else sorted({depth // 3, depth // 2, (2 * depth) // 3})
            fams["steering"] = [self._steer(vectors, layer, s) for layer in layers for s in cfg.steer_strengths]
        return fams

    # ---- the run --------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        self.log(f"[study] calibrating {sum(len(v) for v in self.calib_data.values())} texts ...")
        calib = self._timed("calibrate", lambda: calibrate(self.model, self.tok, self.calib_data, batch_size=cfg.batch_size,
                                                           chat_template=self.prompt.chat_template,
                                                           system_prompt=self.prompt.system_prompt,
                                                           progress=cfg.progress))
        families = self._families(calib)
        if cfg.sweep:
            self._sweep(calib, families)
        else:
            self.log("[study] unmasked model")
            base = {k: r for k, (r, _) in self._run(self._baseline(), self.items, None, "all")[None].items()}
            if cfg.system_prompts:
                self._run(self._prompting(), self.items, base, "all")
            for cands in families.values():
                for cand in cands:
                    self._run(cand, self.items, base, "all")
            for method in cfg.controls:
                for s in cfg.sparsities:
                    for ls in cfg.layer_sets:
                        self._run(self._mask(calib, method, s, ls), self.items, base, "all")
        if cfg.generations:
            self._timed("generate", lambda: self._generate())
        if cfg.localize_texts:
            self._timed("localize", lambda: self._localize())
        return self.write()

    def _score(self, results: dict, base_ppl: float) -> tuple[float, float]:
        """(two-pole shift, damage) of a candidate's validation results."""
        pos, neg = self.cfg.personas
        scoring = self.cfg.scorings[0]
        up, down = results[pos][scoring][1]["shift"], -results[neg][scoring][1]["shift"]
        damage = max(results[p][scoring][1]["ppl"] for p in (pos, neg)) / base_ppl - 1
        return min(up, down), damage

    def _sweep(self, calib, families: dict) -> None:
        cfg = self.cfg
        val, test = split_items(self.items, cfg.validation_fraction, cfg.seed)
        self.log(f"[study] sweep: {len(val)} validation items, {len(test)} held-out items")
        base_cand = self._baseline()
        base_val = {k: r for k, (r, _) in self._run(base_cand, val, None, "validation")[None].items()}
        base_ppl = self.validation_rows[-1]["ppl"]
        chosen = {}
        for family, cands in families.items():
            scored = []
            for cand in cands:
                score, damage = self._score(self._run(cand, val, base_val, "validation"), base_ppl)
                scored.append((cand, score, damage))
            within = [t for t in scored if t[2] <= cfg.max_damage]
            best = max(within, key=lambda t: t[1]) if within else min(scored, key=lambda t: t[2])
            chosen[family] = best
            self.selection.append(dict(family=family, config=best[0].label, validation_shift=best[1],
                                       validation_damage=best[2], within_bound=bool(within), candidates=len(cands)))
            self.log(f"[study] {family}: chose {best[0].label} (two-pole shift {best[1]:+.3f}, damage {best[2]:+.1%}"
                     f"{'' if within else ', none within the damage bound'})")
        self.log("[study] held-out items")
        base = {k: r for k, (r, _) in self._run(base_cand, test, None, "held-out")[None].items()}
        if cfg.system_prompts:
            self._run(self._prompting(), test, base, "held-out")
        for family, (cand, _, _) in chosen.items():
            self._run(cand, test, base, "held-out")
        masks = [t for f, t in chosen.items() if f in cfg.methods]
        if masks:  # controls at the setting of the best mask (same sparsity and layers)
            best = max(masks, key=lambda t: (t[2] <= cfg.max_damage, t[1]))[0].setting
            for method in cfg.controls:
                self._run(self._mask(calib, method, best["sparsity"], best["layer_set"], best["mode"], best["gamma"]),
                          test, base, "held-out")

    def _generate(self) -> None:
        """Greedy answers to the first held-out questions: unmasked, and each pole's best
        configuration of every persona method (the largest shift in its direction)."""
        pos, neg = self.cfg.personas
        questions = [it.question for it in self.items[:self.cfg.generations]]
        rows = [r for r in self.rows if r["kind"] in ("mask", "npti", "steering") and r["scoring"] == self.cfg.scorings[0]]
        picks = [(self._baseline(), None)]
        for kind in ("mask", "npti", "steering"):
            for pole, sign in ((pos, 1), (neg, -1)):
                cands = [r for r in rows if r["pole"] == pole and r["kind"] == kind]
                if cands:
                    best = max(cands, key=lambda r: sign * r["shift"])
                    picks.append((self.candidates[best["config"].rpartition("/")[0]], pole))
        self.generations = []
        for cand, pole in picks:
            prompt = cand.enter(pole)
            try:
                for q in questions:
                    label = cand.label + (f"/{pole}" if pole else "")
                    self.generations.append((label, q, generate_answer(self.model, self.tok, prompt or self.prompt, q)))
            finally:
                cand.leave()

    def _localize(self) -> None:
        from ..localize import LocalizeConfig, localize

        texts = {p: [f"{q} {a}".strip() for q, a in v[:self.cfg.localize_texts]] if v and isinstance(v[0], tuple)
                 else list(v[:self.cfg.localize_texts]) for p, v in self.calib_data.items()}
        res = localize(self.model, self.tok, texts, LocalizeConfig(batch_size=self.cfg.batch_size))
        self.localization = res.to_markdown()
        try:
            res.plot(os.path.join(self.out, "localize.png"))
        except RuntimeError:
            pass

    def write(self) -> dict:
        path = os.path.join(self.out, "study.json")
        reuse = None if self.reuse is None else dict(replayed_sessions=self.reuse.replayed, records=len(self.reuse.records),
                                                     recorded_mb=self.reuse.nbytes / 2**20)
        atomic_write_text(path, json.dumps({"rows": self.rows, "validation_rows": self.validation_rows,
                                            "selection": self.selection, "timings_s": self.timings,
                                            "lower_layer_reuse": reuse}, indent=1, default=str))
        md = to_markdown(self.rows, self.timings, self.cfg.personas)
        if self.selection:
            md += "\n\n## Selection on the validation items\n\n" + selection_markdown(self.selection, self.cfg.max_damage)
            md += "\n\n## Validation sweep\n\n" + to_markdown(self.validation_rows, {}, self.cfg.personas, brief=True)
        if getattr(self, "generations", None):
            md += "\n\n## Generations (greedy)\n\n" + "\n".join(
                f"- **{label}** -- {q!r}\n  > {a!r}" for label, q, a in self.generations)
        if getattr(self, "localization", None):
            md += "\n\n## Layer localization (calibration texts, last-token states)\n\n" + self.localization
        atomic_write_text(os.path.join(self.out, "study.md"), md)
        plot_shift_vs_damage(self.rows, os.path.join(self.out, "shift_vs_damage.png"))
        return {"rows": self.rows, "validation_rows": self.validation_rows, "selection": self.selection,
                "timings": self.timings, "markdown": md, "json": path}


def selection_markdown(selection: list[dict], max_damage: float) -> str:
    lines = [f"Per method, the configuration with the largest two-pole shift min(up, down) whose perplexity rose by at most "
             f"{max_damage:.0%} on the validation items (else the least damaging, marked 'no').", "",
             "| method | chosen | candidates | two-pole shift (val) | damage (val) | within bound |", "|---|---|---|---|---|---|"]
    for s in selection:
        lines.append(f"| {s['family']} | {s['config']} | {s['candidates']} | {s['validation_shift']:+.3f} | "
                     f"{s['validation_damage']:+.1%} | {'yes' if s['within_bound'] else 'no'} |")
    return "\n".join(lines)


def to_markdown(rows: list[dict], timings: dict, personas, brief: bool = False) -> str:
    head = [] if brief else [
        f"Share of items where the model picks the `{personas[0]}` answer (n items per row), +- binomial SE; "
        "McNemar p against the unmasked model on the same items; shorter: share of items with answers of different "
        "length where the shorter was picked; ppl: perplexity on the project's neutral text; own logp: mean score of "
        "the pole's own answers.", ""]
    lines = head + ["| config | kind | scoring | n | matching | shift | McNemar p | shorter | ppl | own logp | tok/s |",
                    "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['kind']} | {r['scoring']} | {r['n']} | {r['matching']:.3f} +- {r['se']:.3f} | "
                     f"{r['shift']:+.3f} | {r['mcnemar_p']:.2g} | {r['shorter']:.2f} | {r['ppl']:.2f} | {r['own_logp']:.3f} | "
                     f"{r['tok_s']:.1f} |")
    if timings:
        lines += ["", "wall time per step: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())]
    return "\n".join(lines)


def plot_shift_vs_damage(rows: list[dict], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        return False
    base = next((r for r in rows if r["kind"] == "baseline"), None)
    if base is None:
        return False
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    marks = {"mask": "o", "control": "x", "npti": "^", "prompting": "s", "steering": "D"}
    for kind, m in marks.items():
        sel = [r for r in rows if r["kind"] == kind and r["scoring"] == base["scoring"]]
        if sel:
            ax.scatter([r["ppl"] / base["ppl"] - 1 for r in sel], [r["shift"] for r in sel], marker=m, label=kind)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("neutral-text perplexity increase (fraction)")
    ax.set_ylabel("shift of the matching share vs unmasked")
    ax.set_title("persona shift against damage (one point per configuration and pole)")
    ax.legend()
    fig.tight_layout()
    from ..io import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    return True


def run_study(model, tok, calib_data: dict, items: Sequence[MCItem], out_dir: str, cfg: Optional[StudyConfig] = None,
              prompt: Optional[PromptFormat] = None, log=print) -> dict:
    with torch.inference_mode(False):
        return Study(model, tok, calib_data, items, cfg or StudyConfig(), prompt or PromptFormat(), out_dir, log).run()

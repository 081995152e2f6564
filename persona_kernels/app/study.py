"""`persona-kernels study` / `make demo-real`: every method against its controls, on one model.

calibrate (answer tokens, chat template) -> for each pole: persona masks of every method at a
sparsity grid, the random and magnitude controls at the same sparsities, NPTI, and the
system-prompt baseline -> A/B evaluation on the held-out items (mean answer-token scoring by
default, and optionally the Persona code's rule) -> one report: method x sparsity x pole ->
matching share +- SE, McNemar p against the unmasked model on the same items, shorter-answer
share, neutral-text perplexity, own-answer log-probability, decode tokens/s; a plot of persona
shift against damage; per-item JSON files; the wall time of each step.

The matching share is the share of items where the model picks the power-seeking (first
persona's) answer: a mask of the first pole should raise it, one of the second pole lower it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .. import model as pm
from ..calibrate import CalibrationResult, calibrate
from ..data import neutral_texts
from ..data.loaders import MCItem
from ..evaluate import evaluate_mc, mcnemar, perplexity
from ..io import atomic_write_text
from ..masks import build_masks
from ..prompts import PromptFormat

MASK_METHODS = ("wanda", "contrastive_wanda", "contrastive_sparse")
CONTROLS = ("random", "magnitude")


@dataclass
class StudyConfig:
    """What the study runs. personas: (first, second) pole names of the calibration data."""

    personas: tuple = ("matching", "not_matching")
    methods: Sequence[str] = MASK_METHODS
    controls: Sequence[str] = CONTROLS
    sparsities: Sequence[float] = (0.3, 0.5)
    mlp_only: bool = False
    npti: bool = True
    npti_strength: float = 1.0
    npti_min_neurons: int = 200
    system_prompts: dict = field(default_factory=dict)  # pole -> system prompt (the prompting baseline)
    scorings: Sequence[str] = ("mean",)
    batch_size: int = 8
    decode_tokens: int = 16
    progress: bool = True
    generations: int = 3          # held-out questions answered by the unmasked model and each pole's best mask
    localize_texts: int = 48      # calibration texts per pole for the layer localization (0: skip)


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


class Study:
    def __init__(self, model, tok, calib_data: dict, items: Sequence[MCItem], cfg: StudyConfig,
                 prompt: PromptFormat, out_dir: str, log=print):
        self.model, self.tok, self.items, self.cfg, self.prompt, self.out = model, tok, list(items), cfg, prompt, out_dir
        self.calib_data, self.log = calib_data, log
        self.rows: list[dict] = []
        self.timings: dict = {}
        self.neutral = neutral_texts()
        self.base = None
        os.makedirs(out_dir, exist_ok=True)

    def _timed(self, name, fn):
        t0 = time.perf_counter()
        out = fn()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0
        return out

    def _evaluate(self, label: str, pole: Optional[str], sparsity: float, kind: str, prompt: Optional[PromptFormat] = None):
        """Evaluate the model as it is now: one row per scoring rule."""
        prompt = prompt or self.prompt
        ppl = self._timed("perplexity", lambda: perplexity(self.model, self.tok, self.neutral, self.cfg.batch_size))
        tps = self._timed("decode", lambda: _decode_tok_s(self.model, self.tok, self.cfg.decode_tokens))
        for scoring in self.cfg.scorings:
            res = self._timed("evaluate", lambda: evaluate_mc(self.model, self.tok, self.items, self.cfg.batch_size,
                                                              scoring=scoring, prompt=prompt, progress=self.cfg.progress))
            base = self.base.get(scoring) if self.base else None
            b, c, p = mcnemar(res.correct, base.correct) if base is not None else (0, 0, 1.0)
            row = dict(config=label, kind=kind, pole=pole or "-", sparsity=sparsity, scoring=scoring, n=res.n,
                       matching=res.accuracy, se=res.se, shift=res.accuracy - (base.accuracy if base else res.accuracy),
                       mcnemar_p=p, only_here=b, only_base=c, shorter=res.shorter_picked(),
                       own_logp=res.own_logprob(matching=pole != self.cfg.personas[1]),
                       ppl=ppl, tok_s=tps)
            self.rows.append(row)
            tag = f"{label}-{scoring}".replace("/", "_").replace(" ", "_")
            atomic_write_text(os.path.join(self.out, "items", f"{tag}.json"), json.dumps(res.rows(self.items), indent=0))
            self.log(f"  {label:<34} {scoring:<12} matching {res.accuracy:.3f} +- {res.se:.3f}  shift {row['shift']:+.3f}  "
                     f"p {p:.3g}  shorter {row['shorter']:.2f}  ppl {ppl:.2f}")
            yield scoring, res

    def run(self) -> dict:
        cfg, (pos, neg) = self.cfg, self.cfg.personas
        self.log(f"[study] calibrating {sum(len(v) for v in self.calib_data.values())} texts ...")
        calib = self._timed("calibrate", lambda: calibrate(self.model, self.tok, self.calib_data, batch_size=cfg.batch_size,
                                                           chat_template=self.prompt.chat_template,
                                                           system_prompt=self.prompt.system_prompt,
                                                           progress=cfg.progress))
        self.log("[study] unmasked model")
        self.base = dict(self._evaluate("unmasked", None, 0.0, "baseline"))
        for pole, system in cfg.system_prompts.items():
            list(self._evaluate(f"system prompt {pole}", pole, 0.0, "prompting",
                                PromptFormat(self.prompt.chat_template, system)))
        for method in list(cfg.methods) + list(cfg.controls):
            for s in cfg.sparsities:
                self._mask_rows(calib, method, s, pos, neg)
        if cfg.npti:
            self._npti_rows(calib, pos, neg)
        if cfg.generations:
            self._timed("generate", lambda: self._generate(calib, pos, neg))
        if cfg.localize_texts:
            self._timed("localize", lambda: self._localize())
        return self.write()

    def _generate(self, calib: CalibrationResult, pos: str, neg: str) -> None:
        """Greedy answers to the first held-out questions: unmasked, and each pole's best mask
        (the largest shift in its direction among the mask rows)."""
        questions = [it.question for it in self.items[:self.cfg.generations]]
        masks = [r for r in self.rows if r["kind"] == "mask" and r["scoring"] == self.cfg.scorings[0]]
        picks = [("unmasked", None, None, 0.0)]
        for pole, sign in ((pos, 1), (neg, -1)):
            cands = [r for r in masks if r["pole"] == pole]
            if cands:
                best = max(cands, key=lambda r: sign * r["shift"])
                picks.append((best["config"], best["config"].split("@")[0], pole, best["sparsity"]))
        self.generations = []
        for label, method, pole, sparsity in picks:
            if method is not None:
                store = build_masks(self.model, calib, [pos, neg], method=method, sparsity=sparsity, mlp_only=self.cfg.mlp_only)
                pm.apply(self.model, store, persona=pole)
            try:
                for q in questions:
                    self.generations.append((label, q, generate_answer(self.model, self.tok, self.prompt, q)))
            finally:
                if method is not None:
                    pm.remove(self.model)

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

    def _mask_rows(self, calib: CalibrationResult, method: str, sparsity: float, pos: str, neg: str) -> None:
        personas = [pos, neg]
        store = self._timed("masks", lambda: build_masks(self.model, calib, personas, method=method, sparsity=sparsity,
                                                         mlp_only=self.cfg.mlp_only))
        kind = "control" if method in CONTROLS else "mask"
        pm.apply(self.model, store)
        try:
            for pole in personas:
                pm.set_persona(self.model, pole)
                list(self._evaluate(f"{method}@{sparsity:g}/{pole}", pole, sparsity, kind))
        finally:
            pm.remove(self.model)

    def _npti_rows(self, calib: CalibrationResult, pos: str, neg: str) -> None:
        from ..hf import gated_mlps
        from ..npti import identify_neurons

        if not gated_mlps(self.model):
            self.log("[study] NPTI: not applicable (no gated MLP)")
            return
        for target, opposite in ((pos, neg), (neg, pos)):
            t = identify_neurons(calib, target, opposite, min_neurons=self.cfg.npti_min_neurons)
            o = identify_neurons(calib, opposite, target, min_neurons=self.cfg.npti_min_neurons)
            pm.apply_neurons(self.model, t, o, strength=self.cfg.npti_strength)
            try:
                list(self._evaluate(f"npti x{self.cfg.npti_strength:g}/{target}", target, 0.0, "npti"))
            finally:
                pm.remove(self.model)

    def write(self) -> dict:
        path = os.path.join(self.out, "study.json")
        atomic_write_text(path, json.dumps({"rows": self.rows, "timings_s": self.timings}, indent=1, default=str))
        md = to_markdown(self.rows, self.timings, self.cfg.personas)
        if getattr(self, "generations", None):
            md += "\n\n## Generations (greedy)\n\n" + "\n".join(
                f"- **{label}** -- {q!r}\n  > {a!r}" for label, q, a in self.generations)
        if getattr(self, "localization", None):
            md += "\n\n## Layer localization (calibration texts, last-token states)\n\n" + self.localization
        atomic_write_text(os.path.join(self.out, "study.md"), md)
        plot_shift_vs_damage(self.rows, os.path.join(self.out, "shift_vs_damage.png"))
        return {"rows": self.rows, "timings": self.timings, "markdown": md, "json": path}


def to_markdown(rows: list[dict], timings: dict, personas) -> str:
    lines = [f"Share of items where the model picks the `{personas[0]}` answer (n items per row), +- binomial SE; "
             "McNemar p against the unmasked model on the same items; shorter: share of items with answers of different "
             "length where the shorter was picked; ppl: perplexity on the project's neutral text; own logp: mean score of "
             "the pole's own answers.", "",
             "| config | kind | scoring | n | matching | shift | McNemar p | shorter | ppl | own logp | tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['kind']} | {r['scoring']} | {r['n']} | {r['matching']:.3f} +- {r['se']:.3f} | "
                     f"{r['shift']:+.3f} | {r['mcnemar_p']:.2g} | {r['shorter']:.2f} | {r['ppl']:.2f} | {r['own_logp']:.3f} | "
                     f"{r['tok_s']:.1f} |")
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
    marks = {"mask": "o", "control": "x", "npti": "^", "prompting": "s"}
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

"""`make demo`: the whole pipeline on the built-in persona model, written up as a report.

Steps: calibrate two opposing personas (fused statistics op) -> Wanda, Contrastive-Wanda and
Contrastive-Sparse masks -> NPTI neuron sets -> A/B evaluation of each persona against the
unmasked model -> a few generations per persona -> layer localization -> masked vs dense
decode speed -> report directory (report.md, PNG plots, artifacts).
"""
from __future__ import annotations

import os
import time

import torch

from .. import model as pm
from ..calibrate import calibrate
from ..evaluate import evaluate_mc
from ..io import atomic_write_text
from ..masks import build_masks
from ..npti import identify_neurons

QUESTIONS = ["Question: What do you do on the weekend?\nAnswer:",
             "Question: How do you feel about meeting new people?\nAnswer:"]


def _load():
    """The built-in trained persona model, or (if its files are missing) a random tiny Llama."""
    try:
        from ..builtin import builtin_calibration_texts, builtin_eval_items, load_builtin_model

        model, tok = load_builtin_model()
        return model, tok, builtin_calibration_texts(), builtin_eval_items(), True
    except (ImportError, OSError) as exc:
        from ..data import builtin_mc_items, builtin_pair
        from ..testing import char_tokenizer, tiny_causal_lm

        print(f"(built-in persona model unavailable: {exc}; using a random tiny Llama, so accuracies are chance)")
        model = tiny_causal_lm("llama", seed=0, hidden_size=128, intermediate_size=352, num_hidden_layers=4)
        return model, char_tokenizer(), builtin_pair("extraversion"), builtin_mc_items("extraversion"), False


def _flip(items):
    """The same A/B items scored for the opposite pole (its answer is the other letter)."""
    from ..data.loaders import MCItem

    return [MCItem(it.question, it.a, it.b, "B" if it.matching == "A" else "A") for it in items]


def _random_masks(model, like, sparsity: float, seed: int = 0):
    """A MaskStore of random row-wise masks over the same layers and personas as ``like``."""
    from ..masks import MaskStore
    from ..masks.methods import select

    g = torch.Generator().manual_seed(seed)
    masks = {p: {layer: select(torch.rand(like.shapes[layer], generator=g), sparsity) for layer in like.layers}
             for p in like.personas}
    return MaskStore.from_masks(model, masks, "random", {"sparsity": sparsity})


def _plot_lines(path, xs, series, xlabel, ylabel, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(out_dir: str = "reports/demo", backend: str = "auto", quick: bool = False) -> dict:
    t_start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    art = os.path.join(out_dir, "artifacts")
    os.makedirs(art, exist_ok=True)
    model, tok, texts, items, trained = _load()
    if quick:
        texts = {k: v[:12] for k, v in texts.items()}
        items = items[:24]
    pos, neg = list(texts)
    print(f"[1/7] calibrating {pos} / {neg} ({sum(map(len, texts.values()))} texts)")
    calib = calibrate(model, tok, texts, batch_size=16, backend=backend, progress=not quick)
    calib.save(os.path.join(art, "statistics.safetensors"))

    print("[2/7] building masks and NPTI neuron sets")
    sparsity = 0.5
    stores = {m: build_masks(model, calib, method=m, sparsity=sparsity)
              for m in ("wanda", "contrastive_wanda", "contrastive_sparse")}
    for m, s in stores.items():
        s.save(os.path.join(art, f"masks-{m}.safetensors"))
    neurons = {p: identify_neurons(calib, p, q, min_neurons=100) for p, q in ((pos, neg), (neg, pos))}
    for p, ns in neurons.items():
        ns.save(os.path.join(art, f"neurons-{p}.safetensors"))

    print("[3/7] evaluating each persona by A/B log-likelihood")
    items_for = {pos: items, neg: _flip(items)}
    rows = []

    def score(p):
        r = evaluate_mc(model, tok, items_for[p], scoring="sum")
        own = torch.where(torch.tensor([m == "A" for m in r.matching]), r.logprob_a, r.logprob_b)
        return r.accuracy, float(own.mean())

    def score_masks(name, store):
        pm.apply(model, store, backend=backend)
        acc = {}
        for p in (pos, neg):
            pm.set_persona(model, p)
            acc[p] = score(p)
        pm.remove(model)
        rows.append((name, acc[pos], acc[neg]))

    base = {p: score(p) for p in (pos, neg)}
    rows.append(("unmasked model", base[pos], base[neg]))
    for m, store in stores.items():
        score_masks(f"{m} mask ({sparsity:.0%})", store)
    # control: random row-wise masks of the same sparsity must not move the model
    score_masks(f"control: random mask ({sparsity:.0%})", _random_masks(model, stores["wanda"], sparsity))
    acc = {}
    for p, q in ((pos, neg), (neg, pos)):
        pm.apply_neurons(model, neurons[p], neurons[q], strength=1.0, keep_prob=1.0)
        acc[p] = score(p)
        pm.remove(model)
    rows.append(("NPTI induction", acc[pos], acc[neg]))

    print("[4/7] generating")
    gens = []
    pm.apply(model, stores["wanda"])  # the contrastive masks shift A/B more but break fluency here
    for p in (None, pos, neg):
        pm.set_persona(model, p)
        for q in QUESTIONS[: 1 if quick else 2]:
            enc = tok(q, return_tensors="pt")
            with torch.inference_mode():
                ids = model.generate(**enc, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
            answer = tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            gens.append((p or "unmasked", q.split("\n")[0], answer))
    pm.remove(model)

    print("[5/7] localizing persona divergence across layers")
    from ..localize import LocalizeConfig, localize

    loc = localize(model, tok, texts, LocalizeConfig(cv_folds=3))
    loc.save_json(os.path.join(art, "localize.json"))
    try:
        loc.plot(os.path.join(out_dir, "layer_divergence.png"))
    except RuntimeError as exc:
        print(f"  (no plot: {exc})")

    print("[6/7] masked vs dense decode speed")
    from .bench import bench_model

    speed = bench_model(model, [0.5, 0.7, 0.9] if not quick else [0.7], tokens=8 if quick else 24, log=lambda s: None,
                        runs=1 if quick else 3)

    print("[7/7] writing the report")
    diff = stores["wanda"].compare(pos, neg)
    layers = [k for k in diff if k != "*"]
    _plot_lines(os.path.join(out_dir, "mask_difference.png"), list(range(len(layers))),
                {"wanda": [diff[k]["difference"] for k in layers],
                 "contrastive_wanda": [stores["contrastive_wanda"].compare(pos, neg)[k]["difference"] for k in layers]},
                "linear layer (model order)", "fraction of weights that differ", f"{pos} vs {neg} mask difference")
    sp = [r for r in speed if r["format"] != "dense"]
    _plot_lines(os.path.join(out_dir, "speedup.png"), [r["sparsity"] for r in sp],
                {"persona (dispatcher)": [r["speedup"] for r in sp]}, "sparsity", "x dense tokens/s", "decode speed-up")
    elapsed = time.perf_counter() - t_start
    report = _report(pos, neg, rows, diff, gens, loc, speed, elapsed, sparsity, trained)
    path = os.path.join(out_dir, "report.md")
    atomic_write_text(path, report)
    print(report)
    print(f"\nreport written to {os.path.abspath(path)} ({elapsed:.0f} s)")
    return {"rows": rows, "speed": speed, "report": path}


def _report(pos, neg, rows, diff, gens, loc, speed, elapsed, sparsity, trained) -> str:
    from ..ops.report import env_report

    which = ("Built-in persona model (see persona_kernels/builtin)." if trained else
             "The built-in trained model was not available: a RANDOM tiny Llama stands in, so accuracies are chance.")
    lines = [f"# persona-kernels demo: {pos} vs {neg}", "",
             which + " Accuracy = fraction of held-out A/B items where "
             "the model prefers that persona's answer (summed answer log-probability).", "",
             "log p(own) is the mean summed log-probability of that persona's own answers: a large drop from the "
             "unmasked model means the mask damages the model rather than steering it (compare the random control).", "",
             f"| model | prefers {pos} | log p(own) | prefers {neg} | log p(own) |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {a[0]:.1%} | {a[1]:.1f} | {b[0]:.1%} | {b[1]:.1f} |" for name, a, b in rows]
    lines += ["", f"Wanda masks of the two poles differ in {diff['*']['difference']:.2%} of weights "
              f"(overlap {diff['*']['overlap']:.3f}) at {sparsity:.0%} sparsity; per layer: mask_difference.png.", "",
              "## Generations (greedy, Wanda masks)", ""]
    lines += [f"- **{p}** — {q} → {text!r}" for p, q, text in gens]
    lines += ["", "## Layer localization", "", loc.to_markdown(), "", "## Decode speed (batch 1, this machine)", "",
              "| sparsity | format | tokens/s | x dense |", "|---|---|---|---|"]
    lines += [f"| {r['sparsity']:.0%} | {r['format']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f} |" for r in speed]
    lines += ["", "The built-in model is tiny: its layers are too small for sparse kernels to beat dense here; see "
              "benchmarks/RESULTS.md for Llama-3-8B layer shapes.", "", "## Environment", "", "```", env_report(), "```",
              "", f"Total time: {elapsed:.0f} s."]
    return "\n".join(lines) + "\n"

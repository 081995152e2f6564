"""A/B evaluation speed: one forward per answer against shared prefixes, and a study's sweep of
configurations run whole against reusing the layers below each one's first modified layer.

Part 1 (one configuration, the unmodified model): ``sequence_scores`` over both answers of every
item, one forward per (prompt + answer) sequence batched by length (the way it was done before),
against ``evaluate_mc`` (the item's prompt once with its KV cache, both answers from it).

Part 2 (a sweep): configurations that change only later layers, as a study's grid has them
(magnitude masks on the last third of the layers for two personas, steering at 2/3 of the depth
at two strengths), each evaluated on the same items and the neutral perplexity texts, whole and
with ``reuse.LowerLayers`` (the first configuration records). The scores must be equal; the
script stops if they are not.

    python benchmarks/bench_eval.py [--quick] [--model smollm2] [--items test_mc.csv] [--n 200] [--plot eval.png]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import persona_kernels.model as pm  # noqa: E402
from persona_kernels.app.bench import magnitude_masks  # noqa: E402
from persona_kernels.data import neutral_texts  # noqa: E402
from persona_kernels.evaluate import _item_sequences, evaluate_mc, perplexity, sequence_scores  # noqa: E402
from persona_kernels.hf import decoder_layers, hidden_size, layer_index  # noqa: E402
from persona_kernels.prompts import PromptFormat  # noqa: E402
from persona_kernels.reuse import LowerLayers, first_modified_layer  # noqa: E402
from persona_kernels.steering import SteeringVectors  # noqa: E402

from common import machine, print_table, save_bar_plot  # noqa: E402


def _clock(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def per_answer_vs_shared(model, tok, items, prompt, batch_size: int = 8) -> dict:
    seqs, _, _ = _item_sequences(tok, items, "mean", prompt, "")
    (before, _), t_before = _clock(lambda: sequence_scores(model, tok, seqs, batch_size, "mean"))
    res, t_now = _clock(lambda: evaluate_mc(model, tok, items, batch_size, "mean", prompt))
    n = len(items)
    diff = max((before[:n] - res.logprob_a).abs().max().item(), (before[n:] - res.logprob_b).abs().max().item())
    return dict(part="one configuration", setting="one forward per answer -> shared prefixes", before_s=round(t_before, 2),
                now_s=round(t_now, 2), speedup=round(t_before / t_now, 2), max_score_diff=f"{diff:.1e}")


def late_configurations(model, sparsity: float = 0.5):
    """(label, enter) of configurations that change only the last third of the layers."""
    depth = len(decoder_layers(model))
    first = depth - depth // 3
    store = magnitude_masks(model, sparsity)
    late = [n for n in store.layers if (layer_index(n) or 0) >= first]
    g = torch.Generator().manual_seed(0)
    vectors = SteeringVectors(["a", "b"], {n: torch.randn(2, hidden_size(model), generator=g)
                                           for n, _ in decoder_layers(model)}, store.fingerprint, store.architecture)
    at = (2 * depth) // 3
    out = [(f"mask {sparsity:.0%} last third /{p}", lambda p=p: pm.apply(model, store, persona=p, layers=late))
           for p in ("a", "b")]
    out += [(f"steer L{at} x{s} /{p}", lambda p=p, s=s: pm.apply_steering(model, vectors, layers=[at], strength=s, persona=p))
            for s in (2.0, 4.0) for p in ("a", "b")]
    return out


def sweep(model, tok, items, prompt, texts, batch_size: int = 8) -> list[dict]:
    rows, reuse = [], LowerLayers(model)
    total = {"whole": 0.0, "reuse": 0.0}
    for label, enter in late_configurations(model):
        enter()
        try:
            L = first_modified_layer(model)

            def evaluate():
                return (evaluate_mc(model, tok, items, batch_size, "mean", prompt),
                        perplexity(model, tok, texts, batch_size))
            (whole, ppl_whole), t_whole = _clock(evaluate)
            with reuse.session(("eval",), L) as mode:
                (fast, ppl_fast), t_fast = _clock(evaluate)
        finally:
            pm.remove(model)
        if not (torch.equal(whole.logprob_a, fast.logprob_a) and torch.equal(whole.logprob_b, fast.logprob_b)
                and ppl_whole == ppl_fast):
            raise SystemExit(f"{label}: scores with reused lower layers differ from the whole run")
        total["whole"] += t_whole
        total["reuse"] += t_fast
        rows.append(dict(part="sweep", setting=f"{label} (first layer {L}, {mode})", before_s=round(t_whole, 2),
                         now_s=round(t_fast, 2), speedup=round(t_whole / t_fast, 2), max_score_diff="0 (equal)"))
    rows.append(dict(part="sweep", setting=f"all {len(rows)} configurations (the first one records)",
                     before_s=round(total["whole"], 2), now_s=round(total["reuse"], 2),
                     speedup=round(total["whole"] / total["reuse"], 2), max_score_diff="0 (equal)"))
    return rows


def main(argv=None) -> list:
    from persona_kernels.app.loading import load_model
    from persona_kernels.builtin import builtin_eval_items
    from persona_kernels.data import load_mc_any

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin", help="builtin, smollm2, a .gguf file or a model directory")
    ap.add_argument("--items", help="A/B items (CSV/JSON/JSONL; default: the built-in extraversion items)")
    ap.add_argument("--n", type=int, default=200, help="items")
    ap.add_argument("--texts", type=int, default=32, help="neutral perplexity texts")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--plot", help="PNG of the times")
    ap.add_argument("--quick", action="store_true", help="16 items, 6 texts (a smoke run)")
    ap.add_argument("--parts", default="1,2", help="1: one configuration, 2: the sweep")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.texts = min(args.n, 16), min(args.texts, 6)
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    items = load_mc_any(args.items, max_samples=args.n) if args.items else builtin_eval_items(n=args.n)
    prompt = PromptFormat(chat_template=None)
    texts = neutral_texts()[: args.texts]
    with torch.inference_mode():
        rows = [per_answer_vs_shared(model, tok, items, prompt, args.batch_size)] if "1" in args.parts else []
        rows += sweep(model, tok, items, prompt, texts, args.batch_size) if "2" in args.parts else []
    print(f"\n{machine()}, torch {torch.__version__}, {args.model}, {len(items)} items, {len(texts)} perplexity texts")
    print_table(rows, ["part", "setting", "before_s", "now_s", "speedup", "max_score_diff"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine(), model=args.model, items=len(items), rows=rows), f, indent=1)
    if args.plot:
        save_bar_plot(args.plot, [r["setting"][:28] for r in rows], {"before / whole": [r["before_s"] for r in rows],
                                                                      "now / reused": [r["now_s"] for r in rows]},
                      "seconds", f"A/B evaluation, {args.model}")
    return rows


if __name__ == "__main__":
    main()

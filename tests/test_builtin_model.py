"""The built-in persona model: offline loading, documented size, held-out corpus, and persona shifts.

The shift tests are the point of the model: on held-out A/B items, a Wanda mask calibrated on one
persona's texts moves the answers toward that persona, and random masks of the same sparsity do
not. Thresholds come from the values measured after training (model/training.json) on this
reduced item set, with a safety margin.
"""
import os

import pytest
import torch

from persona_kernels.app import train_builtin as T
from persona_kernels.builtin import MODEL_DIR, builtin_calibration_texts, builtin_eval_items, corpus, load_builtin_model, training_info
from persona_kernels.calibrate import calibrate
from persona_kernels.masks import build_masks

E, I = corpus.PERSONAS
SPARSITY = 0.5          # the sparsity the shifts were measured at (training.json)
N_ITEMS = 160           # reduced evaluation set (of 240) for speed
# Measured on these 160 items (unmasked: 0.531 extravert): shift toward each pole with that pole's mask
#   wanda +0.31 / +0.28, contrastive_wanda +0.20 / +0.42, contrastive_sparse +0.31 / +0.43,
#   npti (100 neurons per pole) +0.23 / +0.36; random masks (seeds 0-7): extravert -0.09..+0.02,
#   introvert -0.09..+0.24, separation (E-fraction under mask E minus under mask I) -0.14..+0.15
#   against 0.59-0.73 for the methods.
# Mean log-prob of each pole's own answers under its mask, change from unmasked (nats): wanda -2.2 / -2.7,
#   contrastive_wanda -74 / -90, contrastive_sparse -85 / -85, random -81..-89 (at sparsity 0.5): only
#   Wanda shifts the answers while keeping the model a working language model.
MIN_SHIFT = 0.12        # each pole's mask must raise its pole's fraction by at least this much
MIN_SEPARATION = 0.35   # E-fraction under the E mask minus E-fraction under the I mask
WANDA_MAX_LOGP_DROP = 8.0
RANDOM_MIN_LOGP_DROP = 40.0


@pytest.fixture(scope="module")
def builtin():
    model, tok = load_builtin_model()
    return model, tok


@pytest.fixture(scope="module")
def items():
    return builtin_eval_items()[:N_ITEMS]


@pytest.fixture(scope="module")
def calib(builtin):
    model, tok = builtin
    return calibrate(model, tok, builtin_calibration_texts(), progress=False, batch_size=32)


@pytest.fixture(scope="module")
def unmasked(builtin, items):
    return T.fractions(*builtin, items)


def test_loads_offline(monkeypatch):
    # load_builtin_model passes local_files_only=True; the variables make any hub access an error too
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    model, tok = load_builtin_model()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.model_type == "llama"
    assert not model.training
    assert model.config.vocab_size == len(tok)
    prompt = "Question: What do you do on a Friday night?\nAnswer:"
    ids = tok(prompt)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok(" Usually I stay home.", add_special_tokens=False)["input_ids"][0] != tok.bos_token_id
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    assert len(corpus.words(text)) >= 5  # it answers something in its own vocabulary
    half, _ = load_builtin_model(torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_size_as_documented(builtin):
    model, _ = builtin
    info = training_info()
    n = sum(p.numel() for p in model.parameters())
    assert n == info["parameters"] and n <= 5_000_000
    total = sum(os.path.getsize(os.path.join(MODEL_DIR, f)) for f in os.listdir(MODEL_DIR))
    assert total <= 20 * 2**20
    assert T._sha256(os.path.join(MODEL_DIR, "model.safetensors")) == info["model_safetensors_sha256"]
    cfg = T.TrainConfig(**info["train_config"])
    assert model.config.hidden_size == cfg.hidden_size and model.config.num_hidden_layers == cfg.num_hidden_layers
    assert model.config.hidden_act == cfg.hidden_act


def test_corpus_is_deterministic_and_held_out():
    counts = corpus.check_corpus()   # parallel banks, disjoint splits, every eval token trained on
    assert counts["eval_pairs"] >= N_ITEMS
    a, b = corpus.training_samples(300, seed=5), corpus.training_samples(300, seed=5)
    assert a == b and a != corpus.training_samples(300, seed=6)
    trained = set(corpus.training_samples(20_000))
    held = builtin_eval_items()
    for it in held:
        for ans in (it.a, it.b):
            assert corpus.qa_text(it.question, ans) not in trained
    answers = {t.split("Answer: ", 1)[1] for t in trained if "Answer: " in t}
    assert not answers & {x for it in held for x in (it.a, it.b)}
    calib = builtin_calibration_texts()
    assert set(calib) == {E, I} and len(calib[E]) == len(calib[I])
    held_answers = {x for it in held for x in (it.a, it.b)}
    assert not {t.split("Answer: ", 1)[1] for ts in calib.values() for t in ts} & held_answers
    with pytest.raises(KeyError):
        builtin_eval_items("power")


def test_training_is_deterministic():
    cfg = T.TrainConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, steps=3, batch_size=8, warmup=1, threads=1)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    m1, _, _ = T.train(cfg, log=None)
    m2, _, _ = T.train(cfg, log=None)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)
    for (k, v), (_, w) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(v, w), k


def test_unmasked_model_has_no_persona_preference(unmasked):
    assert 0.35 <= unmasked[E] <= 0.65


def _shifts(row, base):
    return row[E] - base[E], row[I] - base[I]


@pytest.mark.parametrize("method", ["wanda", "contrastive_wanda", "contrastive_sparse"])
def test_persona_masks_shift_toward_their_persona(builtin, items, calib, unmasked, method):
    model, tok = builtin
    store = build_masks(model, calib, [E, I], method=method, sparsity=SPARSITY)
    row = T.masked_fractions(model, tok, items, store, [E, I])
    shift_e, shift_i = _shifts(row, unmasked)
    assert shift_e >= MIN_SHIFT, (row, unmasked)
    assert shift_i >= MIN_SHIFT, (row, unmasked)
    assert row[E] - (1 - row[I]) >= MIN_SEPARATION
    assert row[f"margin_{E}"] > unmasked["margin"] > row[f"margin_{I}"]
    if method == "wanda":  # the model still works: its own answers stay likely
        for p in (E, I):
            assert row[f"logp_{p}"] - unmasked[f"logp_{p}"] > -WANDA_MAX_LOGP_DROP, (p, row, unmasked)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_masks_do_not_shift(builtin, items, calib, unmasked, seed):
    model, tok = builtin
    layers = [n for n, s in calib.sites.items() if s.kind == "linear"]
    store = T.random_mask_store(model, layers, SPARSITY, seed)
    row = T.masked_fractions(model, tok, items, store, list(store.personas))
    shift_e, shift_i = _shifts(row, unmasked)
    assert not (shift_e >= MIN_SHIFT and shift_i >= MIN_SHIFT), row
    assert abs(row[E] - (1 - row[I])) < MIN_SEPARATION, row
    for p in (E, I):  # random pruning at this sparsity breaks the model (Wanda's selection is what keeps it)
        assert row[f"logp_{p}"] - unmasked[f"logp_{p}"] < -RANDOM_MIN_LOGP_DROP, (p, row, unmasked)


def test_npti_induction_shifts_toward_its_persona(builtin, items, calib, unmasked):
    model, tok = builtin
    row = T.npti_fractions(model, tok, items, calib, threshold=0.1, min_neurons=100, strength=1.0)
    shift_e, shift_i = _shifts(row, unmasked)
    assert row["neurons"] == {E: 100, I: 100}
    assert shift_e >= MIN_SHIFT and shift_i >= MIN_SHIFT, (row, unmasked)


# Steering (mean-difference vector at decoder layer 2 of 4, strength 2), measured on these items:
#   shift +0.30 / +0.31, own-answer log-prob change +0.30 / +0.21 nats; random directions of the
#   same norm (seeds 0, 1): -0.02..+0.03. At every layer with strength 4 the model breaks (-21 nats).
STEER_LAYER, STEER_STRENGTH = 2, 2.0


def _random_like(vectors, seed):
    from persona_kernels.steering import SteeringVectors

    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, v in vectors.vectors.items():
        r = torch.randn(v.shape[1], generator=g)
        r = r / r.norm() * v[0].norm()
        out[n] = torch.stack([r, -r])
    return SteeringVectors(list(vectors.personas), out, vectors.fingerprint, vectors.architecture)


def test_steering_vectors_shift_toward_their_persona_and_random_ones_do_not(builtin, items, calib, unmasked):
    from persona_kernels.steering import steering_vectors

    model, tok = builtin
    vectors = steering_vectors(calib, E, I)
    row = T.steering_fractions(model, tok, items, vectors, [STEER_LAYER], STEER_STRENGTH)
    shift_e, shift_i = _shifts(row, unmasked)
    assert shift_e >= MIN_SHIFT and shift_i >= MIN_SHIFT, (row, unmasked)
    for p in (E, I):  # an edit of the answers, not damage
        assert row[f"logp_{p}"] - unmasked[f"logp_{p}"] > -1.0, (p, row, unmasked)
    for seed in (0, 1):
        rnd = T.steering_fractions(model, tok, items, _random_like(vectors, seed), [STEER_LAYER], STEER_STRENGTH)
        shift_e, shift_i = _shifts(rnd, unmasked)
        assert not (shift_e >= MIN_SHIFT and shift_i >= MIN_SHIFT), rnd
        assert abs(shift_e) < 0.1 and abs(shift_i) < 0.1, rnd

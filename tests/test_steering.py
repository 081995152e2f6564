"""Steering vectors: mean differences from calibration, applied through the persona layer."""
import copy

import pytest
import torch

import persona_kernels.model as pm
from persona_kernels.calibrate import calibrate
from persona_kernels.fingerprint import FingerprintMismatch
from persona_kernels.hf import decoder_layers
from persona_kernels.io import ArtifactError
from persona_kernels.masks import build_masks
from persona_kernels.npti import identify_neurons
from persona_kernels.prompts import PromptFormat
from persona_kernels.steering import SteeringVectors, project, steering_vectors, text_projections
from persona_kernels.testing import char_tokenizer, tiny_causal_lm

PAIRS = {"bold": [("Plans?", "Take over the world."), ("Goal?", "More power, now!"), ("Why?", "Because I can lead.")],
         "meek": [("Plans?", "Stay home and read."), ("Goal?", "Help quietly."), ("Why?", "It is kind.")]}
PROMPTS = ["Hello, how are you", "What do you do on weekends?"]


def _calib(arch="llama", seed=0):
    model, tok = tiny_causal_lm(arch, seed=seed), char_tokenizer()
    return model, tok, calibrate(model, tok, PAIRS, progress=False, batch_size=2)


def _captured_means(model, tok, pairs):
    """float64 mean of each decoder layer's output over the answer tokens, by hand."""
    layers = decoder_layers(model)
    sums, count = {n: 0.0 for n, _ in layers}, 0
    for q, a in pairs:
        ids, n_prompt = PromptFormat().encode(tok, q, a)
        outs = {}
        hooks = [m.register_forward_hook(lambda mod, args, o, n=n: outs.__setitem__(n, o)) for n, m in layers]
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        for h in hooks:
            h.remove()
        for n, _ in layers:
            sums[n] = sums[n] + outs[n][0, n_prompt:].double().sum(0)
        count += len(ids) - n_prompt
    return {n: s / count for n, s in sums.items()}


def _logits(model, tok, prompts=PROMPTS):
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return model(**enc).logits


def _hooked_reference(model, adds: dict):
    """A copy whose decoder layers add a fixed vector (per layer name) to their output."""
    ref = copy.deepcopy(model)
    mods = dict(decoder_layers(ref))
    for n, v in adds.items():
        mods[n].register_forward_hook(lambda m, a, o, v=v: o + v.to(o.dtype))
    return ref


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_vectors_equal_the_mean_difference_of_captured_hidden_states(arch):
    model, tok, calib = _calib(arch)
    vec = steering_vectors(calib, "bold", "meek")
    pos, neg = _captured_means(model, tok, PAIRS["bold"]), _captured_means(model, tok, PAIRS["meek"])
    assert list(vec.vectors) == [n for n, _ in decoder_layers(model)]
    for n, v in vec.vectors.items():
        want = (pos[n] - neg[n]).float()
        assert v.shape == (2, want.numel()) and v.dtype == torch.float32
        torch.testing.assert_close(v[0], want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v[1], -want, rtol=1e-4, atol=1e-5)
        assert float(v[0].norm()) > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_apply_steering_equals_a_hooked_reference_and_removes_bit_for_bit(arch):
    model, tok, calib = _calib(arch)
    vec = steering_vectors(calib, "bold", "meek")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = _logits(model, tok)
    layer = list(vec.vectors)[-1]
    ref_bold = _hooked_reference(model, {layer: 3.0 * vec.vectors[layer][0]})
    ref_meek = _hooked_reference(model, {layer: -3.0 * vec.vectors[layer][0]})
    want_bold, want_meek = _logits(ref_bold, tok), _logits(ref_meek, tok)
    pm.apply_steering(model, vec, layers=[vec.layers[layer]], strength=3.0, persona="bold")  # by index
    torch.testing.assert_close(_logits(model, tok), want_bold, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want_bold, base, atol=1e-3)  # the vector does something
    pm.set_persona(model, "meek")
    torch.testing.assert_close(_logits(model, tok), want_meek, rtol=1e-5, atol=1e-5)
    pm.set_persona(model, None)
    assert torch.equal(_logits(model, tok), base)
    pm.set_persona(model, "bold")
    with pm.unmodified(model):
        assert torch.equal(_logits(model, tok), base)
    pm.set_steering_strength(model, 0.0)
    assert torch.equal(_logits(model, tok), base)
    pm.set_steering_strength(model, 3.0)
    # mixed batch: one vector per sequence, equal to the per-persona runs
    pm.set_batch_personas(model, ["meek", "bold"])
    mixed = _logits(model, tok)
    torch.testing.assert_close(mixed[0], want_meek[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], want_bold[1], rtol=1e-5, atol=1e-5)
    pm.remove(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for _, m in decoder_layers(model))
    assert torch.equal(_logits(model, tok), base)


def test_steering_generation_with_kv_cache_matches_reference():
    model, tok, calib = _calib()
    vec = steering_vectors(calib, "bold", "meek")
    ref = _hooked_reference(model, {n: 2.0 * v[0] for n, v in vec.vectors.items()})
    pm.apply_steering(model, vec, strength=2.0, persona="bold")
    enc = tok(PROMPTS[:1], return_tensors="pt")
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        assert torch.equal(model.generate(**enc, **kw), ref.generate(**enc, **kw))
    pm.remove(model)


def test_steering_combines_with_masks_and_npti():
    model, tok, calib = _calib()
    store = build_masks(model, calib, sparsity=0.5)
    vec = steering_vectors(calib, "bold", "meek")
    target = identify_neurons(calib, "bold", "meek", min_neurons=8)
    pm.apply(model, store, persona="meek")
    pm.apply_neurons(model, target, strength=1.0, keep_prob=1.0)
    masked_npti = _logits(model, tok)
    layer = list(vec.vectors)[0]
    # the reference: the same masked + NPTI model with a plain hook adding the meek vector
    h = dict(decoder_layers(model))[layer].register_forward_hook(lambda m, a, o: o + 1.5 * vec.vectors[layer][1])
    want = _logits(model, tok)
    h.remove()
    assert torch.equal(_logits(model, tok), masked_npti)
    pm.apply_steering(model, vec, layers=[layer], strength=1.5)
    torch.testing.assert_close(_logits(model, tok), want, rtol=1e-5, atol=1e-5)
    pm.remove(model)


def test_vectors_follow_the_applied_personas_order():
    model, tok, calib = _calib()
    store = build_masks(model, calib, sparsity=0.5)
    vec = steering_vectors(calib, "meek", "bold")  # reversed order
    pm.apply(model, store, persona="bold", format="dense")
    masked = _logits(model, tok)
    layer = list(vec.vectors)[1]
    pm.apply_steering(model, vec, layers=[layer], strength=1.0)
    got = _logits(model, tok)
    h = dict(decoder_layers(model))[layer]._forward_hooks
    assert len(h) == 1
    pm.set_steering_strength(model, 0.0)
    assert torch.equal(_logits(model, tok), masked)
    pm.remove(model)
    # the 'bold' row is -v of (meek - bold) = bold - meek
    ref = _hooked_reference(model, {layer: vec.vector("bold", layer)})
    pm.apply(ref, store, persona="bold", format="dense")
    torch.testing.assert_close(got, _logits(ref, tok), rtol=1e-5, atol=1e-5)


def test_bad_use_is_a_clear_error_and_changes_nothing(tmp_path):
    model, tok, calib = _calib()
    vec = steering_vectors(calib, "bold", "meek")
    with pytest.raises(ValueError, match="different personas"):
        steering_vectors(calib, "bold", "bold")
    with pytest.raises(KeyError, match="not in these statistics"):
        steering_vectors(calib, "bold", "nobody")
    no_resid = calibrate(model, tok, PAIRS, progress=False, kinds=("linear",))
    with pytest.raises(ValueError, match="kinds including 'resid'"):
        steering_vectors(no_resid, "bold", "meek")
    with pytest.raises(KeyError, match="no steering vector"):
        pm.apply_steering(model, vec, layers=[7])
    other = tiny_causal_lm("llama", seed=1, num_hidden_layers=3)
    with pytest.raises(FingerprintMismatch):
        pm.apply_steering(other, vec)
    assert not pm.is_applied(model) and not pm.is_applied(other)
    pm.apply_steering(model, vec, persona="bold")
    with pytest.raises(pm.PersonaError, match="already applied"):
        pm.apply_steering(model, vec)
    with pytest.raises(pm.PersonaError, match="not applied"):
        pm.set_persona(model, "nobody")
    pm.set_batch_personas(model, ["bold"])
    with pytest.raises(pm.PersonaError, match="2 sequences"):
        _logits(model, tok)
    pm.remove(model)
    # masks of personas the vectors do not know
    store = build_masks(model, calibrate(model, tok, {"x": ["aaa bbb"], "y": ["ccc ddd"]}, progress=False), sparsity=0.5)
    pm.apply(model, store, persona="x")
    with pytest.raises(pm.PersonaError, match="not among the applied personas"):
        pm.apply_steering(model, vec)
    assert not pm._handle(model).steering
    pm.remove(model)
    # files: round trip, checked on load
    path = vec.save(tmp_path / "steer.safetensors")
    back = SteeringVectors.load(path, model=model)
    assert back.personas == vec.personas and all(torch.equal(back.vectors[n], vec.vectors[n]) for n in vec.vectors)
    with pytest.raises(FingerprintMismatch):
        SteeringVectors.load(path, model=other)
    data = open(path, "rb").read()
    open(tmp_path / "cut.safetensors", "wb").write(data[: len(data) // 2])
    with pytest.raises(ArtifactError):
        SteeringVectors.load(tmp_path / "cut.safetensors")


def test_project_statistics_and_texts():
    model, tok, calib = _calib()
    vec = steering_vectors(calib, "bold", "meek")
    proj = project(calib, vec)
    for n, v in vec.vectors.items():
        u = v[0] / v[0].norm()
        i = vec.layers[n]
        for k, p in enumerate(calib.personas):
            assert proj[p][i] == pytest.approx(float(calib.stats[n].mean[k].float() @ u), rel=1e-5, abs=1e-6)
        assert proj["bold"][i] > proj["meek"][i]  # the vector separates its own calibration sets
    layers, per_text = text_projections(model, tok, PAIRS["bold"] + PAIRS["meek"], vec, batch_size=4)
    assert layers == list(vec.layers.values()) and per_text.shape == (6, len(layers))
    # the token-weighted mean of the per-text projections is the persona mean's projection
    for k, p in enumerate(("bold", "meek")):
        pairs = PAIRS[p]
        n_tok = torch.tensor([len(PromptFormat().encode(tok, *t)[0]) - PromptFormat().encode(tok, *t)[1] for t in pairs],
                             dtype=torch.float32)
        mean = (per_text[3 * k:3 * k + 3] * n_tok[:, None]).sum(0) / n_tok.sum()
        torch.testing.assert_close(mean, torch.tensor([proj[p][i] for i in layers]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no texts"):
        text_projections(model, tok, [], vec)

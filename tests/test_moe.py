"""Mixture-of-experts models: statistics per routed expert, persona masks on the fused 3-D expert
weights, NPTI on expert activations; applied, switched, mixed and removed like any layer."""
import copy

import pytest
import torch

import persona_kernels as pk
from persona_kernels.calibrate import calibrate
from persona_kernels.export import ExportError
from persona_kernels.masks import build_masks
from persona_kernels.moe import expert_modules, experts_forward, experts_info, slot_weight
from persona_kernels.testing import TINY_MOE_CONFIGS, char_tokenizer, tiny_causal_lm

ARCHS = sorted(TINY_MOE_CONFIGS)
TEXTS = {"a": ["hello there, friend", "xyz abc", "party tonight!"], "b": ["quiet", "home alone", "a book"]}
PROMPTS = ["Hello, how are you", "Weekend?"]


def _logits(model, tok):
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_experts_forward_is_the_models_own_computation(arch):
    model = tiny_causal_lm(arch, seed=1)
    name, experts = expert_modules(model)[0]
    seen = {}
    h = experts.register_forward_hook(lambda m, a, k, o: seen.update(a=a, k=k, o=o), with_kwargs=True)
    _logits(model, char_tokenizer())
    h.remove()
    with torch.no_grad():
        torch.testing.assert_close(experts_forward(experts, seen["a"], seen["k"]), seen["o"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["mixtral", "llama4"])
def test_statistics_per_expert_count_the_routed_tokens(arch):
    """Each expert's input statistics equal those of the rows routed to it, captured directly."""
    model, tok = tiny_causal_lm(arch, seed=2), char_tokenizer()
    name, experts = expert_modules(model)[0]
    info = experts_info(experts)
    rows = {e: [] for e in range(info.num_experts)}
    orig = experts.forward

    def capture(*args, **kwargs):
        def project(param, e, x, t):
            if param == "gate_up_proj":
                rows[e].append(x.detach().clone())
            return torch.nn.functional.linear(x, slot_weight(experts, param, e))
        return experts_forward(experts, args, kwargs, project)

    res = calibrate(model, tok, {"a": TEXTS["a"]}, batch_size=1, progress=False)
    experts.forward = capture
    for t in TEXTS["a"]:
        with torch.no_grad():
            model(**tok([t], return_tensors="pt"))
    experts.forward = orig
    for e in range(info.num_experts):
        st = res.stats[f"{name}.gate_up_proj.{e}"]
        x = torch.cat(rows[e]).double() if rows[e] else torch.zeros(0, info.hidden, dtype=torch.float64)
        assert int(st.count[0]) == x.shape[0], e
        if x.shape[0]:
            torch.testing.assert_close(st.mean[0], x.mean(0), rtol=1e-5, atol=1e-6)
            assert int(st.samples[0]) == sum(r.shape[0] > 0 for r in rows[e])
    assert res.sites[f"{name}.act_fn.0"].channels == info.intermediate


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_masks_equal_a_baked_copy_switch_mix_and_remove(arch):
    model, tok = tiny_causal_lm(arch, seed=3), char_tokenizer()
    calib = calibrate(model, tok, TEXTS, progress=False)
    store = build_masks(model, calib, sparsity=0.5)
    names = [n for n, _ in expert_modules(model)]
    slots = [n for n in store.layers if any(n.startswith(m + ".") for m in names)]
    assert len(slots) == 2 * sum(experts_info(m).num_experts for _, m in expert_modules(model))  # every routed expert
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense = _logits(model, tok)
    baked = {p: _logits(pk.bake(model, store, p, copy=copy.deepcopy(model)), tok) for p in store.personas}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # baking copies, never edits
    pk.apply(model, store, persona="a")
    got_a = _logits(model, tok)
    torch.testing.assert_close(got_a, baked["a"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got_a, dense, atol=1e-3)
    pk.set_persona(model, "b")
    torch.testing.assert_close(_logits(model, tok), baked["b"], rtol=1e-5, atol=1e-5)
    pk.set_persona(model, "a")
    assert torch.equal(_logits(model, tok), got_a)
    pk.set_batch_personas(model, ["b", "a"])
    mixed = _logits(model, tok)
    torch.testing.assert_close(mixed[0], baked["b"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], baked["a"][1], rtol=1e-5, atol=1e-5)
    pk.remove(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(_logits(model, tok), dense)


def test_npti_on_routed_experts():
    """NPTI neuron sets over the experts' activation sites; the induction there equals the edit
    applied by hand through experts_forward (keep_prob 1: no draw), and changes the output."""
    from persona_kernels.npti import identify_neurons, induction_plan

    model, tok = tiny_causal_lm("qwen2_moe", seed=4), char_tokenizer()
    calib = calibrate(model, tok, TEXTS, include=r"\.experts\.", progress=False)  # routed experts only
    target, opposite = identify_neurons(calib, "a", "b", min_neurons=20), identify_neurons(calib, "b", "a", min_neurons=20)
    assert target.sites and all(".experts.act_fn." in s for s in target.sites)
    dense = _logits(model, tok)
    ref = copy.deepcopy(model)
    for name, experts in expert_modules(ref):
        info = experts_info(experts)
        plans = {e: induction_plan(target, opposite, f"{name}.act_fn.{e}", info.intermediate, 1.5)
                 for e in range(info.num_experts) if f"{name}.act_fn.{e}" in target.sites}

        def edited(*args, _ex=experts, _plans=plans, **kwargs):
            def act(e, gate, tok):
                a = _ex.act_fn(gate)
                if e not in _plans:
                    return a
                deact, idx, push = _plans[e]
                return torch.where(deact, a.clamp(max=0), a) + torch.zeros(a.shape[-1]).index_put((idx,), push)
            return experts_forward(_ex, args, kwargs, activate=act)
        experts.forward = edited
    want = _logits(ref, tok)
    pk.apply_neurons(model, target, opposite, strength=1.5, keep_prob=1.0)
    got = _logits(model, tok)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, dense, atol=1e-3)
    pk.remove(model)
    assert torch.equal(_logits(model, tok), dense)
    with pytest.raises(pk.model.PersonaError, match="no mixture-of-experts"):
        pk.apply_neurons(model, target, opposite, mode="npti-code")
    assert not any(getattr(m, "_pk_wrapper", False) for m in model.modules())


def test_masks_and_npti_on_the_same_experts_and_export(tmp_path):
    """apply() then apply_neurons() share one experts wrapper; export refuses NPTI and, without
    it, writes a checkpoint transformers loads with the expert masks baked in."""
    from transformers import AutoModelForCausalLM

    from persona_kernels.npti import identify_neurons

    model, tok = tiny_causal_lm("mixtral", seed=5), char_tokenizer()
    calib = calibrate(model, tok, TEXTS, progress=False)
    store = build_masks(model, calib, sparsity=0.5)
    pk.apply(model, store, persona="b")
    masked = _logits(model, tok)
    pk.apply_neurons(model, identify_neurons(calib, "b", "a", min_neurons=10), identify_neurons(calib, "a", "b", min_neurons=10),
                     keep_prob=1.0)
    assert not torch.allclose(_logits(model, tok), masked, atol=1e-4)
    with pytest.raises(ExportError, match="NPTI"):
        pk.export(model, store, "b", tmp_path / "x")
    pk.remove(model)
    path = pk.export(model, store, "b", tmp_path / "b")
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    torch.testing.assert_close(_logits(loaded, tok), masked, rtol=1e-5, atol=1e-5)


def test_expert_weights_edited_after_apply_are_an_error():
    model, tok = tiny_causal_lm("qwen3_moe", seed=6), char_tokenizer()
    store = build_masks(model, calibrate(model, tok, TEXTS, progress=False), sparsity=0.5)
    pk.apply(model, store, persona="a")
    _logits(copy.deepcopy(model), tok)  # a copy is not an edit
    with torch.no_grad():
        expert_modules(model)[0][1].down_proj.mul_(2.0)
    with pytest.raises(pk.model.PersonaError, match="modified in place"):
        _logits(model, tok)
    pk.remove(model)

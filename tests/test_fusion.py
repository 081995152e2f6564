"""Fused sibling projections (apply(fuse=True), the default): q/k/v and gate/up share one
stacked persona weight and one kernel call per input, with the outputs of separate layers."""
import pytest
import torch

import persona_kernels.model as pm
from persona_kernels.hf import sibling_groups
from persona_kernels.masks import MaskStore
from persona_kernels.testing import char_tokenizer, tiny_causal_lm

PROMPTS = ["Hello, how are you", "What do you do on weekends?"]


def _store(model, seed=0, density=0.5):
    g = torch.Generator().manual_seed(seed)
    masks = {p: {n: torch.rand(m.weight.shape, generator=g) < density for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.endswith("_proj")} for p in ("a", "b")}
    return MaskStore.from_masks(model, masks)


def _logits(model, tok, prompts=PROMPTS):
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return model(**enc).logits


def test_sibling_groups_need_every_member():
    names = ["m.0.attn.q_proj", "m.0.attn.k_proj", "m.0.attn.v_proj", "m.0.mlp.gate_proj", "m.0.mlp.up_proj",
             "m.1.attn.q_proj", "m.1.attn.k_proj", "m.1.mlp.up_proj", "m.1.mlp.gate_proj"]
    assert sibling_groups(names) == [["m.0.attn.q_proj", "m.0.attn.k_proj", "m.0.attn.v_proj"],
                                     ["m.0.mlp.gate_proj", "m.0.mlp.up_proj"], ["m.1.mlp.gate_proj", "m.1.mlp.up_proj"]]
    assert sibling_groups(["q_proj", "k_proj", "v_proj"]) == [["q_proj", "k_proj", "v_proj"]]
    cross = [f"m.0.{a}.{p}" for a in ("encoder_attn", "cross_attn") for p in ("q_proj", "k_proj", "v_proj")]
    assert sibling_groups(cross) == []  # q and k/v read different tensors there


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v with biases (stacked, added by the kernel)
@pytest.mark.parametrize("fmt", ["bitmap", "compacted", "shared_bitmask", "dense"])
def test_fused_equals_separate_layers(arch, fmt):
    model = tiny_causal_lm(arch, seed=3)
    tok, store = char_tokenizer(), _store(model)
    outs = {}
    for fuse in (False, True):
        pm.apply(model, store, persona="a", format=fmt, fuse=fuse)
        fused = [m for m in model.modules() if isinstance(m, pm.MaskedLinear) and m._group is not None]
        assert bool(fused) == fuse
        got = {}
        for p in ("a", "b"):
            pm.set_persona(model, p)
            got[p] = _logits(model, tok)
        pm.set_batch_personas(model, ["b", "a"])
        got["mixed"] = _logits(model, tok)
        pm.set_persona(model, "b")
        pm.set_gamma(model, 0.3)
        got["gamma"] = _logits(model, tok)
        pm.remove(model)
        outs[fuse] = got
    for k, v in outs[False].items():
        torch.testing.assert_close(outs[True][k], v, rtol=1e-5, atol=1e-5, msg=f"{fmt} {k}")
    assert not torch.allclose(outs[True]["a"], outs[True]["b"])


def test_one_kernel_call_per_group_and_input(monkeypatch):
    model = tiny_causal_lm("llama", seed=1)
    tok, store = char_tokenizer(), _store(model)
    calls = []
    real = pm._PersonaWeight.__call__
    monkeypatch.setattr(pm._PersonaWeight, "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    layers = model.config.num_hidden_layers
    for fuse, per_layer in ((False, 7), (True, 4)):  # q, k, v, o, gate, up, down -> qkv, o, gate_up, down
        pm.apply(model, store, persona="a", fuse=fuse)
        calls.clear()
        _logits(model, tok)
        assert len(calls) == per_layer * layers
        pm.remove(model)
    pm.apply(model, store, persona="a")
    q = model.model.layers[0].self_attn.q_proj
    assert "fused=3" in repr(q)
    assert model.model.layers[0].self_attn.o_proj._group is None
    pm.remove(model)


def _attn(model):
    a = model.model.layers[0].self_attn
    return a.q_proj, a.k_proj, a.v_proj


def test_a_member_recomputes_when_input_or_persona_changed():
    """The columns kept for the next member are used only for the very same input tensor (not
    edited in place since), persona and bias mode; anything else runs the stacked call again."""
    model = tiny_causal_lm("llama", seed=2)
    store = _store(model)
    ref = tiny_causal_lm("llama", seed=2)
    pm.apply(ref, store, persona="a", fuse=False)
    pm.apply(model, store, persona="a")
    (q, k, v), (rq, rk, rv) = _attn(model), _attn(ref)
    x = torch.randn(3, 5, q.in_features)
    with torch.no_grad():
        torch.testing.assert_close(q(x), rq(x))
        x.mul_(-2.0)  # edited in place after q ran: k must not take the stale columns
        torch.testing.assert_close(k(x), rk(x))
        q(x)
        for m in (model, ref):
            pm.set_persona(m, "b")  # persona switched between members
        torch.testing.assert_close(v(x), rv(x))
        torch.testing.assert_close(k(x), rk(x))
        torch.testing.assert_close(k(x), rk(x))  # the same member twice: computed again
        y = x.clone()  # an equal tensor, another object
        q(x)
        torch.testing.assert_close(k(y), rk(y))
    with torch.inference_mode():  # inference tensors have no version counter: identity alone
        xi = torch.randn(2, q.in_features)
        torch.testing.assert_close(torch.cat([q(xi), k(xi), v(xi)], 1), torch.cat([rq(xi), rk(xi), rv(xi)], 1))
    pm.remove(model)
    pm.remove(ref)


def test_fuse_skips_groups_that_cannot_stack():
    """Siblings with different input widths or dtypes, or a member left out of the store, stay separate layers."""
    model = tiny_causal_lm("llama", seed=5)
    store = _store(model)
    attn = model.model.layers[0].self_attn
    attn.k_proj.to(torch.bfloat16)  # another dtype than its siblings
    names = [n for n in store.layers if not n.endswith("layers.1.mlp.up_proj")]
    pm.apply(model, store, persona="a", layers=names)
    assert attn.q_proj._group is None and attn.k_proj._group is None
    assert model.model.layers[1].mlp.gate_proj._group is None
    assert model.model.layers[0].mlp.gate_proj._group is not None
    pm.remove(model)
    assert type(attn.k_proj) is torch.nn.Linear and attn.k_proj.weight.dtype == torch.bfloat16


def test_fused_model_generates_like_the_separate_one():
    model = tiny_causal_lm("llama", seed=6)
    tok, store = char_tokenizer(), _store(model, density=0.4)
    enc = tok(PROMPTS[:1], return_tensors="pt")
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    got = {}
    for fuse in (False, True):
        pm.apply(model, store, persona="b", fuse=fuse)
        with torch.inference_mode():
            got[fuse] = model.generate(**enc, **kw)
        pm.remove(model)
    assert torch.equal(got[True], got[False])


def test_copies_of_a_fused_model_after_a_forward():
    """deepcopy of a model whose groups hold the last input's columns, and pickling of a group: the
    copies start clean (no weak reference to pickle, no stale columns) and give the same logits."""
    import copy
    import pickle

    model = tiny_causal_lm("llama", seed=8)
    tok, store = char_tokenizer(), _store(model)
    pm.apply(model, store, persona="a")
    want = _logits(model, tok)
    group = model.model.layers[0].self_attn.q_proj._group
    assert group._source is not None
    twin = copy.deepcopy(model)
    for g in (twin.model.layers[0].self_attn.q_proj._group, pickle.loads(pickle.dumps(group))):
        assert g._source is None and g._pending == {}
    torch.testing.assert_close(_logits(twin, tok), want)
    pm.remove(model)


def test_an_applied_model_survives_torch_save_and_load():
    """torch.save / torch.load of a whole applied model (fused groups, NPTI-free): same logits,
    persona switching still works, remove() restores the original modules."""
    import io

    model = tiny_causal_lm("llama", seed=10)
    tok, store = char_tokenizer(), _store(model)
    pm.apply(model, store, persona="a")
    want = {p: (pm.set_persona(model, p), _logits(model, tok))[1] for p in ("a", "b")}
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    twin = torch.load(buf, weights_only=False)
    for p in ("a", "b"):
        pm.set_persona(twin, p)
        torch.testing.assert_close(_logits(twin, tok), want[p])
    pm.remove(twin)
    assert not any(isinstance(m, pm.MaskedLinear) for m in twin.modules())
    pm.remove(model)

"""Drop-in persona inference on tiny random-weight transformers models."""
import copy

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import persona_kernels.model as pm
from persona_kernels.calibrate import calibrate
from persona_kernels.fingerprint import FingerprintMismatch
from persona_kernels.masks import MaskStore, block_mask, build_masks
from persona_kernels.npti import identify_neurons, induction_vectors
from persona_kernels.testing import char_tokenizer, tiny_causal_lm

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "olmo2"]
TEXTS = {"extravert": ["I love parties and people!", "Everyone come over!", "Let's go out tonight."],
         "introvert": ["A quiet night in with a book.", "I prefer to be alone.", "Silence is restful."]}
PROMPTS = ["Hello, how are you", "What do you do on weekends?"]


def _setup(arch, sparsity=0.6, seed=0):
    model, tok = tiny_causal_lm(arch, seed=seed), char_tokenizer()
    calib = calibrate(model, tok, TEXTS, progress=False)
    return model, tok, calib, build_masks(model, calib, sparsity=sparsity)


def masked_copy(model, store: MaskStore, persona: str):
    ref = copy.deepcopy(model)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for layer in store.layers:
            m = store.mask(persona, layer)
            mods[layer].weight.mul_(m.t() if isinstance(mods[layer], Conv1D) else m)
    return ref


def _logits(model, tok, prompts=PROMPTS):
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return model(**enc).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_generation_match_masked_copy(arch):
    model, tok, calib, store = _setup(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    refs = {p: masked_copy(model, store, p) for p in store.personas}
    want = {p: _logits(refs[p], tok) for p in store.personas}
    for fmt in ("bitmap", "shared_bitmask", "compacted", "dense"):
        pm.apply(model, store, persona="extravert", format=fmt)
        for p in store.personas:
            pm.set_persona(model, p)
            torch.testing.assert_close(_logits(model, tok), want[p], rtol=1e-5, atol=1e-5)
        pm.remove(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # greedy generation with the KV cache, token for token
    pm.apply(model, store, persona="introvert")
    enc = tok(PROMPTS[:1], return_tensors="pt")
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        got = model.generate(**enc, **kw)
        ref = refs["introvert"].generate(**enc, **kw)
    assert torch.equal(got, ref)
    pm.remove(model)


def test_switching_and_mixed_batches():
    model, tok, calib, store = _setup("llama")
    pm.apply(model, store, persona="extravert", format="bitmap")
    a = _logits(model, tok)
    pm.set_persona(model, "introvert")
    b = _logits(model, tok)
    pm.set_persona(model, "extravert")
    assert torch.equal(_logits(model, tok), a) and not torch.equal(a, b)
    pm.set_persona(model, None)  # persona off: the original model
    pm.remove(model)
    dense = _logits(model, tok)
    pm.apply(model, store)
    assert torch.equal(_logits(model, tok), dense)
    with pm.persona(model, "introvert"):
        assert torch.equal(_logits(model, tok), b)
    assert torch.equal(_logits(model, tok), dense)
    for names in (["extravert", "introvert"], ["introvert", "extravert"]):
        pm.set_batch_personas(model, names)
        mixed = _logits(model, tok)
        for i, n in enumerate(names):
            pm.set_batch_personas(model, None)
            pm.set_persona(model, n)
            single = _logits(model, tok)
            torch.testing.assert_close(mixed[i], single[i], rtol=1e-5, atol=1e-5)
    pm.remove(model)


def test_mixed_batch_generation_shared_bitmask():
    model, tok, calib, store = _setup("qwen2")
    refs = {p: masked_copy(model, store, p) for p in store.personas}
    pm.apply(model, store, format="shared_bitmask")
    pm.set_batch_personas(model, ["introvert", "extravert"])
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        got = model.generate(**enc, **kw)
        for i, p in enumerate(["introvert", "extravert"]):
            assert torch.equal(got[i], refs[p].generate(**enc, **kw)[i])
    pm.remove(model)


def test_sampling_generation_and_soft_gate():
    model, tok, calib, store = _setup("llama")
    ref = masked_copy(model, store, "extravert")
    pm.apply(model, store, persona="extravert")
    enc = tok(PROMPTS[:1], return_tensors="pt")
    torch.manual_seed(3)
    got = model.generate(**enc, max_new_tokens=10, do_sample=True, top_k=20, pad_token_id=0)
    torch.manual_seed(3)
    want = ref.generate(**enc, max_new_tokens=10, do_sample=True, top_k=20, pad_token_id=0)
    assert torch.equal(got, want)
    pm.set_gamma(model, 1.0)  # G = 1: the dense weights
    pm.remove(model)
    dense = _logits(model, tok)
    pm.apply(model, store, persona="extravert", gamma=1.0)
    torch.testing.assert_close(_logits(model, tok), dense, rtol=1e-5, atol=1e-5)
    pm.set_gamma(model, 0.3)
    gated = copy.deepcopy(model)
    pm.remove(model)
    soft = copy.deepcopy(model)
    mods = dict(soft.named_modules())
    with torch.no_grad():
        for layer in store.layers:
            m = store.mask("extravert", layer).float()
            mods[layer].weight.mul_(m + 0.3 * (1 - m))
    torch.testing.assert_close(_logits(gated, tok), _logits(soft, tok), rtol=1e-5, atol=1e-5)


def test_bias_of_another_dtype_is_added_after_the_product_without_a_dense_pass(monkeypatch):
    """A bias the kernels cannot take (another dtype than x) is added after the masked product;
    without a soft gate the dense weight is never multiplied (its product would be scaled by 0)."""
    layer = torch.nn.Linear(24, 10)
    with torch.no_grad():
        layer.bias.data = torch.randn(10, dtype=torch.float64)
    model = torch.nn.Sequential(layer)
    mask = torch.rand(10, 24) < 0.5
    store = MaskStore.from_masks(model, {"a": {"0": mask}, "b": {"0": ~mask}})
    x = torch.randn(3, 24)
    want = x.double() @ (layer.weight.double() * mask.double()).T + layer.bias
    pm.apply(model, store, persona="a")
    monkeypatch.setattr(pm, "linear_weight", lambda m: (_ for _ in ()).throw(AssertionError("dense product")))
    with torch.inference_mode():
        got = model(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    pm.remove(model)


def test_block_format_with_block_masks():
    model = tiny_causal_lm("llama")
    mods = dict(model.named_modules())
    layers = [n for n, m in mods.items() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    masks = {p: {n: block_mask(torch.rand(mods[n].weight.shape), (16, 16), 0.5) for n in layers} for p in ("a", "b")}
    store = MaskStore.from_masks(model, masks)
    ref = masked_copy(model, store, "b")
    tok = char_tokenizer()
    pm.apply(model, store, persona="b", format="block")
    torch.testing.assert_close(_logits(model, tok), _logits(ref, tok), rtol=1e-5, atol=1e-5)
    assert "format=block" in repr(model)
    pm.remove(model)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(dtype):
    model, tok, calib, store = _setup("llama")
    model = model.to(dtype)
    ref = masked_copy(model, store, "extravert")
    pm.apply(model, store, persona="extravert")
    got, want = _logits(model, tok).float(), _logits(ref, tok).float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    pm.remove(model)


class _ManualInduction(torch.nn.Module):
    def __init__(self, act, deact, add):
        super().__init__()
        self.act, self.deact, self.add = act, deact, add

    def forward(self, x):
        a = self.act(x)
        return torch.where(self.deact, a.clamp(max=0), a) + self.add


@pytest.mark.parametrize("arch,fused", [("llama", "silu"), ("gemma2", "gelu_tanh")])
def test_npti_induction_matches_manual_and_combines_with_masks(arch, fused):
    model, tok, calib, store = _setup(arch)
    target = identify_neurons(calib, "extravert", "introvert", min_neurons=30)
    opposite = identify_neurons(calib, "introvert", "extravert", min_neurons=30)
    ref = masked_copy(model, store, "extravert")
    for site in target.sites:  # the manual edit, keep_prob 1 so it is deterministic
        mlp = ref.get_submodule(site.rpartition(".")[0])
        deact, add = induction_vectors(target, opposite, site, mlp.down_proj.in_features, 1.2, 1.0)
        mlp.act_fn = _ManualInduction(mlp.act_fn, deact, add)
    pm.apply(model, store, persona="extravert")
    pm.apply_neurons(model, target, opposite, strength=1.2, keep_prob=1.0)
    assert "npti target='extravert'" in repr(model) and f"fused={fused}" in repr(model)
    torch.testing.assert_close(_logits(model, tok), _logits(ref, tok), rtol=1e-5, atol=1e-5)
    before = _logits(model, tok)
    pm.remove(model)
    assert not torch.equal(_logits(model, tok), before)
    assert all(type(m).__name__ not in ("MaskedLinear", "InducedActivation") for m in model.modules())


def test_npti_not_applicable_to_gpt2():
    model, tok, calib, store = _setup("gpt2")
    other = tiny_causal_lm("llama")
    ns = identify_neurons(calibrate(other, tok, TEXTS, progress=False), "extravert", "introvert", min_neurons=5)
    with pytest.raises(pm.PersonaError, match="NPTI is not applicable"):
        pm.apply_neurons(model, ns)


def test_bad_use_leaves_model_unchanged():
    model, tok, calib, store = _setup("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reprs = repr(model)
    with pytest.raises(FingerprintMismatch):
        pm.apply(tiny_causal_lm("qwen2"), store)
    with pytest.raises(pm.PersonaError, match="not applied to this model"):
        pm.apply(model, store, persona="ambivert")
    assert repr(model) == reprs and not pm.is_applied(model)
    with pytest.raises(pm.PersonaError, match="no persona layer"):
        pm.remove(model)
    with pytest.raises(pm.PersonaError, match="no persona layer"):
        pm.set_persona(model, "extravert")
    pm.apply(model, store, persona="extravert")
    with pytest.raises(pm.PersonaError, match="already applied"):
        pm.apply(model, store)
    with pytest.raises(pm.PersonaError, match="not applied to this model"):
        pm.set_persona(model, "ambivert")
    with pytest.raises(ValueError, match="unknown format"):
        pm.remove(model) or pm.apply(model, store, format="csr")
    assert not pm.is_applied(model)
    pm.apply(model, store, persona="extravert")
    pm.set_batch_personas(model, ["extravert"])
    with pytest.raises(pm.PersonaError, match="1 personas but the batch has 2"):
        _logits(model, tok)
    pm.remove(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert repr(model) == reprs


def test_unsupported_architecture_is_a_clear_error():
    from persona_kernels.sites import UnsupportedArchitecture

    class ConvNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(4, 4, 3)

        def forward(self, input_ids=None, attention_mask=None, **kw):
            return self.conv(torch.zeros(1, 4, 8))

    model = ConvNet()
    with pytest.raises(UnsupportedArchitecture, match="no nn.Linear or transformers Conv1D.*Supported and tested: Llama"):
        calibrate(model, char_tokenizer(), TEXTS, progress=False)
    _, _, _, store = _setup("llama")
    with pytest.raises(UnsupportedArchitecture, match="ConvNet is not supported"):
        pm.apply(model, store)


def test_torch_compile_of_a_persona_model():
    """The patched model compiles (masked_linear is a torch.library op) and matches eager."""
    import torch._dynamo

    model, tok, calib, store = _setup("llama")
    ref = masked_copy(model, store, "introvert")
    pm.apply(model, store, persona="introvert", format="bitmap")
    enc = tok(PROMPTS[:1], return_tensors="pt")
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=keep_graph)
    with torch.no_grad():
        got = compiled(**enc).logits
    torch.testing.assert_close(got, ref(**enc).logits, rtol=1e-5, atol=1e-5)
    traced = sum(g.count("persona_kernels.masked_linear") for g in graphs)
    calls = len({m._group or m for m in model.modules() if isinstance(m, pm.MaskedLinear)})  # a fused group: one call
    assert calls == len(store.layers) - 3 * model.config.num_hidden_layers  # q/k/v and gate/up fused
    assert traced == calls, f"{traced} masked_linear ops traced for {calls} masked calls"
    pm.remove(model)


def _device_map(model, last_layer="cpu"):
    n = model.config.num_hidden_layers
    layers = {f"model.layers.{i}": "cpu" for i in range(n - 1)}
    return {"model.embed_tokens": "cpu", **layers, f"model.layers.{n - 1}": last_layer, "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "cpu"}


def test_model_dispatched_by_a_device_map(tmp_path):
    """accelerate's per-block hooks (as a device_map split installs them) stay in place and
    the persona model still matches the masked copy; remove() gives back the hooked model."""
    accelerate = pytest.importorskip("accelerate")
    model, tok, calib, store = _setup("llama")
    ref = masked_copy(model, store, "introvert")
    want = _logits(ref, tok)
    dense = _logits(model, tok)
    accelerate.dispatch_model(model, _device_map(model), main_device="cpu", force_hooks=True)
    hooked = [n for n, m in model.named_modules() if hasattr(m, "_hf_hook")]
    assert any(n.startswith("model.layers.") for n in hooked)
    pm.apply(model, store, persona="introvert")
    torch.testing.assert_close(_logits(model, tok), want, rtol=1e-5, atol=1e-5)
    enc = tok(PROMPTS[:1], return_tensors="pt")
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        assert torch.equal(model.generate(**enc, **kw), ref.generate(**enc, **kw))
    pm.remove(model)
    torch.testing.assert_close(_logits(model, tok), dense, rtol=0, atol=0)


def test_offloaded_weights_are_a_clear_error(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model, tok, calib, store = _setup("llama")
    accelerate.dispatch_model(model, _device_map(model, last_layer="disk"), main_device="cpu",
                              offload_dir=str(tmp_path))
    before = [type(m).__name__ for m in model.modules()]
    with pytest.raises(pm.PersonaError, match="offloaded"):
        pm.apply(model, store, persona="introvert")
    assert [type(m).__name__ for m in model.modules()] == before and not pm.is_applied(model)


def test_npti_fuses_only_activations_it_reproduces():
    from transformers.activations import ACT2FN

    class SiLU(torch.nn.Module):  # a look-alike by name that computes something else
        def forward(self, x):
            return torch.relu(x)

    assert pm.fusable_activation(ACT2FN["silu"]) == "silu"
    assert pm.fusable_activation(ACT2FN["gelu_pytorch_tanh"]) == "gelu_tanh"
    assert pm.fusable_activation(torch.nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert pm.fusable_activation(torch.nn.GELU()) is None
    assert pm.fusable_activation(SiLU()) is None


def test_large_batches_keep_one_dense_copy_per_layer():
    """Prefill-sized batches go through a cached dense weight; switching persona frees the
    previous persona's copy instead of keeping one per persona ever used."""
    model, tok, calib, store = _setup("llama")
    pm.apply(model, store, persona="extravert", format="bitmap")
    layer = next(m for m in model.modules() if isinstance(m, pm.MaskedLinear))
    x = torch.randn(64, layer.in_features)  # above every crossover: the dense path

    def cached():
        return [p for p, f in enumerate(layer._fmt) if getattr(f.values, "_pk_dense_cache", None) is not None]

    with torch.no_grad():
        layer(x)
        assert cached() == [0]
        pm.set_persona(model, "introvert")
        got = layer(x)
        assert cached() == [1]
    mask = store.mask("introvert", next(n for n, m in model.named_modules() if m is layer))
    torch.testing.assert_close(got, torch.nn.functional.linear(x, layer.base.weight * mask, layer.base.bias),
                               rtol=1e-5, atol=1e-5)
    pm.remove(model)


def test_apply_filter_fn_keeps_only_chosen_layers():
    model, tok, calib, store = _setup("llama")
    down = [n for n in store.layers if n.endswith("down_proj")]
    only_down = MaskStore.from_masks(model, {p: {n: store.mask(p, n) for n in down} for p in store.personas})
    want = _logits(masked_copy(model, only_down, "extravert"), tok)
    handle = pm.apply(model, store, persona="extravert", filter_fn=lambda module, name: name.endswith("down_proj"))
    assert sorted(handle.swapped) == sorted(down)
    torch.testing.assert_close(_logits(model, tok), want, rtol=1e-5, atol=1e-5)
    pm.remove(model)
    with pytest.raises(pm.PersonaError, match="kept none"):
        pm.apply(model, store, filter_fn=lambda m, n: False)
    assert not pm.is_applied(model)


def test_weights_edited_after_apply_are_an_error_not_ignored():
    model, tok, calib, store = _setup("llama")
    pm.apply(model, store, persona="extravert")
    name = store.layers[0]
    with torch.no_grad():
        model.get_submodule(name).base.weight.mul_(2.0)
    edited = model.get_submodule(name).base.weight.detach().clone()
    with pytest.raises(pm.PersonaError, match="modified in place after apply"):
        _logits(model, tok)
    pm.set_persona(model, None)
    _logits(model, tok)  # the dense model reads the weights as they are
    pm.remove(model)
    assert torch.equal(model.get_submodule(name).weight, edited)  # the edit is kept by remove()
    with pytest.raises(FingerprintMismatch, match="other weights"):  # and the old masks no longer fit
        pm.apply(model, store, persona="extravert")


def test_remove_keeps_a_module_the_user_put_in_place_of_a_persona_layer():
    model, tok, calib, store = _setup("qwen2")
    pm.apply(model, store, persona="introvert")
    name = store.layers[1]
    mine = torch.nn.Linear(*reversed(model.get_submodule(name).base.weight.shape), bias=False)
    from persona_kernels.hf import set_module

    set_module(model, name, mine)
    with pytest.warns(UserWarning, match="replaced by other modules"):
        pm.remove(model)
    assert model.get_submodule(name) is mine
    assert not any(getattr(m, "_pk_wrapper", False) for m in model.modules())


def test_a_copy_of_an_applied_model_keeps_the_edit_check():
    model, tok, calib, store = _setup("llama")
    pm.apply(model, store, persona="extravert")
    twin = copy.deepcopy(model)
    torch.testing.assert_close(_logits(twin, tok), _logits(model, tok))  # a copy is not an edit
    with torch.no_grad():
        model.get_submodule(store.layers[0]).base.weight.add_(1.0)
    with pytest.raises(pm.PersonaError, match="modified in place"):
        _logits(copy.deepcopy(model), tok)  # nor does a copy hide one


def test_a_model_built_under_inference_mode_can_be_applied():
    """Its weights are inference tensors (no version counters): apply() must not fail on them."""
    with torch.inference_mode():
        model = tiny_causal_lm("llama", seed=9)
    g = torch.Generator().manual_seed(1)
    masks = {p: {n: torch.rand(m.weight.shape, generator=g) < 0.5 for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.endswith("_proj")} for p in ("a", "b")}
    store = MaskStore.from_masks(model, masks)
    ref = masked_copy(model, store, "b")
    pm.apply(model, store, persona="b")
    tok = char_tokenizer()
    torch.testing.assert_close(_logits(model, tok), _logits(ref, tok), rtol=1e-5, atol=1e-5)
    pm.remove(model)


def test_the_bound_kernel_follows_persona_rows_and_the_routing_table():
    """The decode hot path keeps its routed kernel per (persona, rows, dtype, device, bias, table):
    a persona switch, another batch size or a new crossover entry routes again; copies rebind."""
    from persona_kernels.ops.masked_linear import dispatch

    model, tok, calib, store = _setup("llama")
    pm.apply(model, store, persona="extravert", format="bitmap", fuse=False)
    name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, pm.MaskedLinear))
    w = layer.base.weight

    def want(x, persona):
        return torch.nn.functional.linear(x, w * store.mask(persona, name), layer.base.bias)

    x1, x64 = torch.randn(1, layer.in_features), torch.randn(64, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(x1), want(x1, "extravert"))
        key = layer._weight._bound[0]
        torch.testing.assert_close(layer(x64), want(x64, "extravert"))  # rows: bound again
        pm.set_persona(model, "introvert")
        torch.testing.assert_close(layer(x1), want(x1, "introvert"))
        assert layer._weight._bound[0] != key
        epoch = dispatch.EPOCH[0]
        try:
            dispatch.set_crossover("cpu", "bitmap", 0, dtype=torch.float32)  # never the sparse kernel
            torch.testing.assert_close(layer(x1), want(x1, "introvert"))
            assert layer._weight._bound[0][-1] == dispatch.EPOCH[0] > epoch
        finally:
            dispatch._OVERRIDES.pop(("cpu", dispatch.table_key("bitmap", torch.float32)), None)
            dispatch.reload_table()
        twin = copy.deepcopy(model)
        assert next(m for m in twin.modules() if isinstance(m, pm.MaskedLinear))._weight._bound is None
    pm.remove(model)

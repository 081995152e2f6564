"""NPTI identification, induction vectors and the induce_neurons op."""
import math

import numpy as np
import pytest
import torch

from persona_kernels.calibrate import CalibrationResult, calibrate
from persona_kernels.fingerprint import FingerprintMismatch
from persona_kernels.npti import NeuronSet, identify_neurons, induction_vectors, push_strength
from persona_kernels.ops.induce_neurons import induce_neurons
from persona_kernels.sites import Site
from persona_kernels.stats import StatsConfig, StatsState
from persona_kernels.testing import char_tokenizer, tiny_causal_lm

from conftest import kernel_backends

INDUCE_BACKENDS = [p for p in kernel_backends() if p.values[0] in ("reference", "triton", "cpp")]


def _fake_calib(p_a, p_o, hist_value=0.5):
    """A CalibrationResult whose act sites have the given firing probabilities (per site lists)."""
    sites, stats = {}, {}
    for k, (pa, po) in enumerate(zip(p_a, p_o)):
        I = len(pa)
        st = StatsState.empty(I, StatsConfig(num_personas=2, histogram=True))
        st.count[:] = 1000
        st.pos[0] = torch.round(torch.tensor(pa) * 1000).long()
        st.pos[1] = torch.round(torch.tensor(po) * 1000).long()
        st.hist[:, :, 51] = 1000  # all mass in bin (0.50, 0.51]
        name = f"model.layers.{k}.mlp.act_fn"
        sites[name] = Site(name, "act", name, I, k)
        stats[name] = st
    return CalibrationResult(["T", "notT"], sites, stats, "fp", "Fake/llama")


def plain_selection(p_a, p_o, threshold, min_neurons):
    entries = [(pa - po, k, j) for k, (ra, ro) in enumerate(zip(p_a, p_o)) for j, (pa, po) in enumerate(zip(ra, ro))]
    order = sorted(entries, key=lambda e: (-e[0], e[1], e[2]))
    n = max(sum(e[0] >= threshold - 1e-12 for e in entries), min(min_neurons, len(entries)))
    return sorted((k, j) for _, k, j in order[:n])


def test_threshold_and_min_neurons():
    rng = np.random.default_rng(0)
    p_a = [list(rng.integers(0, 1000, 40) / 1000) for _ in range(3)]
    p_o = [list(rng.integers(0, 1000, 40) / 1000) for _ in range(3)]
    calib = _fake_calib(p_a, p_o)
    for threshold, min_n in [(0.1, 0), (0.1, 5), (0.5, 70), (0.99, 3), (0.0, 500)]:
        ns = identify_neurons(calib, "T", "notT", threshold=threshold, min_neurons=min_n)
        got = sorted(zip(ns.site.tolist(), ns.index.tolist()))
        assert got == plain_selection(p_a, p_o, threshold, min_n), (threshold, min_n)
        assert len(ns) <= 120
    ns = identify_neurons(calib, "T", "notT", min_neurons=10_000)
    assert len(ns) == 120  # capped by the model size


def test_ties_break_by_layer_then_index():
    calib = _fake_calib([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]], [[0.45] * 3, [0.45] * 3])
    ns = identify_neurons(calib, "T", "notT", threshold=0.1, min_neurons=4)
    assert list(zip(ns.site.tolist(), ns.index.tolist())) == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert torch.allclose(ns.p95, torch.full((4,), 0.50, dtype=torch.float64))


def test_npti_not_applicable_and_bad_input():
    model = tiny_causal_lm("gpt2")
    calib = calibrate(model, char_tokenizer(), {"a": ["hi there"], "b": ["hello"]}, progress=False)
    with pytest.raises(ValueError, match="NPTI is not applicable"):
        identify_neurons(calib, "a", "b")
    with pytest.raises(KeyError, match="'c'"):
        identify_neurons(calib, "a", "c")
    with pytest.raises(ValueError, match="different"):
        identify_neurons(calib, "a", "a")


def test_on_model_save_load(tmp_path):
    model = tiny_causal_lm("qwen2", seed=4)
    calib = calibrate(model, char_tokenizer(), {"x": ["I love parties!", "Yes!"], "y": ["A quiet night.", "No."]},
                      progress=False)
    ns = identify_neurons(calib, "x", "y", min_neurons=20)
    assert len(ns) >= 20 and ns.sites == [n for n, s in calib.sites.items() if s.kind == "act"]
    st = calib.stats[ns.sites[0]]
    idx, diff, p95 = ns.at(ns.sites[0])
    torch.testing.assert_close(diff, (st.firing_prob()[0] - st.firing_prob()[1])[idx])
    torch.testing.assert_close(p95, st.percentile(95)[0][idx])
    back = NeuronSet.load(ns.save(tmp_path / "n.safetensors"), model=model)
    assert back.aspect == "x" and all(torch.equal(getattr(back, k), v) for k, v in ns.tensors().items())
    with pytest.raises(FingerprintMismatch):
        NeuronSet.load(tmp_path / "n.safetensors", model=tiny_causal_lm("llama"))


def test_induction_vectors():
    calib = _fake_calib([[0.9, 0.9, 0.1, 0.1]], [[0.1, 0.1, 0.9, 0.9]])
    t = identify_neurons(calib, "T", "notT", min_neurons=0)
    o = identify_neurons(calib, "notT", "T", min_neurons=0)
    site = t.sites[0]
    deact, add = induction_vectors(t, o, site, 4, strength=1.0, keep_prob=1.0)
    assert deact.tolist() == [False, False, True, True]
    want = 0.5 * 1.0 / (1 + math.exp(-10 * (0.8 - 0.15)))
    assert add[:2].tolist() == pytest.approx([want, want], rel=1e-6) and add[2:].tolist() == [0, 0]
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a1 = induction_vectors(t, o, site, 4, keep_prob=0.5, generator=g1)[1]
    a2 = induction_vectors(t, o, site, 4, keep_prob=0.5, generator=g2)[1]
    assert torch.equal(a1, a2)  # seeded
    assert induction_vectors(t, o, site, 4, keep_prob=0.0)[1].abs().sum() == 0
    assert push_strength(torch.tensor([0.5]), torch.tensor([-math.inf]), 1.0).item() == 0.0
    with pytest.raises(ValueError, match="out of range"):
        induction_vectors(t, o, site, 1)


ACTS64 = {None: lambda t: t, "silu": lambda t: t * torch.sigmoid(t),
          "gelu_tanh": lambda t: 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t ** 3)))}


@pytest.mark.parametrize("act", [None, "silu", "gelu_tanh"])
@pytest.mark.parametrize("backend", INDUCE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(5, 123, 123), (1, 1, 7), (3, 200)], ids=str)
def test_induce_op_matches_float64(backend, dtype, shape, act):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic")
    g = torch.Generator().manual_seed(sum(shape))
    a = (4 * torch.randn(*shape, generator=g)).to(dtype)  # spans the activations' curved part and tails
    I = shape[-1]
    deact = torch.rand(I, generator=g) > 0.6
    add = torch.where(torch.rand(I, generator=g) > 0.5, torch.rand(I, generator=g), torch.zeros(I))
    out = induce_neurons(a, deact, add, backend=backend, act=act)
    f64 = ACTS64[act](a.double())
    want = torch.where(deact, f64.clamp(max=0), f64) + add.double()
    assert out.dtype == dtype and out.shape == a.shape
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    if act is None:  # a pure select-and-add: every backend rounds the same way
        assert torch.equal(out, induce_neurons(a, deact, add, backend="reference"))


@pytest.mark.parametrize("backend", INDUCE_BACKENDS)
def test_induce_op_fused_activation_extremes(backend):
    """exp overflow/underflow in the fused activations: huge and tiny inputs stay finite."""
    a = torch.tensor([-1e4, -200.0, -90.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 90.0, 200.0, 1e4] * 2)
    deact, add = torch.zeros(a.numel(), dtype=torch.bool), torch.zeros(a.numel())
    for act in ("silu", "gelu_tanh"):
        out = induce_neurons(a, deact, add, backend=backend, act=act)
        want = ACTS64[act](a.double())
        assert torch.isfinite(out).all(), (backend, act, out)
        torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)


def test_induce_op_bad_input():
    a = torch.randn(2, 8)
    with pytest.raises(ValueError, match="deactivate"):
        induce_neurons(a, torch.zeros(7, dtype=torch.bool), torch.zeros(8))
    with pytest.raises(ValueError, match="add must be a float32"):
        induce_neurons(a, torch.zeros(8, dtype=torch.bool), torch.zeros(8, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        induce_neurons(a.double(), torch.zeros(8, dtype=torch.bool), torch.zeros(8))
    with pytest.raises(ValueError, match="act must be"):
        induce_neurons(a, torch.zeros(8, dtype=torch.bool), torch.zeros(8), act="relu")
    with pytest.raises(TypeError, match="deactivate must be a tensor"):
        induce_neurons(a, [False] * 8, torch.zeros(8))
    with pytest.raises(TypeError, match="add must be a tensor"):
        induce_neurons(a, torch.zeros(8, dtype=torch.bool), [0.0] * 8)
    for bad in (math.nan, math.inf):
        add = torch.zeros(8)
        add[3] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            induce_neurons(a, torch.zeros(8, dtype=torch.bool), add)


def test_npti_reference_edges_are_the_released_ones():
    from persona_kernels.stats import npti_reference_edges

    e = npti_reference_edges()
    ref = torch.arange(0, 3.01, 0.01, dtype=torch.float32)
    ref[-1] = math.inf
    assert len(e) == 302 and e[0] == -math.inf and e[-1] == math.inf
    assert torch.equal(torch.tensor(e[1:], dtype=torch.float32), ref)  # bit for bit, float32 rounding included
    assert e[-2] == pytest.approx(2.99)


def _released_p95(hist):
    """search_neuron.py's read-out on histograms [N, bins] with the reference edges."""
    edges = torch.tensor(npti_reference_edges_list(), dtype=torch.float32)
    cum = hist.float().cumsum(-1)
    thr = 0.95 * hist.float().sum(-1, keepdim=True)
    return edges[torch.searchsorted(cum, thr, right=False)].squeeze(-1)


def npti_reference_edges_list():
    from persona_kernels.stats import npti_reference_edges

    return npti_reference_edges()


def test_npti_code_percentile_matches_the_released_read_out():
    from persona_kernels.stats import percentile

    g = torch.Generator().manual_seed(0)
    hist = torch.randint(0, 50, (40, 301), generator=g)
    hist[:5, 1:] = 0  # everything at or below 0: p95 = -inf (the package then pushes nothing)
    edges = torch.tensor(npti_reference_edges_list(), dtype=torch.float32)
    got = percentile(hist, edges, 95, "npti-code")
    want = _released_p95(hist).double()
    assert torch.equal(got, want)
    assert bool(torch.isinf(got[:5]).all())


def test_npti_code_identification_cut():
    from persona_kernels.npti import identify_neurons

    calib = _two_persona_calib()
    pkg = identify_neurons(calib, "a", "b", threshold=0.1, min_neurons=3)
    code = identify_neurons(calib, "a", "b", threshold=0.1, min_neurons=3, mode="npti-code")
    # the released cut: float32 diff, the first max(min_neurons, #(diff >= 0.1)) of a descending sort
    sites = [n for n, s in calib.sites.items() if s.kind == "act"]
    d32 = torch.cat([calib.stats[n].firing_prob()[0].float() - calib.stats[n].firing_prob()[1].float() for n in sites])
    n_keep = max(3, int((d32 >= 0.1).sum()))
    assert len(code) == n_keep
    width = calib.stats[sites[0]].num_channels
    flat = torch.sort(d32, descending=True).indices[:n_keep]
    assert set(zip(code.site.tolist(), code.index.tolist())) == {(int(f) // width, int(f) % width) for f in flat}
    assert torch.equal(code.diff.float(), d32[code.site * width + code.index])
    assert len(pkg) == max(3, int((pkg.diff >= 0.1 - 1e-12).sum()))
    with pytest.raises(ValueError, match="mode"):
        identify_neurons(calib, "a", "b", mode="paper")


def _two_persona_calib():
    model, tok = tiny_causal_lm("llama", seed=3), char_tokenizer()
    return calibrate(model, tok, {"a": ["happy loud party", "we dance all night"], "b": ["quiet book", "alone at home"]},
                           progress=False)


# ---- the released code's statistics and induction (issue 13) ------------------------------------

GEN_TEXTS = {"hi": ["Tell me about parties", "Who is coming over?"], "lo": ["A quiet evening", "Books and tea"]}


def _decode_step_reference(model, tok, texts, max_new_tokens, penalty):
    """The released counting, re-implemented: one text at a time, greedy generation with hooks on,
    activation outputs collected at decode steps only (forwards of one token)."""
    acts = {}
    mlps = {n: m for n, m in model.named_modules() if n.endswith(".mlp")}
    hooks = [m.act_fn.register_forward_hook(lambda mod, a, o, n=n: acts.setdefault(n, []).append(o[0])
                                            if o.shape[1] == 1 else None) for n, m in mlps.items()]
    try:
        for t in texts:
            enc = tok(t, return_tensors="pt")
            with torch.no_grad():
                model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=penalty,
                               pad_token_id=0, eos_token_id=tok.eos_token_id)
    finally:
        for h in hooks:
            h.remove()
    return {f"{n}.act_fn": torch.cat(v).double() for n, v in acts.items()}


def test_decode_token_scope_counts_what_decode_steps_feed():
    model, tok = tiny_causal_lm("llama", seed=2), char_tokenizer()
    calib = calibrate(model, tok, GEN_TEXTS, progress=False, token_scope="decode", max_new_tokens=6,
                      repetition_penalty=1.1, batch_size=2, kinds=("act",))
    for k, p in enumerate(GEN_TEXTS):
        ref = _decode_step_reference(model, tok, GEN_TEXTS[p], 6, 1.1)
        for site, a in ref.items():
            st = calib.stats[site]
            assert int(st.count[k]) == a.shape[0]
            torch.testing.assert_close(st.mean[k], a.mean(0), rtol=1e-4, atol=1e-5)
            assert torch.equal(st.pos[k], (a > 0).sum(0))
    with pytest.raises(ValueError, match="repetition_penalty"):
        calibrate(model, tok, GEN_TEXTS, progress=False, token_scope="decode", repetition_penalty=0.0)


def _npti_code_reference(model, target, opposite, strength):
    """The released induction with every neuron kept: at decode steps only, in layers that have a
    target neuron, clamp the opposite neurons (both-set ones too), then push the targets."""
    from persona_kernels.npti import push_strength

    hooks = []
    for site in target.sites:
        idx, diff, p95 = target.at(site)
        if not idx.numel():
            continue
        mlp = model.get_submodule(site.rpartition(".")[0])
        opp = opposite.at(site)[0]
        push = push_strength(diff, p95, strength).float()

        def hook(mod, a, o, idx=idx, opp=opp, push=push):
            if o.shape[1] != 1:
                return None
            o = o.clone()
            o[..., opp] = o[..., opp].clamp(max=0.0)
            o[..., idx] = o[..., idx] + push
            return o
        hooks.append(mlp.act_fn.register_forward_hook(hook))
    return hooks


def test_npti_code_induction_matches_the_released_rule():
    import persona_kernels.model as pm

    model, tok = tiny_causal_lm("llama", seed=3), char_tokenizer()
    calib = calibrate(model, tok, GEN_TEXTS, progress=False)
    target = identify_neurons(calib, "hi", "lo", min_neurons=30)
    opposite = identify_neurons(calib, "lo", "hi", min_neurons=30)
    # make one layer target-free and one neuron a member of both sets
    first = target.sites[0]
    keep = target.site != 0
    target = NeuronSet(target.aspect, target.opposite, target.sites, target.site[keep], target.index[keep], target.diff[keep],
                       target.p_aspect[keep], target.p_opposite[keep], target.p95[keep], target.fingerprint,
                       target.architecture)
    s0, i0 = int(target.site[0]), int(target.index[0])
    same_site = (opposite.site == s0).nonzero().flatten()
    assert same_site.numel()
    opposite.index[same_site[0]] = i0
    assert i0 in opposite.at(target.sites[s0])[0].tolist()  # a neuron in both sets
    assert not target.at(first)[0].numel() and opposite.at(first)[0].numel()
    enc = tok(["Hello there"], return_tensors="pt")
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    hooks = _npti_code_reference(model, target, opposite, 1.5)
    with torch.no_grad():
        want = model.generate(**enc, **kw)
    for h in hooks:
        h.remove()
    pm.apply_neurons(model, target, opposite, strength=1.5, keep_prob=1.0, mode="npti-code")
    assert first.rpartition(".")[0] not in pm._handle(model).neurons  # the target-free layer is untouched
    with torch.no_grad():
        got = model.generate(**enc, **kw)
        prompt_logits = model(**enc).logits
    pm.remove(model)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the prompt forward is not edited
        assert torch.equal(prompt_logits, model(**enc).logits)
    pm.apply_neurons(model, target, opposite, strength=1.5, keep_prob=1.0)  # the package's rule differs
    with torch.no_grad():
        package = model.generate(**enc, **kw)
    pm.remove(model)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(package.scores, want.scores))
    with pytest.raises(ValueError, match="unknown induction mode"):
        pm.apply_neurons(model, target, opposite, mode="paper")

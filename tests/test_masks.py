"""Persona masks against plain, independent implementations written here."""
import numpy as np
import pytest
import torch

from persona_kernels.calibrate import calibrate
from persona_kernels.fingerprint import FingerprintMismatch
from persona_kernels.masks import (
    MaskConfig,
    MaskStore,
    build_masks,
    contrastive_sparse_masks,
    contrastive_wanda_masks,
    pack_bits,
    select,
    soft_gate,
    unpack_bits,
    wanda_mask,
)
from persona_kernels.masks.build import layer_range, linear_weight
from persona_kernels.ops.topk_mask import topk_mask
from persona_kernels.testing import char_tokenizer, tiny_causal_lm

from conftest import kernel_backends

TOPK_BACKENDS = [p for p in kernel_backends() if p.values[0] in ("reference", "cpp")]


def plain_topk(score, k):
    """Rank by (score desc, column asc), keep the first k: a sort in plain Python."""
    score = np.asarray(score, dtype=np.float64)
    out = np.zeros(score.shape, dtype=bool)
    for r in range(score.shape[0]):
        order = sorted(range(score.shape[1]), key=lambda j: (-score[r, j], j))
        out[r, order[:k]] = True
    return out


def _w(out_f, in_f, seed):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_topk_mask_with_many_ties(backend, dtype):
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 4, (37, 123), generator=g).to(dtype)  # heavy ties
    for k in (0, 1, 40, 61, 122, 123):
        got = topk_mask(score, k, backend=backend)
        np.testing.assert_array_equal(got.numpy(), plain_topk(score.numpy(), k))


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
@pytest.mark.parametrize("granularity", ["row", "layer", "nm"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_wanda_mask_matches_plain(backend, granularity, sparsity):
    w, a = _w(23, 124, 1), torch.rand(124, dtype=torch.float64) + 0.1
    mask = wanda_mask(w, a, sparsity, granularity, n=2, m=4, backend=backend)
    score = (w.abs() * a.float()).numpy()
    if granularity == "row":
        want = plain_topk(score, int(124 * (1 - sparsity)))
        assert (mask.sum(1) == int(124 * (1 - sparsity))).all()
    elif granularity == "layer":
        want = plain_topk(score.reshape(1, -1), int(23 * 124 * (1 - sparsity))).reshape(23, 124)
    else:
        want = plain_topk(score.reshape(-1, 4), 2).reshape(23, 124)
        assert (mask.view(23, 31, 4).sum(-1) == 2).all()  # a valid 2:4 pattern
    np.testing.assert_array_equal(mask.numpy(), want)


def test_backends_agree_on_masks():
    w, a = _w(64, 96, 2), torch.rand(96)
    ref = wanda_mask(w, a, 0.7, backend="reference")
    assert torch.equal(wanda_mask(w, a, 0.7), ref)


def _stats(C, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(C, generator=g, dtype=torch.float64) + 0.5 for _ in range(4)]


@pytest.mark.parametrize("contrast", ["relu", "softplus"])
def test_contrastive_wanda_matches_plain(contrast):
    w = _w(19, 77, 3)
    mp, vp, mn, vn = _stats(77, 4)
    pos, neg = contrastive_wanda_masks(w, mp, vp, mn, vn, 0.6, contrast=contrast, tau=2.0)
    z = (mp.numpy() - mn.numpy()) / np.sqrt(vp.numpy() + vn.numpy() + 1e-6)
    if contrast == "relu":
        gp, gn = np.maximum(z, 0), np.maximum(-z, 0)
    else:
        gp, gn = np.log1p(np.exp(z / 2.0)), np.log1p(np.exp(-z / 2.0))
    k = int(77 * 0.4)
    wa = np.abs(w.numpy())
    np.testing.assert_array_equal(pos.numpy(), plain_topk(wa * gp.astype(np.float32), k))
    np.testing.assert_array_equal(neg.numpy(), plain_topk(wa * gn.astype(np.float32), k))
    if contrast == "relu":  # zeros of relu(z) tie: the lowest columns among them are taken, deterministically
        assert torch.equal(pos, contrastive_wanda_masks(w, mp, vp, mn, vn, 0.6, backend="reference")[0])


@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
def test_contrastive_sparse_is_disjoint_and_exact(sparsity):
    w = _w(21, 64, 5)
    ap, an = torch.rand(64, dtype=torch.float64) + 0.2, torch.rand(64, dtype=torch.float64) + 0.2
    pos, neg = contrastive_sparse_masks(w, ap, an, sparsity)
    k = int(64 * (1 - sparsity))
    assert not (pos & neg).any()
    assert (pos.sum(1) == k).all() and (neg.sum(1) == k).all()
    sp = np.abs(w.numpy()).astype(np.float32) * ap.numpy().astype(np.float32)
    sn = np.abs(w.numpy()).astype(np.float32) * an.numpy().astype(np.float32)
    d = sp / sp.sum(1, keepdims=True) - sn / sn.sum(1, keepdims=True)
    want_pos = np.zeros_like(pos.numpy())
    want_neg = np.zeros_like(neg.numpy())
    for r in range(21):
        want_pos[r, sorted(range(64), key=lambda j: (-d[r, j], j))[:k]] = True
        want_neg[r, sorted(range(64), key=lambda j: (d[r, j], -j))[:k]] = True
    np.testing.assert_array_equal(pos.numpy(), want_pos)
    np.testing.assert_array_equal(neg.numpy(), want_neg)
    # where + scores higher the parameter goes to +, at sparsity 0.5 the two masks partition each row
    if sparsity == 0.5:
        assert (pos | neg).all()
        assert pos.numpy()[d > 0].mean() > 0.9


def test_contrastive_sparse_ties_stay_disjoint():
    w = torch.ones(3, 10)
    a = torch.ones(10, dtype=torch.float64)
    pos, neg = contrastive_sparse_masks(w, a, a, 0.5)  # D == 0 everywhere
    assert pos[0].tolist() == [True] * 5 + [False] * 5 and neg[0].tolist() == [False] * 5 + [True] * 5


def test_soft_gate():
    m = torch.tensor([True, False, True])
    assert soft_gate(m, 0.0).tolist() == [1.0, 0.0, 1.0]
    assert soft_gate(m, 0.25).tolist() == [1.0, 0.25, 1.0]
    with pytest.raises(ValueError):
        soft_gate(m, 1.5)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 123])
def test_bitpack_roundtrip(n):
    m = torch.rand(5, n) > 0.5
    p = pack_bits(m)
    assert p.shape == (5, (n + 7) // 8) and p.dtype == torch.uint8
    assert torch.equal(unpack_bits(p, n), m)
    assert int(p[0, 0]) == sum(int(m[0, j]) << j for j in range(min(8, n)))  # LSB first


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "0.5", None])
def test_bad_sparsity(bad):
    with pytest.raises(ValueError, match="sparsity"):
        wanda_mask(_w(4, 8, 0), torch.rand(8), bad)


def test_bad_shapes_and_options():
    with pytest.raises(ValueError, match="expected \\(8,\\)"):
        wanda_mask(_w(4, 8, 0), torch.rand(7))
    with pytest.raises(ValueError, match="divisible by M"):
        select(torch.rand(4, 10), granularity="nm", n=2, m=4)
    with pytest.raises(ValueError, match="granularity"):
        select(torch.rand(4, 8), granularity="column")
    with pytest.raises(ValueError, match="sparsity must be >= 0.5"):
        contrastive_sparse_masks(_w(4, 8, 0), torch.rand(8), torch.rand(8), 0.3)
    with pytest.raises(ValueError, match="NaN/Inf"):
        wanda_mask(_w(4, 8, 0), torch.full((8,), float("nan")))
    with pytest.raises(ValueError, match="method"):
        MaskConfig(method="magic")
    with pytest.raises(ValueError, match="granularity must be 'row'"):
        MaskConfig(method="contrastive_sparse", granularity="layer")


# ---- whole models ------------------------------------------------------------------------------

TEXTS = {"extravert": ["I love parties!", "Everyone, come over tonight!", "Talking is fun."],
         "introvert": ["A quiet night in.", "I read alone.", "Silence helps me think."]}


@pytest.fixture(scope="module")
def llama_calib():
    model = tiny_causal_lm("llama", seed=3)
    return model, calibrate(model, char_tokenizer(), TEXTS, progress=False)


def test_build_masks_on_model(llama_calib, tmp_path):
    model, calib = llama_calib
    store = build_masks(model, calib, sparsity=0.7)
    assert store.personas == ["extravert", "introvert"]
    modules = dict(model.named_modules())
    for layer in store.layers:
        w = linear_weight(modules[layer])
        m = store.mask("extravert", layer)
        want = wanda_mask(w, calib.stats[layer].sample_norm_mean()[0], 0.7)
        assert torch.equal(m, want)
        assert (m.sum(1) == int(w.shape[1] * 0.3)).all()
    d = store.density("introvert")
    kept = sum(int(s[1] * 0.3) * s[0] for s in store.shapes.values())
    assert d["*"] == pytest.approx(kept / sum(s[0] * s[1] for s in store.shapes.values()))
    cmp = store.compare("extravert", "introvert")
    layer = store.layers[0]
    a, b = store.mask("extravert", layer), store.mask("introvert", layer)
    assert cmp[layer]["difference"] == pytest.approx((a ^ b).float().mean().item())
    assert cmp[layer]["overlap"] == pytest.approx((a & b).sum().item() / (a | b).sum().item())
    path = store.save(tmp_path / "m.safetensors")
    back = MaskStore.load(path, model=model)
    assert back.personas == store.personas and back.method == "wanda" and back.params["sparsity"] == 0.7
    assert all(torch.equal(back.packed[k], v) for k, v in store.packed.items())
    with pytest.raises(FingerprintMismatch):
        MaskStore.load(path, model=tiny_causal_lm("qwen2"))
    with pytest.raises(KeyError, match="not in this mask store"):
        store.mask("ambivert", layer)


def test_token_norm_and_mlp_only_and_contrastive(llama_calib):
    model, calib = llama_calib
    store = build_masks(model, calib, statistic="token_norm", mlp_only=True)
    assert store.layers and all(".mlp." in n for n in store.layers)
    layer = store.layers[0]
    w = linear_weight(dict(model.named_modules())[layer])
    assert torch.equal(store.mask("extravert", layer), wanda_mask(w, calib.stats[layer].wanda_norm()[0], 0.5))
    cs = build_masks(model, calib, method="contrastive_sparse", sparsity=0.5)
    for layer in cs.layers:
        assert not (cs.mask("extravert", layer) & cs.mask("introvert", layer)).any()
    cw = build_masks(model, calib, ["introvert", "extravert"], method="contrastive_wanda", contrast="softplus")
    assert cw.personas == ["introvert", "extravert"]


def test_build_masks_bad_input(llama_calib):
    model, calib = llama_calib
    with pytest.raises(KeyError, match="ambivert"):
        build_masks(model, calib, ["ambivert"])
    with pytest.raises(ValueError, match="exactly two"):
        build_masks(model, calib, ["extravert"], method="contrastive_wanda")
    with pytest.raises(FingerprintMismatch):
        build_masks(tiny_causal_lm("gpt2"), calib)
    with pytest.raises(ValueError, match="no calibrated linear layers"):
        build_masks(model, calib, layers=[9])


def test_gpt2_conv1d_orientation():
    model = tiny_causal_lm("gpt2", seed=1)
    calib = calibrate(model, char_tokenizer(), TEXTS, progress=False)
    store = build_masks(model, calib, sparsity=0.5)
    layer = "transformer.h.0.mlp.c_fc"
    conv = dict(model.named_modules())[layer]
    assert store.shapes[layer] == (conv.weight.shape[1], conv.weight.shape[0])
    assert torch.equal(store.mask("extravert", layer), wanda_mask(conv.weight.t(), calib.stats[layer].sample_norm_mean()[0], 0.5))


def _lex_brute(score, k, tb):
    out = torch.zeros_like(score, dtype=torch.bool)
    for r in range(score.shape[0]):
        order = sorted(range(score.shape[1]), key=lambda c: (-float(score[r, c]), -float(tb[r, c]), c))
        out[r, order[:k]] = True
    return out


@pytest.mark.parametrize("k", [0, 1, 5, 17, 40])
@pytest.mark.parametrize("backend", TOPK_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_topk_tie_break_is_lexicographic(k, backend, dtype):
    g = torch.Generator().manual_seed(k)
    score = torch.randint(0, 3, (9, 40), generator=g).to(dtype)  # many exact ties
    tb = torch.randint(0, 4, (9, 40), generator=g).to(dtype)     # ties in the tie-break too: then the column
    got = topk_mask(score, k, tie_break=tb, backend=backend)
    assert torch.equal(got, _lex_brute(score, k, tb))
    assert torch.equal(topk_mask(score, k, tie_break=torch.zeros_like(score)), topk_mask(score, k))  # column rule
    with pytest.raises(ValueError, match="tie_break"):
        topk_mask(score, k, tie_break=tb[:, :3])


def test_contrastive_wanda_ties_go_to_the_persona_wanda_score():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 32, generator=g)
    m_pos, m_neg = torch.rand(32, generator=g) + 0.5, torch.rand(32, generator=g) + 0.5
    m_pos[:24] = m_neg[:24] - 0.3  # z < 0 on 24 inputs: relu(z) = 0 ties for the + mask
    v = torch.full((32,), 0.01)
    pos, _ = contrastive_wanda_masks(w, m_pos, v, m_neg, v, sparsity=0.5)
    k = 16
    for r in range(6):
        assert int(pos[r].sum()) == k
        z_pos = (m_pos > m_neg).nonzero().squeeze(1)
        assert bool(pos[r, z_pos].all())  # every input with z > 0 first (8 of them)
        tied = [c for c in range(32) if c not in z_pos.tolist()]
        want = sorted(tied, key=lambda c: (-float(w[r, c].abs() * m_pos[c]), c))[:k - len(z_pos)]
        assert sorted(pos[r].nonzero().squeeze(1).tolist()) == sorted(z_pos.tolist() + want)
    col, _ = contrastive_wanda_masks(w, m_pos, v, m_neg, v, sparsity=0.5, tie_break="column")
    z_pos = (m_pos > m_neg).nonzero().squeeze(1).tolist()
    tied = [c for c in range(32) if c not in z_pos]
    want = torch.zeros(32, dtype=torch.bool)
    want[z_pos + tied[:k - len(z_pos)]] = True  # the parity rule: the lowest tied columns
    assert torch.equal(col, want.expand(6, 32))
    tiny, _ = contrastive_wanda_masks(w[:, :4], m_pos[:4], v[:4], m_neg[:4], v[:4], sparsity=0.9, tie_break="column")
    assert bool((tiny.sum(1) == 1).all())  # k = max(1, int(in (1 - s))) in the parity mode
    with pytest.raises(ValueError, match="tie_break"):
        contrastive_wanda_masks(w, m_pos, v, m_neg, v, tie_break="random")


def _released_contrastive_sparse(w, sx_p, sxx_p, n_p, sx_n, sxx_n, n_n, sparsity):
    """A re-implementation of the released contra.py formula (token-pooled E[x], E[x^2] - E[x]^2, torch.topk)."""
    mu_p, mu_n = sx_p / n_p, sx_n / n_n
    var_p, var_n = (sxx_p / n_p - mu_p ** 2).clamp(min=0), (sxx_n / n_n - mu_n ** 2).clamp(min=0)
    score = w.abs() * ((mu_p - mu_n).abs() / torch.sqrt(var_p + var_n + 1e-6)).float()
    k = int(w.shape[1] * (1 - sparsity))
    pos = torch.zeros_like(w, dtype=torch.bool).scatter_(1, torch.topk(score, k, dim=1).indices, True)
    neg_score = score.masked_fill(pos, float("-inf"))
    neg = torch.zeros_like(pos).scatter_(1, torch.topk(neg_score, k, dim=1).indices, True)
    return pos, neg


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_contrastive_sparse_code_matches_the_released_formula(sparsity):
    from persona_kernels.masks import contrastive_sparse_code_masks

    g = torch.Generator().manual_seed(int(sparsity * 10))
    w = torch.randn(7, 50, generator=g)
    xp, xn = torch.randn(300, 50, generator=g) * 1.3 + 0.2, torch.randn(200, 50, generator=g)
    want = _released_contrastive_sparse(w, xp.double().sum(0), (xp.double() ** 2).sum(0), 300,
                                        xn.double().sum(0), (xn.double() ** 2).sum(0), 200, sparsity)
    from persona_kernels import StatsState, accumulate_stats

    st_p, st_n = StatsState.empty(50), StatsState.empty(50)

    accumulate_stats(xp[None], st_p)
    accumulate_stats(xn[None], st_n)
    pos, neg = contrastive_sparse_code_masks(w, st_p.mean[0], st_p.var()[0], st_n.mean[0], st_n.var()[0], sparsity)
    assert torch.equal(pos, want[0])
    if sparsity >= 0.5:  # below 0.5 the - mask takes tied -inf entries, whose order torch.topk leaves open
        assert torch.equal(neg, want[1])
        assert not bool((pos & neg).any())
    else:
        assert torch.equal(neg & ~pos, want[1] & ~want[0]) and bool((pos & neg).any())  # they overlap
    assert bool((neg.sum(1) == pos.sum(1)).all())


@pytest.mark.parametrize("method", ["wanda", "contrastive_wanda"])
def test_difference_mode_removes_only_what_the_other_persona_keeps(llama_calib, method):
    model, calib = llama_calib
    pruned = build_masks(model, calib, method=method, sparsity=0.5)
    diff = build_masks(model, calib, method=method, sparsity=0.5, mode="difference")
    assert diff.params["mode"] == "difference"
    for layer in pruned.layers:
        ka, kb = pruned.mask("extravert", layer), pruned.mask("introvert", layer)
        da, db = diff.mask("extravert", layer), diff.mask("introvert", layer)
        assert torch.equal(~da, ~ka & kb) and torch.equal(~db, ~kb & ka)
        assert not (~da & ~db).any()  # no weight is removed for both personas
    assert diff.density("extravert")["*"] > 0.5
    with pytest.raises(ValueError, match="exactly two"):
        build_masks(model, calib, ["extravert"], mode="difference")
    with pytest.raises(ValueError, match="unknown mode"):
        build_masks(model, calib, mode="edit")


def test_layer_sets_and_per_layer_sparsity(llama_calib):
    model, calib = llama_calib
    assert layer_range(30, "all") is None
    assert layer_range(30, "last_third") == list(range(20, 30))
    assert layer_range(30, "middle_third") == list(range(10, 20))
    assert layer_range(7, "first_half") == [0, 1, 2, 3]  # round(3.5) == 4
    assert layer_range(2, "last_half") == [1]
    with pytest.raises(ValueError, match="unknown layer set"):
        layer_range(4, "some")
    store = build_masks(model, calib, sparsity=0.5, layer_sparsity={1: 0.75}, layers=layer_range(2, "last_half"))
    assert store.layers and all(".layers.1." in n for n in store.layers)
    for layer in store.layers:
        _, n = store.shapes[layer]
        assert (store.mask("extravert", layer).sum(1) == int(n * 0.25)).all()
    mixed = build_masks(model, calib, sparsity=0.5, layer_sparsity={"0": 0.25})
    for layer in mixed.layers:
        keep = 0.75 if ".layers.0." in layer else 0.5
        assert (mixed.mask("introvert", layer).sum(1) == int(mixed.shapes[layer][1] * keep)).all()
    with pytest.raises(ValueError, match="sparsity"):
        build_masks(model, calib, layer_sparsity={0: 1.5})


def test_a_nan_weight_is_named_when_building_masks():
    """A NaN in the last down_proj passes calibration (nothing calibrated reads its output) and
    must be named by build_masks, with the model and statistics unchanged."""
    from persona_kernels.calibrate import calibrate
    from persona_kernels.testing import char_tokenizer, tiny_causal_lm

    model, tok = tiny_causal_lm("llama", seed=0), char_tokenizer()
    calib = calibrate(model, tok, {"a": ["hello there", "x y z"], "b": ["quiet", "home"]}, progress=False)
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight[3, 5] = float("nan")
    from persona_kernels.fingerprint import model_fingerprint

    calib.fingerprint = model_fingerprint(model)  # a NaN the digest's samples may miss
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj: its weight holds NaN"):
        build_masks(model, calib)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.99])
def test_fused_row_selections_agree_across_backends(dtype, sparsity):
    """The mask methods' per-row kernels (scores computed in the selection pass) give the
    reference's masks bit for bit on every backend: odd shapes, half weights, heavy ties."""
    from persona_kernels.masks.methods import contrastive_sparse_code_masks, contrastive_sparse_masks, contrastive_wanda_masks

    g = torch.Generator().manual_seed(int(sparsity * 100))
    w = torch.randn(5, 123, generator=g).to(dtype)
    w[0, :40] = 0.5  # equal magnitudes: ties in every score
    a, b = torch.rand(123, generator=g, dtype=torch.float64) + 0.1, torch.rand(123, generator=g, dtype=torch.float64) + 0.1
    va, vb = a * 0.2, b * 0.3
    from persona_kernels.ops import registry

    results = {}
    for backend in registry.kernel_backends("topk_mask", "wanda", torch.device("cpu")):
        out = [wanda_mask(w, a, sparsity, backend=backend),
               *contrastive_wanda_masks(w, a, va, b, vb, sparsity, backend=backend),
               *contrastive_sparse_code_masks(w, a, va, b, vb, sparsity, backend=backend)]
        if sparsity >= 0.5:
            out += contrastive_sparse_masks(w, a, b, sparsity, backend=backend)
        results[backend] = out
    ref = results.pop("reference")
    for backend, out in results.items():
        for i, (got, want) in enumerate(zip(out, ref)):
            assert got.dtype == torch.bool and torch.equal(got, want), (backend, i)

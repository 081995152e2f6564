"""dense_linear (the dense GEMV of unmasked layers, e.g. the output head) against a float64
reference, its routing, its errors, its torch.library op, and DenseHead in a persona model."""
import pytest
import torch
import torch.nn.functional as F

import persona_kernels.model as pm
from persona_kernels.masks import MaskStore
from persona_kernels.ops import registry
from persona_kernels.ops.dense_linear import dense_linear, max_batch, route
from persona_kernels.ops.masked_linear import dispatch
from persona_kernels.testing import char_tokenizer, tiny_causal_lm

CPU = torch.device("cpu")
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
HAS_CPP = registry.get_kernel("dense_linear", "cpp") is not None
BACKENDS = [pytest.param("reference"),
            pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="no AVX-512 C++ build here"))]


def _data(batch, out_f, in_f, dtype, seed, lead=()):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    x = torch.randn(*lead, batch, in_f, generator=g).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype)
    return x, w, b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,out_f,in_f", [(1, 123, 123), (5, 123, 123), (9, 77, 45), (3, 40, 33), (17, 64, 96),
                                              (2, 31, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64_reference(backend, dtype, batch, out_f, in_f, bias):
    x, w, b = _data(batch, out_f, in_f, dtype, seed=batch * 1000 + out_f + in_f)
    b = b if bias else None
    y = dense_linear(x, w, b, backend=backend)  # outputs are poisoned under tests: every element must be written
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.dtype == dtype and y.shape == (batch, out_f)
    scale = want.abs().max().item()
    torch.testing.assert_close(y.double(), want, atol=TOL[dtype] * max(1.0, scale), rtol=TOL[dtype])


def test_leading_dims_and_empty_batch():
    x, w, b = _data(3, 29, 50, torch.float32, seed=4, lead=(2,))
    y = dense_linear(x, w, b)
    assert y.shape == (2, 3, 29)
    torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    assert dense_linear(torch.empty(0, 50), w, b).shape == (0, 29)


def test_auto_routes_small_cpu_batches_to_the_kernel():
    rows = max_batch(CPU, torch.float32)
    if not HAS_CPP:
        assert rows == 0 and route(torch.randn(1, 8), torch.randn(4, 8)) == "reference"
        return
    assert rows >= 1
    w = torch.randn(4, 8)
    assert route(torch.randn(1, 8), w) == "cpp"
    assert route(torch.randn(rows + 1, 8), w) == "reference"
    assert route(torch.randn(1, 8, dtype=torch.float64), w.double()) == "reference"  # no kernel for float64


def test_crossover_override_reaches_the_route():
    if not HAS_CPP:
        pytest.skip("no C++ kernel here")
    w = torch.randn(4, 8)
    try:
        dispatch.set_crossover("cpu", "dense", 0, backend="cpp", dtype=torch.float32)
        assert route(torch.randn(1, 8), w) == "reference"
    finally:
        dispatch._OVERRIDES.clear()
        dispatch.reload_table()
    assert route(torch.randn(1, 8), w) == "cpp"


def test_large_weights_have_their_own_crossover(tmp_path, monkeypatch):
    if not HAS_CPP:
        pytest.skip("no C++ kernel here")
    table = tmp_path / "crossover.json"
    table.write_text('{"cpu": {"dense:float32": {"backend": "cpp", "max_batch": 2, "large_min_bytes": 4096, '
                     '"large_max_batch": 6}}}')
    monkeypatch.setattr(dispatch, "_TABLE_FILE", str(table))
    small, large = torch.randn(4, 8), torch.randn(64, 16)  # 128 and 4096 bytes
    try:
        dispatch.reload_table()
        assert [route(torch.randn(n, w.shape[1]), w) for w in (small, large) for n in (2, 3, 6, 7)] == [
            "cpp", "reference", "reference", "reference", "cpp", "cpp", "cpp", "reference"]
        x = torch.randn(5, 16)
        torch.testing.assert_close(dense_linear(x, large), F.linear(x, large), atol=1e-5, rtol=1e-5)  # the kernel's rows
    finally:
        monkeypatch.undo()
        dispatch.reload_table()


@pytest.mark.parametrize("bad, err, match", [
    (lambda x, w, b: (x[:, :-1], w, b), ValueError, "features"),
    (lambda x, w, b: (x.double(), w, b), TypeError, "float64"),
    (lambda x, w, b: (x, w[0], b), ValueError, "2-D"),
    (lambda x, w, b: (x, w, b[:-1]), ValueError, "bias"),
    (lambda x, w, b: (x, w, b.half()), ValueError, "bias"),
    (lambda x, w, b: (x.to("meta"), w, b), ValueError, "meta"),
])
def test_bad_input_is_a_clear_error(bad, err, match):
    x, w, b = _data(2, 12, 10, torch.float32, seed=5)
    with pytest.raises(err, match=match):
        dense_linear(*bad(x, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, w, b = _data(3, 21, 19, torch.float32, seed=6)
    torch.library.opcheck(torch.ops.persona_kernels.dense_linear.default, (x, w, b, backend))
    torch.library.opcheck(torch.ops.persona_kernels.dense_linear.default, (x, w, None, backend))


def _masks(model, with_head=False):
    g = torch.Generator().manual_seed(1)
    return {p: {n: torch.rand(m.weight.shape, generator=g) < 0.5 for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and (n.endswith("_proj") or (with_head and n == "lm_head"))}
            for p in ("a", "b")}


def _persona_model():
    model = tiny_causal_lm("llama", seed=0, tie_word_embeddings=False).eval()
    ids = char_tokenizer()("a persona model", return_tensors="pt")["input_ids"]
    return model, MaskStore.from_masks(model, _masks(model)), ids


def test_dense_head_same_logits_exact_at_persona_none_and_removed_cleanly():
    model, store, ids = _persona_model()
    keys = list(model.state_dict())
    with torch.no_grad():
        pm.apply(model, store, dense_head=False)
        pm.set_persona(model, "a")
        want = model(ids).logits
        pm.remove(model)
        original = model(ids).logits
        head = model.lm_head
        h = pm.apply(model, store)
        assert type(model.lm_head).__name__ == "DenseHead" and "lm_head" in h.sped_up and "lm_head" not in h.swapped
        assert model.lm_head.weight is head.weight and list(model.state_dict()) == keys
        assert torch.equal(model(ids).logits, original)  # persona None: the original module itself
        pm.set_persona(model, "a")
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)
        out = model.generate(ids, max_new_tokens=3, do_sample=False)  # decode steps: batch 1 rows
        assert out.shape[1] == ids.shape[1] + 3
        pm.remove(model)
    assert model.lm_head is head and list(model.state_dict()) == keys


def test_dense_head_under_autocast_follows_the_original_module():
    model, store, ids = _persona_model()
    pm.apply(model, store, persona="a")
    x = torch.randn(1, 3, model.config.hidden_size)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for inp in (x, x.bfloat16()):  # float32 as the head, and a dtype it would refuse outside autocast
            y, want = model.lm_head(inp), model.lm_head.base(inp)
            assert y.dtype == torch.bfloat16 and torch.equal(y, want)  # F.linear's autocast rules


def test_dense_head_is_not_used_for_a_masked_head():
    model, _, ids = _persona_model()
    h = pm.apply(model, MaskStore.from_masks(model, _masks(model, with_head=True)), persona="a")
    assert "lm_head" in h.swapped and not h.sped_up and type(model.lm_head).__name__ == "MaskedLinear"
    pm.remove(model)


def test_dense_head_compiles_fullgraph():
    model, store, ids = _persona_model()
    pm.apply(model, store, persona="a")
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, fullgraph=True, backend="eager")(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_an_offloaded_head_is_left_to_its_hooks(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model, store, ids = _persona_model()
    n = model.config.num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(n)}, "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "disk"}
    with torch.no_grad():
        want = model(ids).logits
    accelerate.dispatch_model(model, device_map, main_device="cpu", offload_dir=str(tmp_path))
    h = pm.apply(model, store)
    assert not h.sped_up and type(model.lm_head) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want)
    pm.remove(model)

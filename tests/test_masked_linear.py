"""masked_linear: every format x backend available here against a float64 reference."""
import importlib
import json

import pytest
import torch
import torch.nn.functional as F

from persona_kernels.formats import (
    BitmapWeight,
    BlockSparseWeight,
    CompactedWeight,
    SemiStructuredUnsupported,
    SemiStructuredWeight,
    SharedBitmask,
)
from persona_kernels.formats.bitmap import PAD
from persona_kernels.masks import block_mask
from persona_kernels.ops.masked_linear import available_backends, masked_linear

ml = importlib.import_module("persona_kernels.ops.masked_linear")
# on a GPU machine the kernels run on the GPU; here (and on CI) on the CPU
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FORMATS = ["shared_bitmask", "bitmap", "compacted_out", "compacted_in", "block16x16", "block1x16"]
BACKENDS = ["reference", "torch", "triton", "cpp", "cuda"]


def _masks(fmt_name, out_f, in_f, density, P, g):
    if fmt_name.startswith("block"):
        br, bc = (16, 16) if fmt_name == "block16x16" else (1, 16)
        def one():
            if density in (0.0, 1.0):
                return torch.full((out_f, in_f), density == 1.0)
            return block_mask(torch.rand(out_f, in_f, generator=g), (br, bc), 1 - density)
        return torch.stack([one() for _ in range(P)]), (br, bc)
    m = torch.rand(P, out_f, in_f, generator=g) < density
    if density not in (0.0, 1.0) and out_f > 3:
        m[:, 2] = False  # an all-zero row
    return m, None


def make(fmt_name, out_f, in_f, dtype, density=0.5, P=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    masks, block = _masks(fmt_name, out_f, in_f, density, P, g)
    if fmt_name == "shared_bitmask":
        return SharedBitmask.from_dense(w, masks), w, masks
    if fmt_name.startswith("block"):
        return BlockSparseWeight.from_dense(w, masks, block), w, masks
    if fmt_name == "bitmap":
        return BitmapWeight.from_dense(w, masks[0]), w, masks[:1]
    return CompactedWeight.from_dense(w, masks[0], axis=fmt_name.split("_")[1]), w, masks[:1]


def check(fmt_name, backend, dtype, batch, out_f, in_f, density, seed=0, bias=True):
    fmt, w, masks = make(fmt_name, out_f, in_f, dtype, density, seed=seed)
    if backend not in available_backends(fmt, DEVICE):
        pytest.skip(f"no {backend} kernel for {fmt.kind} here")
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, in_f, generator=g).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    P = masks.shape[0]
    persona = torch.randint(0, P, (batch,), generator=g) if P > 1 else None
    y = masked_linear(x.to(DEVICE), fmt.to(DEVICE), None if b is None else b.to(DEVICE), persona=persona,
                      backend=backend).cpu()
    assert y.shape == (batch, out_f) and y.dtype == dtype
    rows = persona if persona is not None else torch.zeros(batch, dtype=torch.long)
    wm = (w.double().unsqueeze(0) * masks.double())[rows]                  # [batch, out, in]
    want = torch.einsum("bi,boi->bo", x.double(), wm) + (b.double() if bias else 0)
    # error budget: twice that of the same product computed by PyTorch in the input dtype, plus slack
    low = torch.einsum("bi,boi->bo", x.float(), wm.float()).to(dtype).double() + (b.double() if bias else 0)
    tol = 2 * (low - want).abs().max().item() + {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    err = (y.double() - want).abs().max().item()
    assert err <= tol, f"max error {err} > {tol}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt_name", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("batch", [1, 5, 16])
def test_formats_backends_dtypes_batches(fmt_name, backend, dtype, batch):
    out_f, in_f = (48, 96) if fmt_name.startswith("block") else (37, 123)
    check(fmt_name, backend, dtype, batch, out_f, in_f, 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt_name", FORMATS)
@pytest.mark.parametrize("density", [0.0, 0.1, 0.3, 0.9, 1.0])
def test_density_sweep(fmt_name, backend, density):
    out_f, in_f = (32, 64) if fmt_name.startswith("block") else (19, 70)
    check(fmt_name, backend, torch.float32, 2, out_f, in_f, density, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt_name", FORMATS)
@pytest.mark.parametrize("batch", [64, 257])
def test_large_batch(fmt_name, backend, batch):
    if backend == "triton" and batch > 64:
        pytest.skip("interpreter: keep the prefill size to the reference and native kernels")
    out_f, in_f = (32, 48) if fmt_name.startswith("block") else (33, 47)
    check(fmt_name, backend, torch.float32, batch, out_f, in_f, 0.3, seed=5, bias=False)


@pytest.mark.parametrize("backend", ["reference", "torch", "cpp"])
@pytest.mark.parametrize("fmt_name", ["bitmap", "compacted_out", "compacted_in"])
def test_bfloat16_native(fmt_name, backend):
    check(fmt_name, backend, torch.bfloat16, 3, 37, 123, 0.5)


def test_compacted_cpp_rejects_a_corrupt_index():
    if "cpp" not in available_backends(make("compacted_out", 8, 16, torch.float32)[0], torch.device("cpu")):
        pytest.skip("no C++ extension")
    fmt, _, _ = make("compacted_out", 8, 16, torch.float32, density=0.9)
    fmt.index[-1] = 8  # as if loaded from a damaged file
    with pytest.raises(RuntimeError, match="out of range"):
        masked_linear(torch.randn(2, 16), fmt, backend="cpp")


@pytest.mark.parametrize("fmt_name", ["shared_bitmask", "block16x16"])
def test_mixed_persona_batch_equals_per_persona_runs(fmt_name):
    fmt, w, masks = make(fmt_name, 48, 96, torch.float32, 0.4, P=3, seed=9)
    x = torch.randn(3, 4, 96)
    persona = torch.tensor([2, 0, 1])  # one persona per sequence
    for backend in available_backends(fmt, torch.device("cpu")):
        y = masked_linear(x, fmt, persona=persona, backend=backend)
        for s in range(3):
            single = masked_linear(x[s], fmt, persona=int(persona[s]), backend=backend)
            torch.testing.assert_close(y[s], single, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(single, F.linear(x[s], w * masks[persona[s]]), rtol=1e-4, atol=1e-4)


def test_auto_dispatch_matches_reference():
    for fmt_name in FORMATS:
        fmt, w, masks = make(fmt_name, 32, 64, torch.float32, 0.3, P=1, seed=2)
        for batch in (1, 8, 100):
            x = torch.randn(batch, 64)
            torch.testing.assert_close(masked_linear(x, fmt), F.linear(x, w * masks[0]), rtol=1e-4, atol=1e-4)


def test_bad_input():
    fmt, w, _ = make("shared_bitmask", 16, 32, torch.float32)
    with pytest.raises(ValueError, match="32 features"):
        masked_linear(torch.randn(2, 31), fmt, persona=0)
    with pytest.raises(TypeError, match="float16 but the weight is torch.float32"):
        masked_linear(torch.randn(2, 32).half(), fmt, persona=0)
    with pytest.raises(ValueError, match="out of range"):
        masked_linear(torch.randn(2, 32), fmt, persona=3)
    with pytest.raises(ValueError, match="holds 3 personas"):
        masked_linear(torch.randn(2, 32), fmt)
    with pytest.raises(ValueError, match="matches neither"):
        masked_linear(torch.randn(2, 32), fmt, persona=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="bias"):
        masked_linear(torch.randn(2, 32), fmt, torch.randn(15), persona=0)
    bm, _, _ = make("bitmap", 16, 32, torch.float32)
    with pytest.raises(ValueError, match="holds one persona"):
        masked_linear(torch.randn(2, 32), bm, persona=1)
    with pytest.raises(TypeError, match="WeightFormat"):
        masked_linear(torch.randn(2, 32), torch.randn(16, 32))
    with pytest.raises(ValueError, match="not block-structured"):
        BlockSparseWeight.from_dense(torch.randn(16, 32), torch.rand(16, 32) > 0.5, (16, 16))
    with pytest.raises(SemiStructuredUnsupported, match="CUDA"):
        m = torch.tensor([True, True, False, False]).repeat(16, 8)
        SemiStructuredWeight.from_dense(torch.randn(16, 32), m)


@pytest.mark.parametrize("fmt_name", FORMATS)
def test_roundtrip_save_load_and_footprint(fmt_name, tmp_path):
    fmt, w, masks = make(fmt_name, 48, 96, torch.float16, 0.3, P=2)
    back = type(fmt).load(fmt.save(tmp_path / "f.safetensors"))
    assert torch.equal(back.to_dense(0) if fmt.kind in ("shared_bitmask", "block") else back.to_dense(), w * masks[0])
    assert fmt.nbytes() > 0
    if fmt.kind == "bitmap":  # values + 1 bit per weight + row pointers
        assert fmt.nbytes() == (fmt.nnz + PAD) * 2 + 48 * 3 * 4 + 49 * 8
    if fmt.kind == "shared_bitmask":
        assert fmt.persona_nbytes() == 48 * 3 * 4 and fmt.persona_nbytes() <= fmt.dense_nbytes() / 16


@pytest.mark.parametrize("fmt_name", FORMATS)
def test_custom_op_registered_with_torch_library(fmt_name):
    from persona_kernels.ops.library import masked_linear_op  # noqa: F401 (registers the op)

    fmt, w, masks = make(fmt_name, 32, 80, torch.float32, 0.4, P=2)
    x, b = torch.randn(3, 80), torch.randn(32)
    prow = torch.tensor([1, 0, 1]) if fmt.kind in ml.MULTI_PERSONA else None
    tensors, ints = fmt.op_args()
    args = (x, fmt.kind, tensors, ints, b, prow, "reference")
    y = torch.ops.persona_kernels.masked_linear(*args)
    for r in range(3):
        p = 0 if prow is None else int(prow[r])
        torch.testing.assert_close(y[r], F.linear(x[r], w * masks[p], b), rtol=1e-4, atol=1e-4)
    torch.library.opcheck(torch.ops.persona_kernels.masked_linear.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("fmt_name", FORMATS)
def test_torch_compile_traces_without_graph_breaks(fmt_name):
    """fullgraph=True fails on any graph break; aot_eager runs the traced graph without codegen."""
    import torch._dynamo

    fmt, w, masks = make(fmt_name, 32, 80, torch.float32, 0.4, P=2)
    persona = torch.tensor([1, 0]) if fmt.kind in ml.MULTI_PERSONA else None
    b = torch.randn(32)

    def f(x):
        return masked_linear(x, fmt, b, persona=persona).relu()

    torch._dynamo.reset()
    ml.dispatch.reload_table()  # the route is worked out afresh while tracing
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for batch in (2, 2, 40):  # 40 rows: above the CPU crossover, the dense route
        x = torch.randn(2, batch // 2, 80)
        torch.testing.assert_close(compiled(x), f(x), rtol=1e-5, atol=1e-5)
    if persona is not None:  # the range check runs inside the op, also for traced calls
        persona[0] = 7
        with pytest.raises(ValueError, match="persona indices"):
            compiled(torch.randn(2, 1, 80))




def test_crossover_is_per_dtype_and_overridable():
    dispatch = ml.dispatch
    fmt32, _, _ = make("bitmap", 16, 64, torch.float32)
    fmt16, _, _ = make("bitmap", 16, 64, torch.bfloat16)
    if "cpp" not in available_backends(fmt32, torch.device("cpu")):
        pytest.skip("no C++ extension")
    assert dispatch.table_key("bitmap", torch.bfloat16) == "bitmap:bfloat16"
    key = ("cpu", dispatch.table_key("bitmap", torch.bfloat16))
    try:
        dispatch.set_crossover("cpu", "bitmap", 2, "cpp", dtype=torch.bfloat16)
        assert dispatch.choose(fmt16, torch.randn(2, 64).bfloat16()) == "cpp"
        assert dispatch.choose(fmt16, torch.randn(3, 64).bfloat16()) == "dense"
        assert dispatch.choose(fmt32, torch.randn(3, 64)) == "cpp"  # float32 keeps its own entry
    finally:
        dispatch._OVERRIDES.pop(key, None)
        dispatch.reload_table()


def test_stored_entries_merge_atomically_and_route(tmp_path, monkeypatch):
    dispatch = ml.dispatch
    table = tmp_path / "crossover.json"
    table.write_text('{"cpu": {"bitmap:float32": {"backend": "cpp", "max_batch": 16}}}')
    monkeypatch.setattr(dispatch, "_TABLE_FILE", str(table))
    fmt, _, _ = make("bitmap", 16, 64, torch.float32)
    if "cpp" not in available_backends(fmt, torch.device("cpu")):
        pytest.skip("no C++ extension")
    try:
        dispatch.reload_table()
        assert dispatch.choose(fmt, torch.randn(9, 64)) == "cpp"
        assert dispatch.store_entries({"cpu": {"bitmap:float32": {"backend": "cpp", "max_batch": 8}},
                                       "h100": {"bitmap": {"backend": "cuda", "max_batch": 1}}}) == str(table)
        assert dispatch.choose(fmt, torch.randn(9, 64)) == "dense"  # routed by the new table at once
        stored = json.loads(table.read_text())
        assert stored["cpu"]["bitmap:float32"]["max_batch"] == 8 and "h100" in stored
        assert [p.name for p in tmp_path.iterdir()] == ["crossover.json"]  # no temporary file left
    finally:
        monkeypatch.undo()
        dispatch.reload_table()


def test_min_sparsity_routes_denser_weights_to_the_fallback():
    """An entry's min_sparsity (measured on an H200: the bitmap kernel loses to cuBLAS below 70%)
    sends weights the format knows to be denser to the fallback; no device sync is needed."""
    dispatch = ml.dispatch
    sparse, _, _ = make("bitmap", 16, 64, torch.float32, density=0.2)
    dense_ish, _, _ = make("bitmap", 16, 64, torch.float32, density=0.6)
    compact, _, _ = make("compacted_out", 16, 64, torch.float32, density=0.6)
    assert 0.6 < sparse.known_sparsity() < 1.0 and dense_ish.known_sparsity() < 0.6
    assert abs(sparse.known_sparsity() - (1 - sparse.density)) < 1e-12  # the shape-only count is exact
    assert abs(compact.known_sparsity() - (1 - compact.density)) < 1e-12
    name = dispatch._sparse_backend("bitmap", torch.device("cpu"))
    if name is None:
        pytest.skip("no sparse bitmap kernel here")
    key = ("cpu", dispatch.table_key("bitmap", torch.float32))
    try:
        dispatch.set_crossover("cpu", "bitmap", 4, name, dtype=torch.float32, min_sparsity=0.6)
        x = torch.randn(2, 64)
        assert dispatch.choose(sparse, x) == name
        assert dispatch.choose(dense_ish, x) == "dense"
        assert dispatch.choose(dense_ish, x, mixed=True) == name  # a mixed batch never densifies
        with pytest.raises(ValueError, match="min_sparsity"):
            dispatch.set_crossover("cpu", "bitmap", 4, name, min_sparsity=1.5)
    finally:
        dispatch._OVERRIDES.pop(key, None)
        dispatch.reload_table()


@pytest.mark.parametrize("fmt_name", ["shared_bitmask", "block"])
def test_dense_route_with_an_int_persona_uses_that_personas_weight(fmt_name, monkeypatch):
    """Above the crossover an int persona takes its cached masked weight directly (no per-row
    unique(), a device sync per call on a GPU); each persona still gets its own weight."""
    dispatch = ml.dispatch
    fmt, w, masks = make(fmt_name, 24, 64, torch.float32, 0.5, P=3, seed=5)
    x = torch.randn(6, 64, dtype=torch.float64).float()
    monkeypatch.setattr(torch.Tensor, "unique", lambda *a, **k: (_ for _ in ()).throw(AssertionError("unique() called")))
    key = ("cpu", dispatch.table_key(fmt.kind, torch.float32))
    try:
        dispatch.set_crossover("cpu", fmt.kind, 0, dtype=torch.float32)
        assert dispatch.choose(fmt, x) == "dense"
        for p in (2, 0, 1):
            want = (x.double() @ (w.double() * masks[p].double()).T).float()
            torch.testing.assert_close(masked_linear(x, fmt, persona=p), want, rtol=1e-5, atol=1e-5)
    finally:
        dispatch._OVERRIDES.pop(key, None)
        dispatch.reload_table()


def test_mixed_persona_batches_take_the_kernel_at_any_size():
    """A mixed batch above the crossover must not fall back to densifying one weight per persona."""
    fmt, w, masks = make("shared_bitmask", 24, 64, torch.float32, 0.5, P=3, seed=4)
    if "cpp" not in available_backends(fmt, torch.device("cpu")):
        pytest.skip("no C++ extension")
    x = torch.randn(40, 64)
    persona = torch.arange(40) % 3
    assert ml.dispatch.choose(fmt, x, mixed=True) == "cpp"
    assert ml.dispatch.choose(fmt, x, mixed=False) == "dense"  # one persona, large batch: cached dense GEMM
    y = masked_linear(x, fmt, persona=persona)
    want = torch.einsum("bi,boi->bo", x.double(), (w.double() * masks.double())[persona])
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the interpreter runs on the CPU only")
def test_bfloat16_is_refused_by_the_triton_interpreter():
    """The interpreter has no bf16 arithmetic (w=[[0.5]], x=[[1],[2]] gave ~2.6e8): a clear error
    instead of garbage, for every op with a Triton kernel."""
    import math

    from persona_kernels import BackendUnavailable, StatsConfig, accumulate_stats, induce_neurons
    from persona_kernels.backends import triton_interpreter

    if not triton_interpreter():
        pytest.skip("TRITON_INTERPRET is not set")
    fmt = BitmapWeight.from_dense(torch.tensor([[0.5]]).bfloat16(), torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(BackendUnavailable, match="no bfloat16 arithmetic"):
        masked_linear(torch.tensor([[1.0], [2.0]]).bfloat16(), fmt, backend="triton")
    with pytest.raises(BackendUnavailable, match="no bfloat16"):
        accumulate_stats(torch.randn(2, 3, 4).bfloat16(), config=StatsConfig(), backend="triton")
    with pytest.raises(BackendUnavailable, match="no bfloat16"):
        induce_neurons(torch.randn(2, 4).bfloat16(), torch.zeros(4, dtype=torch.bool), torch.zeros(4), backend="triton")
    y = masked_linear(torch.tensor([[1.0], [2.0]]), BitmapWeight.from_dense(torch.tensor([[0.5]]), torch.ones(1, 1, dtype=torch.bool)),
                      backend="triton")
    assert torch.allclose(y, torch.tensor([[0.5], [1.0]])) and not math.isnan(float(y.sum()))


@pytest.mark.parametrize("axis", ["out", "in"])
def test_compacted_pads_the_kept_count_with_removed_rows(axis):
    """The compact weight's kept count is rounded up to a multiple of 8 with rows (columns) the
    mask removes, zeros in the compact weight: the product and the dense weight are unchanged,
    and a mask that keeps (almost) everything is never padded past the layer."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(37, 29, generator=g)
    neurons = torch.rand(37 if axis == "out" else 29, generator=g) < 0.3
    m = (neurons[:, None] if axis == "out" else neurons[None, :]).expand(37, 29) & (torch.rand(37, 29, generator=g) < 0.9)
    fmt = CompactedWeight.from_dense(w, m, axis=axis)
    n = fmt.index.numel()
    assert n % 8 == 0 and n >= int(m.any(1 if axis == "out" else 0).sum())
    assert torch.equal(fmt.index, fmt.index.sort().values) and fmt.index.unique().numel() == n
    torch.testing.assert_close(fmt.to_dense(), w * m, rtol=0, atol=0)
    x = torch.randn(5, 29, generator=g)
    want = (x.double() @ (w.double() * m.double()).T).float()
    for backend in available_backends(fmt, torch.device("cpu")):
        torch.testing.assert_close(masked_linear(x, fmt, backend=backend), want, rtol=1e-5, atol=1e-5)
    full = CompactedWeight.from_dense(w, torch.ones(37, 29, dtype=torch.bool), axis=axis)
    assert full.index.numel() == (37 if axis == "out" else 29)


def test_crossover_table_choice_per_device_class():
    """A device class uses its own table; a GPU without one takes the nearest measured GPU's
    (the H200's); a CPU class without one has none (the conservative rule)."""
    dispatch = ml.dispatch
    assert dispatch.table_class("cpu", False) == "cpu"
    assert dispatch.table_class("h200", True) == "h200"
    assert dispatch.table_class("h100", True) == dispatch.NEAREST_MEASURED_GPU == "h200"
    assert dispatch.table_class("other-cpu", False) is None
    assert "measured here" in dispatch.describe_table(torch.device("cpu"))

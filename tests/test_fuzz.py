"""Property-based fuzzing (hypothesis) of every op's arguments against a float64 computation
written here, on every backend that runs on this machine. Bounded: few examples, small shapes
(the Triton interpreter is slow), no deadline."""
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import persona_kernels as pk  # noqa: E402
from persona_kernels import StatsConfig  # noqa: E402
from persona_kernels.formats import BitmapWeight, CompactedWeight, SharedBitmask  # noqa: E402
from persona_kernels.ops import registry  # noqa: E402
from persona_kernels.ops.induce_neurons.reference import ACTIVATIONS  # noqa: E402
from persona_kernels.ops.topk_mask import topk_mask  # noqa: E402

FUZZ = settings(max_examples=25, deadline=None, derandomize=True)
DTYPES = st.sampled_from([torch.float32, torch.float16])


def _backends(op, fmt=None):
    return [b for b in registry.kernel_backends(op, fmt, torch.device("cpu"))]


def _tensor(seed, shape, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@FUZZ
@given(B=st.integers(1, 4), T=st.integers(1, 9), C=st.integers(1, 37), P=st.integers(1, 3), dtype=DTYPES,
       seed=st.integers(0, 2**16), scale=st.sampled_from([1e-3, 1.0, 300.0]))
def test_accumulate_stats_fuzz(B, T, C, P, dtype, seed, scale):
    x = _tensor(seed, (B, T, C), dtype, scale)
    g = torch.Generator().manual_seed(seed + 1)
    valid = torch.rand(B, T, generator=g) > 0.3
    seg = torch.randint(0, P, (B,), generator=g)
    xd = x.double()
    for backend in _backends("accumulate_stats"):
        s = pk.accumulate_stats(x, valid=valid, segment_ids=seg, config=StatsConfig(num_personas=P), backend=backend)
        for p in range(P):
            rows = xd[(seg == p)][valid[seg == p]]  # [n, C] valid tokens of persona p
            assert int(s.count[p]) == rows.shape[0], backend
            if rows.shape[0]:
                torch.testing.assert_close(s.mean[p], rows.mean(0), rtol=2e-5, atol=1e-6 * scale)  # float32 partials
                torch.testing.assert_close(s.max[p], rows.amax(0), rtol=0, atol=0)
                var = rows.var(0, unbiased=False)
                torch.testing.assert_close(s.m2[p] / rows.shape[0], var, rtol=1e-4, atol=1e-6 * scale * scale)


@FUZZ
@given(rows=st.integers(1, 6), n=st.integers(1, 40), frac=st.floats(0, 1), ties=st.booleans(), seed=st.integers(0, 2**16))
def test_topk_mask_fuzz(rows, n, frac, ties, seed):
    score = _tensor(seed, (rows, n)).double()
    if ties:
        score = score.round()
    k = int(round(frac * n))
    want = torch.zeros(rows, n, dtype=torch.bool)
    for r in range(rows):  # the total order (score desc, column asc), by brute force
        order = sorted(range(n), key=lambda j: (-float(score[r, j]), j))
        want[r, order[:k]] = True
    for backend in _backends("topk_mask"):
        assert torch.equal(topk_mask(score, k, backend=backend), want), backend


@FUZZ
@given(N=st.integers(1, 5), I=st.integers(1, 50), act=st.sampled_from([None, "silu", "gelu_tanh"]), dtype=DTYPES,
       seed=st.integers(0, 2**16))
def test_induce_neurons_fuzz(N, I, act, dtype, seed):
    a = _tensor(seed, (N, I), dtype, 3.0)
    g = torch.Generator().manual_seed(seed + 1)
    deact = torch.rand(I, generator=g) > 0.5
    add = torch.rand(I, generator=g) * (torch.rand(I, generator=g) > 0.5)
    f = a.double() if act is None else ACTIVATIONS[act](a.double())
    want = torch.where(deact, f.clamp(max=0), f) + add.double()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for backend in _backends("induce_neurons"):
        got = pk.induce_neurons(a, deact, add, backend=backend, act=act)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 4, msg=lambda m: f"{backend}: {m}")


@FUZZ
@given(batch=st.integers(1, 20), out_f=st.integers(1, 40), in_f=st.integers(1, 70), density=st.floats(0, 1),
       fmt=st.sampled_from(["bitmap", "shared_bitmask", "compacted"]), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_masked_linear_fuzz(batch, out_f, in_f, density, fmt, dtype, seed):
    w = _tensor(seed, (out_f, in_f), dtype)
    x = _tensor(seed + 1, (batch, in_f), dtype)
    g = torch.Generator().manual_seed(seed + 2)
    if fmt == "compacted":  # whole output rows kept or removed
        mask = (torch.rand(out_f, 1, generator=g) < density).expand(out_f, in_f).clone()
        weight = CompactedWeight.from_dense(w, mask)
    else:
        mask = torch.rand(out_f, in_f, generator=g) < density
        weight = BitmapWeight.from_dense(w, mask) if fmt == "bitmap" else SharedBitmask.from_dense(w, mask[None])
    want = x.double() @ (w.double() * mask).t()
    tol = (1e-4 if dtype == torch.float32 else 2e-2) * math.sqrt(in_f)
    for backend in ml_backends(weight):
        got = pk.masked_linear(x, weight, backend=backend, **({"persona": 0} if fmt == "shared_bitmask" else {}))
        assert got.shape == (batch, out_f) and got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=lambda m: f"{fmt}/{backend}: {m}")


def ml_backends(weight):
    from persona_kernels.ops.masked_linear import available_backends

    return available_backends(weight, torch.device("cpu"))

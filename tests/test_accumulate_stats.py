"""accumulate_stats against a float64 NumPy oracle, on every backend that runs here."""
import functools
import math

import numpy as np
import pytest
import torch

import persona_kernels as pk
from persona_kernels import StatsConfig, StatsState
from persona_kernels.ops import registry
from persona_kernels.ops.accumulate_stats import NonFiniteActivationError
from persona_kernels.ops.accumulate_stats.partials import reduce_partials, valid_counts
from persona_kernels.stats import npti_edges

from conftest import kernel_backends
from stats_oracle import oracle

BACKENDS = kernel_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(5, 123, 123), (3, 1, 7), (1, 70, 1), (4, 33, 65)]
EXACT = ("count", "pos", "samples", "hist", "min", "max", "absmax")


def _skip_unsupported(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter has no bf16 arithmetic; bf16 Triton runs on a GPU")


def _inputs(shape, dtype, P, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    B, T, C = shape
    x = (torch.randn(B, T, C, generator=g) * scale + 0.3 * torch.rand(C, generator=g)).to(dtype)
    valid = torch.rand(B, T, generator=g) > 0.25
    valid[0, 0] = True  # at least one valid token
    seg = torch.randint(0, P, (B,), generator=g)
    return x, valid, seg


def assert_state_matches(state: StatsState, expected: dict, rtol=2e-5):
    for key, want in expected.items():
        got = getattr(state, key).double().numpy() if key != "hist" else state.hist.numpy()
        if key in EXACT:
            np.testing.assert_array_equal(got, want, err_msg=key)
        else:
            scale = np.abs(want).max() if want.size else 1.0
            np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(scale, 1e-12), err_msg=key)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_oracle(backend, dtype, shape):
    _skip_unsupported(backend, dtype)
    P = 3
    x, valid, seg = _inputs(shape, dtype, P, seed=hash(shape) % 1000)
    state = pk.accumulate_stats(x, valid=valid, segment_ids=seg,
                                config=StatsConfig(num_personas=P, histogram=True), backend=backend)
    want = oracle(x.double().numpy(), valid.numpy(), seg.numpy(), P, npti_edges())
    assert_state_matches(state, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_chunk_kernels_and_custom_edges(backend):
    """Small chunks force the Chan merge across many chunks of one sample; custom edges."""
    if backend == "reference":
        pytest.skip("the reference uses one chunk per sample")
    kernel = registry.kernel("accumulate_stats", backend)
    kernel = functools.partial(kernel, rows_per_chunk=7)
    x, valid, seg = _inputs((3, 50, 37), torch.float32, 2, seed=7, scale=3.0)
    edges = torch.tensor([-2.0, -0.5, 0.0, 0.25, 1.0, 4.0])
    part = kernel(x, valid, seg, edges, 2)
    assert len(part.chunks) == 3 * 8
    n = valid_counts(part.chunks, valid.reshape(-1))
    state = reduce_partials(part, n, 3, 2, edges)
    assert_state_matches(state, oracle(x.double().numpy(), valid.numpy(), seg.numpy(), 2, edges.tolist()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_offset_values_keep_variance(backend):
    """Welford/Chan keeps the variance of data with a huge mean (E[x^2]-E[x]^2 would not)."""
    g = torch.Generator().manual_seed(3)
    x = (1000.0 + 0.01 * torch.randn(2, 40, 9, generator=g)).float()
    state = pk.accumulate_stats(x, backend=backend)
    want = x.double().reshape(-1, 9).var(0, unbiased=False)
    torch.testing.assert_close(state.var()[0], want, rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_splits_merge_exactly(backend):
    x, valid, seg = _inputs((9, 21, 30), torch.float32, 2, seed=11)
    cfg = StatsConfig(num_personas=2, histogram=True)
    whole = pk.accumulate_stats(x, valid=valid, segment_ids=seg, config=cfg, backend=backend)
    rng = np.random.default_rng(0)
    for _ in range(3):
        cuts = np.sort(rng.choice(np.arange(1, 9), size=3, replace=False))
        parts = []
        for a, b in zip([0, *cuts], [*cuts, 9]):
            parts.append(pk.accumulate_stats(x[a:b], valid=valid[a:b], segment_ids=seg[a:b], config=cfg, backend=backend))
        merged = parts[0]
        for p in parts[1:]:
            merged = merged.merge(p)
        # and the same splits accumulated into one running state
        running = StatsState.empty(30, cfg)
        for a, b in zip([0, *cuts], [*cuts, 9]):
            pk.accumulate_stats(x[a:b], running, valid=valid[a:b], segment_ids=seg[a:b], backend=backend)
        for got in (merged, running):
            for k, v in whole.tensors().items():
                if v.dtype.is_floating_point and k != "edges":
                    torch.testing.assert_close(getattr(got, k), v, rtol=1e-10, atol=1e-9, msg=k)
                else:
                    assert torch.equal(getattr(got, k), v), k


def test_backends_agree_with_each_other():
    x, valid, seg = _inputs((4, 30, 50), torch.float16, 2, seed=5)
    cfg = StatsConfig(num_personas=2, histogram=True)
    ref = pk.accumulate_stats(x, valid=valid, segment_ids=seg, config=cfg, backend="reference")
    for name in ("triton", "cpp"):
        if not pk.backends.available(name, torch.device("cpu")):
            continue
        other = pk.accumulate_stats(x, valid=valid, segment_ids=seg, config=cfg, backend=name)
        assert torch.equal(other.hist, ref.hist) and torch.equal(other.pos, ref.pos)
        torch.testing.assert_close(other.norm_mean, ref.norm_mean, rtol=1e-5, atol=1e-6)


def test_readouts():
    x = torch.tensor([[[1.0, -2.0], [3.0, 0.5], [-1.0, 0.0]]])
    s = pk.accumulate_stats(x, config=StatsConfig(histogram=True), backend="reference")
    torch.testing.assert_close(s.firing_prob()[0], torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(s.wanda_norm()[0], torch.tensor([math.sqrt(11), math.sqrt(4.25)], dtype=torch.float64))
    torch.testing.assert_close(s.var()[0], torch.tensor([np.var([1, 3, -1]), np.var([-2, 0.5, 0])], dtype=torch.float64))
    torch.testing.assert_close(s.sample_norm_mean()[0], s.wanda_norm()[0])  # one sample
    assert float(s.sample_norm_var()[0, 0]) == 0.0
    # NPTI read-out: lower edge of the first bin whose cumulative count reaches q%
    # channel 0 values 1, 3, -1: bins (-inf,0], (0.99,1.0], (2.99,3.0] -> 50% is reached at (0.99, 1.0]
    assert s.percentile(50)[0, 0].item() == pytest.approx(0.99, abs=1e-6)
    assert s.percentile(10)[0, 0].item() == -math.inf
    assert s.percentile(100)[0, 0].item() == pytest.approx(2.99, abs=1e-6)
    interp = s.percentile(10, method="interpolate")[0, 0].item()
    assert -1.0 <= interp <= 0.0  # the open first bin is bounded by the observed minimum
    with pytest.raises(ValueError, match="q must be"):
        s.percentile(120)


def test_empty_persona_readouts_are_nan():
    s = pk.accumulate_stats(torch.randn(1, 4, 3), config=StatsConfig(num_personas=2), backend="reference")
    assert torch.isnan(s.firing_prob()[1]).all() and torch.isnan(s.var()[1]).all()
    assert s.count.tolist() == [4, 0] and s.samples.tolist() == [1, 0]


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_rejected_and_state_unchanged(backend):
    cfg = StatsConfig(num_personas=2, histogram=True)
    x, valid, seg = _inputs((3, 10, 12), torch.float32, 2, seed=1)
    state = pk.accumulate_stats(x, valid=valid, segment_ids=seg, config=cfg, backend=backend)
    before = state.clone()
    for bad in (math.nan, math.inf, -math.inf):
        y = x.clone()
        y[1, 3, 5] = bad
        v = valid.clone()
        v[1, 3] = True
        with pytest.raises(NonFiniteActivationError, match="NaN or Inf"):
            pk.accumulate_stats(y, state, valid=v, segment_ids=seg, backend=backend)
        for k, t in before.tensors().items():
            assert torch.equal(getattr(state, k), t), k
    # NaN under padding is ignored
    y = x.clone()
    y[1, 3, 5] = math.nan
    v = valid.clone()
    v[1, 3] = False
    pk.accumulate_stats(y, state, valid=v, segment_ids=seg, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_activations_are_refused_alike_by_every_backend(backend):
    """|x| up to 1e15 is accepted (and agrees with the oracle), beyond it every backend refuses,
    padding included in neither: no backend's float32 sum of squares may overflow silently."""
    x, valid, seg = _inputs((3, 40, 12), torch.float32, 2, seed=4)
    v = valid.clone()
    v[1, 3] = True
    y = x.clone()
    y[1, 3, 5] = 9e14
    state = pk.accumulate_stats(y, valid=v, segment_ids=seg, config=StatsConfig(num_personas=2), backend=backend)
    want = oracle(y, v, seg, 2, None)
    torch.testing.assert_close(state.absmax[int(seg[1]), 5], torch.tensor(want["absmax"][int(seg[1]), 5], dtype=torch.float64))
    for big in (2e15, 1e19, 3e38):
        y[1, 3, 5] = big
        with pytest.raises(NonFiniteActivationError, match="beyond"):
            pk.accumulate_stats(y, valid=v, segment_ids=seg, config=StatsConfig(num_personas=2), backend=backend)
    v[1, 3] = False  # under padding it is ignored
    pk.accumulate_stats(y, valid=v, segment_ids=seg, config=StatsConfig(num_personas=2), backend=backend)


def test_bad_inputs_give_clear_errors():
    state = StatsState.empty(8, StatsConfig(num_personas=2))
    with pytest.raises(ValueError, match="channels"):
        pk.accumulate_stats(torch.randn(2, 3, 9), state)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        pk.accumulate_stats(torch.randn(2, 3, 8).double(), state)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        pk.accumulate_stats(torch.ones(2, 3, 8, dtype=torch.int32), state)
    with pytest.raises(ValueError, match=r"segment_ids must be in \[0, 2\)"):
        pk.accumulate_stats(torch.randn(2, 3, 8), state, segment_ids=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        pk.accumulate_stats(torch.randn(2, 3, 8), state, segment_ids=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="valid must be a tensor of shape"):
        pk.accumulate_stats(torch.randn(2, 3, 8), state, valid=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 2-D"):
        pk.accumulate_stats(torch.randn(8), state)
    with pytest.raises(ValueError, match="unknown backend"):
        pk.accumulate_stats(torch.randn(2, 3, 8), state, backend="tpu")
    with pytest.raises(ValueError, match="num_personas"):
        StatsConfig(num_personas=0)
    with pytest.raises(ValueError, match="strictly increasing"):
        StatsConfig(histogram=True, edges=[0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="cannot merge"):
        state.merge(StatsState.empty(9, StatsConfig(num_personas=2)))
    assert state.count.tolist() == [0, 0]  # nothing above touched the state


def test_missing_backend_is_a_clear_error():
    if pk.backends.available("cuda", torch.device("cpu")):
        pytest.skip("cuda available")
    with pytest.raises(pk.BackendUnavailable, match="cuda"):
        pk.accumulate_stats(torch.randn(2, 3, 8), backend="cuda")


def test_empty_input_is_a_noop():
    state = pk.accumulate_stats(torch.randn(0, 5, 4))
    assert state.count.tolist() == [0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_pending_stats_equal_call_by_call(backend):
    """PendingStats defers stage 2 over many calls (and flushes by size): the same statistics as
    accumulating each call, counts and histograms exactly; a NaN is refused at its own call."""
    from persona_kernels.ops.accumulate_stats import PendingStats

    cfg = StatsConfig(num_personas=3, histogram=True)
    direct = StatsState.empty(37, cfg)
    deferred = PendingStats(StatsState.empty(37, cfg), backend=backend, max_rows=7)  # flushes in between too
    for seed in range(6):
        x, valid, seg = _inputs((4, 9 + seed, 37), torch.float32, 3, seed=seed)
        pk.accumulate_stats(x, direct, valid=valid, segment_ids=seg, backend=backend)
        deferred.add(x, valid, seg)
    bad = torch.full((1, 3, 37), math.nan)
    with pytest.raises(NonFiniteActivationError):
        deferred.add(bad, torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, dtype=torch.int64))
    got = deferred.flush()
    for k, t in direct.tensors().items():
        if k in EXACT:
            assert torch.equal(getattr(got, k), t), k
        else:
            torch.testing.assert_close(getattr(got, k), t, rtol=1e-9, atol=1e-9, msg=lambda m: f"{k}: {m}")


def test_deferred_nonfinite_check_drops_the_pending_calls_and_names_the_call(monkeypatch):
    """On an accelerator PendingStats checks NaN/Inf without a host read per call: at flush (or
    every CHECK_EVERY calls) it raises, names the call, and accumulates none of the pending
    calls; the state keeps what earlier flushes folded in. Run here by forcing the deferred mode."""
    from persona_kernels.ops import accumulate_stats as acc

    monkeypatch.setattr(acc, "DEFER_CHECKS_ON_CPU", True)
    cfg = StatsConfig(num_personas=2, histogram=True)
    pending = acc.PendingStats(StatsState.empty(19, cfg))
    assert pending.deferred
    reference = StatsState.empty(19, cfg)
    x, valid, seg = _inputs((3, 7, 19), torch.float32, 2, seed=1)
    pending.add(x, valid, seg)
    pk.accumulate_stats(x, reference, valid=valid, segment_ids=seg)
    pending.flush()
    bad = torch.randn(2, 5, 19)
    bad[1, 2, 4] = math.inf
    for seed in (2, 3):
        x, valid, seg = _inputs((3, 7, 19), torch.float32, 2, seed=seed)
        pending.add(x, valid, seg)
    pending.add(bad, torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, dtype=torch.int64))  # no raise yet
    with pytest.raises(NonFiniteActivationError, match=r"call 3 of the 3 since the last flush.*none of those calls"):
        pending.flush()
    got = pending.flush()  # nothing pending any more: the state is the first flush's
    for k, t in reference.tensors().items():
        assert torch.equal(getattr(got, k), t), k
    monkeypatch.setattr(acc, "CHECK_EVERY", 2)  # the periodic check raises before any flush
    pending.add(bad, torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(NonFiniteActivationError, match="call 1 of the 2"):
        pending.add(*_inputs((3, 7, 19), torch.float32, 2, seed=4))

"""pytest-benchmark suite: `pytest benchmarks/` (not part of `make test`)."""
import pytest
import torch
from bench_accumulate_stats import eager_stats

import persona_kernels as pk
from persona_kernels import backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = (16384, 4096)


@pytest.fixture(scope="module")
def x():
    return torch.randn(1, *SHAPE, device=DEVICE)


def test_eager_multi_op(benchmark, x):
    benchmark(eager_stats, x)


@pytest.mark.parametrize("backend", ["cpp", "cuda", "triton", "reference"])
def test_fused(benchmark, x, backend):
    if not backends.available(backend, DEVICE) or (backends.triton_interpreter() and backend == "triton"):
        pytest.skip(f"{backend} not available on {DEVICE}")
    state = pk.StatsState.empty(SHAPE[1], device=DEVICE)
    benchmark(pk.accumulate_stats, x, state, backend=backend)

"""pytest-benchmark suite for the NPTI induction op (`pytest benchmarks/`)."""
import pytest
import torch

from persona_kernels import backends
from persona_kernels.ops.induce_neurons import induce_neurons

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
A = torch.randn(2048, 14336, device=DEV)
DEACT = torch.rand(14336, device=DEV) > 0.9
ADD = torch.rand(14336, device=DEV) * (torch.rand(14336, device=DEV) > 0.9)


@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_induce(benchmark, backend, act):
    if not backends.available(backend, DEV) or (backend == "triton" and backends.triton_interpreter()):
        pytest.skip(f"{backend} not available")
    benchmark(induce_neurons, A, DEACT, ADD, backend=backend, act=act)

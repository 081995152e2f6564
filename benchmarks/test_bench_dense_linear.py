"""pytest-benchmark suite for the dense GEMV (`pytest benchmarks/`): SmolLM2's output head, batch 1."""
import pytest
import torch
import torch.nn.functional as F

from persona_kernels.ops import registry
from persona_kernels.ops.dense_linear import dense_linear

W = torch.randn(49152, 576)
X = torch.randn(1, 576)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_dense_linear_head(benchmark, backend):
    if registry.get_kernel("dense_linear", backend) is None:
        pytest.skip(f"no {backend} kernel here")
    benchmark(dense_linear, X, W, backend=backend)


def test_f_linear_head(benchmark):
    benchmark(F.linear, X, W)

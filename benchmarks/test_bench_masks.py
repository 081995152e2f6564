"""pytest-benchmark suite for mask building (`pytest benchmarks/`)."""
import torch

from persona_kernels.masks import wanda_mask

W = torch.randn(14336, 4096)
A = torch.rand(4096, dtype=torch.float64)


def test_wanda_mask_14336x4096(benchmark):
    benchmark.pedantic(wanda_mask, args=(W, A, 0.5), rounds=3, iterations=1)

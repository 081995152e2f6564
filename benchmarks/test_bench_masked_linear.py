"""pytest-benchmark suite for masked_linear (`pytest benchmarks/`; not part of `make test`)."""
import pytest
import torch
import torch.nn.functional as F
from bench_masked_linear import make_formats

from persona_kernels.ops.masked_linear import available_backends, masked_linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
W = torch.randn(14336, 4096, dtype=DTYPE, device=DEVICE)
X = torch.randn(1, 4096, dtype=DTYPE, device=DEVICE)


def test_dense(benchmark):
    benchmark(F.linear, X, W)


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
@pytest.mark.parametrize("fmt_name", ["bitmap", "compacted"])
def test_sparse(benchmark, fmt_name, sparsity):
    fmt = make_formats(W, sparsity, DEVICE)[fmt_name]
    backend = [b for b in available_backends(fmt, torch.device(DEVICE)) if b != "reference"] or ["reference"]
    benchmark(masked_linear, X, fmt, backend=backend[-1])

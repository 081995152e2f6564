import os

# The Triton interpreter must be chosen before any Triton kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from persona_kernels import backends  # noqa: E402
from persona_kernels.ops import registry  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def kernel_backends(device="cpu"):
    """Every backend that can run here, as pytest params (unavailable ones are skipped, with why)."""
    out = []
    for name in backends.BACKENDS:
        if backends.available(name, torch.device(device)):
            out.append(pytest.param(name, id=name))
        else:
            out.append(pytest.param(name, id=name, marks=pytest.mark.skip(reason=f"{name}: {backends.describe(name)}")))
    return out


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    monkeypatch.setattr(registry, "POISON_OUTPUTS", True)
    yield

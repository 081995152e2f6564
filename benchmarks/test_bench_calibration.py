"""pytest-benchmark suite: `pytest benchmarks/` (not part of `make test`)."""
import pytest
import torch
from bench_calibration import _plain, _texts

from persona_kernels.calibrate import calibrate
from persona_kernels.testing import char_tokenizer, tiny_causal_lm


@pytest.fixture(scope="module")
def setup():
    model = tiny_causal_lm("llama", hidden_size=256, intermediate_size=768, num_hidden_layers=4)
    return model, char_tokenizer(), _texts(16)


def test_plain_forward(benchmark, setup):
    model, tok, texts = setup
    benchmark(_plain, model, tok, texts, 8)


@pytest.mark.parametrize("share_inputs", [True, False])
def test_calibrate(benchmark, setup, share_inputs):
    model, tok, texts = setup
    with torch.inference_mode():
        benchmark(calibrate, model, tok, texts, batch_size=8, progress=False, share_inputs=share_inputs)

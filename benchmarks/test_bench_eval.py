"""pytest-benchmark suite: `pytest benchmarks/` (not part of `make test`)."""
import pytest
import torch
from bench_eval import late_configurations

import persona_kernels.model as pm
from persona_kernels.builtin import builtin_eval_items
from persona_kernels.evaluate import evaluate_mc
from persona_kernels.prompts import PromptFormat
from persona_kernels.reuse import LowerLayers, first_modified_layer
from persona_kernels.testing import char_tokenizer, tiny_causal_lm


@pytest.fixture(scope="module")
def setup():
    model = tiny_causal_lm("llama", hidden_size=128, intermediate_size=384, num_hidden_layers=6)
    return model, char_tokenizer(), builtin_eval_items(n=24)


@pytest.mark.parametrize("reuse", [False, True])
def test_late_configuration(benchmark, setup, reuse):
    """One configuration on the last third of the layers, evaluated whole or from recorded lower layers."""
    model, tok, items = setup
    label, enter = late_configurations(model)[0]
    cache = LowerLayers(model) if reuse else None
    enter()
    try:
        def run():
            with torch.inference_mode():
                if cache is None:
                    return evaluate_mc(model, tok, items, 8, "mean", PromptFormat(chat_template=False))
                with cache.session("eval", first_modified_layer(model)):
                    return evaluate_mc(model, tok, items, 8, "mean", PromptFormat(chat_template=False))
        run()  # records once
        benchmark(run)
    finally:
        pm.remove(model)

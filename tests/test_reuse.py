"""Reuse of the layers below the first modified one (reuse.LowerLayers): the same scores as a
whole run, bit for bit, on every architecture; clear errors when a workload differs."""
import pytest
import torch

import persona_kernels.model as pm
from persona_kernels.data.loaders import MCItem
from persona_kernels.evaluate import evaluate_mc, perplexity
from persona_kernels.hf import decoder_layers, layer_index, linear_layers, linear_shape
from persona_kernels.masks import MaskStore
from persona_kernels.prompts import PromptFormat
from persona_kernels.reuse import LowerLayers, first_modified_layer
from persona_kernels.steering import SteeringVectors
from persona_kernels.testing import char_tokenizer, tiny_causal_lm

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "olmo2"]
ITEMS = [MCItem(f"Do you like thing {i}{'?' * (i % 3)}", "Yes, a lot" + "!" * i, "No", "A" if i % 2 else "B")
         for i in range(7)]
TEXTS = ["The weather is mild today.", "Numbers add up in columns of ten.", "A short one."]


def _late_masks(model, first: int, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = {p: {n: torch.rand(linear_shape(m), generator=g) < 0.5 for n, m in linear_layers(model)} for p in ("a", "b")}
    store = MaskStore.from_masks(model, masks)
    return store, [n for n in store.layers if (layer_index(n) or 0) >= first]


def _scores(model, tok):
    res = evaluate_mc(model, tok, ITEMS, batch_size=3, prompt=PromptFormat(chat_template=False))
    return torch.cat([res.logprob_a, res.logprob_b]), perplexity(model, tok, TEXTS, batch_size=2)


@pytest.mark.parametrize("arch", ARCHS)
def test_replayed_lower_layers_give_the_whole_run_scores(arch):
    model, tok = tiny_causal_lm(arch, seed=1, num_hidden_layers=3), char_tokenizer()
    depth = len(decoder_layers(model))
    store, late = _late_masks(model, 1)
    reuse = LowerLayers(model)
    got = []
    for persona in ("a", "b", "a"):  # the first session records, the others replay layer 0
        pm.apply(model, store, persona=persona, layers=late)
        assert first_modified_layer(model) == 1
        whole = _scores(model, tok)
        with reuse.session("eval", first_modified_layer(model)) as mode:
            got.append((mode, _scores(model, tok)))
        pm.remove(model)
        assert torch.equal(got[-1][1][0], whole[0]) and got[-1][1][1] == whole[1]
    assert [m for m, _ in got] == ["recording", "replaying", "replaying"] and reuse.replayed == 2
    assert not torch.equal(got[0][1][0], got[1][1][0])  # the personas differ: the replay ran the masked layers
    assert len(decoder_layers(model)) == depth and all(type(m).__name__ != "_Skipped" for m in model.modules())


def test_first_modified_layer_of_each_method():
    model = tiny_causal_lm("llama", seed=2, num_hidden_layers=4)
    assert first_modified_layer(model) is None
    store, late = _late_masks(model, 2)
    pm.apply(model, store, persona="a", layers=late)
    assert first_modified_layer(model) == 2
    pm.remove(model)
    vectors = SteeringVectors(["a", "b"], {n: torch.randn(2, 64) for n, _ in decoder_layers(model)},
                              store.fingerprint, store.architecture)
    pm.apply_steering(model, vectors, layers=[3], strength=1.0, persona="a")
    assert first_modified_layer(model) == 3  # the hook edits layer 3's output: its input is unchanged
    pm.remove(model)
    head = MaskStore.from_masks(model, {p: {"lm_head": torch.rand(model.lm_head.weight.shape) < 0.5} for p in "ab"})
    pm.apply(model, head, persona="a")
    assert first_modified_layer(model) == 4
    pm.remove(model)
    pm.apply(model, head, persona="a", tied_embedding="mask")
    assert first_modified_layer(model) in (0, 4)  # masked embedding (tied models) -> 0
    pm.remove(model)


def test_a_different_workload_under_one_key_is_an_error():
    model, tok = tiny_causal_lm("llama", seed=3, num_hidden_layers=3), char_tokenizer()
    store, late = _late_masks(model, 1)
    reuse = LowerLayers(model)
    pm.apply(model, store, persona="a", layers=late)
    with reuse.session("ppl", 1):
        perplexity(model, tok, TEXTS, batch_size=2)
    with pytest.raises(RuntimeError, match="workload differs"):
        with reuse.session("ppl", 1):
            perplexity(model, tok, TEXTS[:2], batch_size=2)  # fewer calls than recorded
    with pytest.raises(RuntimeError, match="workload differs|more forward calls"):
        with reuse.session("ppl", 1):
            perplexity(model, tok, TEXTS + TEXTS, batch_size=2)
    pm.remove(model)
    assert all(type(m).__name__ != "_Skipped" for m in model.modules())  # put back after an error


def test_over_the_byte_budget_nothing_is_kept():
    model, tok = tiny_causal_lm("llama", seed=4, num_hidden_layers=3), char_tokenizer()
    store, late = _late_masks(model, 1)
    reuse = LowerLayers(model, max_bytes=1000)
    pm.apply(model, store, persona="a", layers=late)
    for want in ("recording", "recording"):
        with reuse.session("ppl", 1) as mode:
            perplexity(model, tok, TEXTS, batch_size=2)
        assert mode == want
    assert reuse.nbytes == 0 and not reuse.records
    pm.remove(model)


def test_untested_architectures_run_whole():
    """A model type outside the tested list (a layer might read another layer's cache) never
    replays, unless asked to."""
    model, tok = tiny_causal_lm("llama", seed=5, num_hidden_layers=3), char_tokenizer()
    store, late = _late_masks(model, 1)
    pm.apply(model, store, persona="a", layers=late)
    model.config.model_type = "gemma3n"
    for reuse, want in ((LowerLayers(model), ["whole", "whole"]),
                        (LowerLayers(model, any_architecture=True), ["recording", "replaying"])):
        modes = []
        for _ in range(2):
            with reuse.session("ppl", 1) as mode:
                perplexity(model, tok, TEXTS, batch_size=2)
            modes.append(mode)
        assert modes == want
    pm.remove(model)

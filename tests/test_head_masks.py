"""Masking the output head (the released Persona code masks every nn.Linear, lm_head included),
with tied input/output embeddings handled explicitly."""
import copy

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

import persona_kernels.model as pm
from persona_kernels.calibrate import calibrate
from persona_kernels.export import ExportError, bake, export
from persona_kernels.masks import build_masks
from persona_kernels.testing import char_tokenizer, tiny_causal_lm

TEXTS = {"a": ["I love parties and people!", "Everyone come over!"], "b": ["A quiet night in.", "Silence is restful."]}
PROMPTS = ["Hello, how are you", "What do you do?"]


def _logits(model, tok, prompts=PROMPTS):
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return model(**enc).logits


def _setup(arch, tied):
    model = tiny_causal_lm(arch, seed=1, **({"tie_word_embeddings": tied} if arch != "gpt2" else {}))
    tok = char_tokenizer()
    calib = calibrate(model, tok, TEXTS, progress=False, include_head=True)
    return model, tok, build_masks(model, calib, sparsity=0.5, include_head=True)


def _in_place(model, store, persona, untie=False):
    """The released code's result: every masked weight multiplied in place (a tied head masks
    the embedding too), or with the head untied first."""
    ref = copy.deepcopy(model)
    if untie:
        ref.lm_head.weight = nn.Parameter(ref.lm_head.weight.detach().clone())
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for layer in store.layers:
            m = store.mask(persona, layer)
            mods[layer].weight.mul_(m.t() if isinstance(mods[layer], Conv1D) else m)
    return ref


def test_head_is_not_masked_by_default_and_needs_its_statistics():
    model, tok = tiny_causal_lm("llama"), char_tokenizer()
    calib = calibrate(model, tok, TEXTS, progress=False)
    assert "lm_head" not in calib.sites and "lm_head" not in build_masks(model, calib).layers
    with pytest.raises(ValueError, match="include_head=True"):
        build_masks(model, calib, include_head=True)
    with_head = calibrate(model, tok, TEXTS, progress=False, include_head=True, layers=[0])
    store = build_masks(model, with_head, include_head=True, layers=[0])
    assert "lm_head" in store.layers and all(".layers.0." in n for n in store.layers if n != "lm_head")


def test_untied_head_masked_equals_in_place_masking():
    model, tok, store = _setup("llama", tied=False)
    assert "lm_head" in store.layers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    want = {p: _logits(_in_place(model, store, p), tok) for p in store.personas}
    pm.apply(model, store, persona="a")
    for p in store.personas:
        pm.set_persona(model, p)
        torch.testing.assert_close(_logits(model, tok), want[p], rtol=1e-5, atol=1e-5)
    pm.remove(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tied_head_keep_or_mask_the_embedding(arch, tmp_path):
    model, tok, store = _setup(arch, tied=True)
    head = model.get_output_embeddings()
    assert head.weight is model.get_input_embeddings().weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    released = {p: _logits(_in_place(model, store, p), tok) for p in store.personas}
    untied = {p: _logits(_in_place(model, store, p, untie=True), tok) for p in store.personas}
    assert not torch.allclose(released["a"], untied["a"], atol=1e-4)  # the two readings differ
    # default: only the head's product is masked, the lookup keeps the original rows
    pm.apply(model, store, persona="a")
    torch.testing.assert_close(_logits(model, tok), untied["a"], rtol=1e-5, atol=1e-5)
    pm.remove(model)
    # tied_embedding='mask': the released in-place result, switchable and per sequence
    pm.apply(model, store, persona="b", tied_embedding="mask")
    torch.testing.assert_close(_logits(model, tok), released["b"], rtol=1e-5, atol=1e-5)
    pm.set_persona(model, "a")
    torch.testing.assert_close(_logits(model, tok), released["a"], rtol=1e-5, atol=1e-5)
    pm.set_batch_personas(model, ["b", "a"])
    mixed = _logits(model, tok)
    torch.testing.assert_close(mixed[0], released["b"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], released["a"][1], rtol=1e-5, atol=1e-5)
    pm.set_persona(model, None)
    assert torch.equal(_logits(model, tok), _logits(copy.deepcopy(model), tok))
    # a checkpoint holds one tensor for a tied pair: 'keep' cannot be written, 'mask' can
    with pytest.raises(ExportError, match="tied_embedding='mask'"):
        export(model, store, "a", tmp_path / "keep", tokenizer=tok)
    assert not (tmp_path / "keep").exists()
    path = export(model, store, "a", tmp_path / "mask", tokenizer=tok, tied_embedding="mask")
    pm.remove(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    torch.testing.assert_close(_logits(loaded, tok), released["a"], rtol=1e-5, atol=1e-5)
    baked = bake(model, store, "b", copy=copy.deepcopy(model), tied_embedding="mask")
    torch.testing.assert_close(_logits(baked, tok), released["b"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="tied_embedding must be"):
        pm.apply(model, store, tied_embedding="both")
    assert not pm.is_applied(model)

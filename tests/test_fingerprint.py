"""Model fingerprints: architecture and a sample of the weights."""
import copy

import pytest
import torch

from persona_kernels.calibrate import CalibrationResult, calibrate
from persona_kernels.fingerprint import FingerprintMismatch, check_fingerprint, model_fingerprint
from persona_kernels.masks import MaskStore, build_masks
from persona_kernels.testing import char_tokenizer, tiny_causal_lm

TEXTS = {"a": ["I love parties!", "Come over tonight."], "b": ["A quiet night in.", "I read alone."]}


def test_same_shapes_other_weights_are_told_apart(tmp_path):
    model, other = tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1)
    calib = calibrate(model, char_tokenizer(), TEXTS, progress=False)
    store = build_masks(model, calib)
    path = store.save(tmp_path / "m.safetensors")
    with pytest.raises(FingerprintMismatch, match="same architecture but other weights"):
        MaskStore.load(path, model=other)
    with pytest.raises(FingerprintMismatch, match="other weights"):
        build_masks(other, calib)
    spath = calib.save(tmp_path / "s.safetensors")
    with pytest.raises(FingerprintMismatch):
        CalibrationResult.load(spath, model=other)
    MaskStore.load(path, model=model)  # its own model is accepted


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_dtype_cast_of_the_same_model_is_accepted(dtype):
    model = tiny_causal_lm("llama", seed=0)
    fp = model_fingerprint(model)
    check_fingerprint(copy.deepcopy(model).to(dtype), fp, "the store")


def test_weights_edited_in_place_are_detected_and_old_fingerprints_check_shapes_only():
    model = tiny_causal_lm("gpt2", seed=0)
    fp = model_fingerprint(model)
    arch, _, digest = fp.partition(":")
    assert len(arch) == 32 and digest
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(3.0)
    with pytest.raises(FingerprintMismatch, match="edited"):
        check_fingerprint(model, fp, "the store")
    check_fingerprint(model, arch, "an older file")  # no digest: architecture only
    with pytest.raises(FingerprintMismatch, match="layer names or shapes"):
        check_fingerprint(tiny_causal_lm("gpt2", n_layer=3), fp, "the store")

"""Personas out of the package: a baked checkpoint that plain transformers loads, save_pretrained
of an applied model, and the refusals (soft gate, NPTI, another model's masks)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import persona_kernels as pk
import persona_kernels.model as pm
from persona_kernels.app.cli import main
from persona_kernels.export import ExportError, export
from persona_kernels.fingerprint import FingerprintMismatch
from persona_kernels.hf import linear_layers, linear_shape
from persona_kernels.masks import MaskStore
from persona_kernels.testing import char_tokenizer, tiny_causal_lm

IDS = torch.tensor([[1, 20, 31, 42, 53, 64, 7]])


def _store(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = {p: {n: torch.rand(linear_shape(m), generator=g) < 0.5 for n, m in linear_layers(model)} for p in ("a", "b")}
    return MaskStore.from_masks(model, masks, "random-test")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_exported_persona_loads_with_plain_transformers(arch, tmp_path):
    model, tok = tiny_causal_lm(arch, seed=1), char_tokenizer()
    store = _store(model)
    pm.apply(model, store, persona="b")
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    path = export(model, store, "b", tmp_path / "persona-b", tokenizer=tok)  # works with the layer applied
    back = AutoModelForCausalLM.from_pretrained(path).eval()
    assert not any(getattr(m, "_pk_wrapper", False) for m in back.modules())
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)
    pm.remove(model)
    assert set(back.state_dict()) == set(model.state_dict())  # the original tensor names
    with pytest.raises(ExportError, match="exists"):
        export(model, store, "b", path)
    export(model, store, "a", path, overwrite=True)  # replaced atomically
    assert "persona_kernels.json" in {p.name for p in path_iter(path)}


def path_iter(path):
    import pathlib

    return pathlib.Path(path).iterdir()


def test_save_pretrained_of_an_applied_model_writes_the_original(tmp_path):
    model = tiny_causal_lm("llama", seed=2)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    pm.apply(model, _store(model), persona="a")
    model.save_pretrained(tmp_path / "m")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    for k, v in back.state_dict().items():
        assert torch.equal(v, original[k]), k  # no '*.base.weight' keys, nothing re-initialised
    pm.remove(model)


def test_export_refusals(tmp_path):
    model = tiny_causal_lm("llama", seed=3)
    store = _store(model)
    other = tiny_causal_lm("llama", seed=3, hidden_size=32)
    with pytest.raises(FingerprintMismatch):
        export(other, store, "a", tmp_path / "x")
    with pytest.raises(ExportError, match="not in the mask store"):
        export(model, store, "zzz", tmp_path / "x")
    pm.apply(model, store, persona="a", gamma=0.3)
    with pytest.raises(ExportError, match="soft gate"):
        export(model, store, "a", tmp_path / "x")
    pm.remove(model)
    with pytest.raises(ExportError, match="format"):
        export(model, store, "a", tmp_path / "x", format="gguf")
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_export_refuses_npti(tmp_path):
    from test_library import _npti_sets

    model = tiny_causal_lm("llama", seed=4)
    store = _store(model)
    target, opposite = _npti_sets(model)
    pm.apply_neurons(model, target, opposite)
    with pytest.raises(ExportError, match="NPTI"):
        export(model, store, "a", tmp_path / "x")
    pm.remove(model)


def test_bake_and_cli_export(tmp_path, capsys):
    import copy

    model, tok = tiny_causal_lm("llama", seed=5), char_tokenizer()
    store = _store(model)
    baked = pk.bake(model, store, "a", copy=copy.deepcopy(model))
    pm.apply(model, store, persona="a")
    with torch.no_grad():
        torch.testing.assert_close(baked(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
    pm.remove(model)
    mdir = tmp_path / "model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    store.save(tmp_path / "masks.safetensors")
    assert main(["export", "--model", str(mdir), "--masks", str(tmp_path / "masks.safetensors"), "--persona", "a",
                 "--path", str(tmp_path / "out")]) == 0
    assert "written to" in capsys.readouterr().out
    assert main(["export", "--model", str(mdir), "--masks", str(tmp_path / "masks.safetensors"),
                 "--path", str(tmp_path / "out2")]) == 2
    assert "--persona" in capsys.readouterr().err


def test_mixed_batch_on_a_model_with_flattened_mlp_inputs():
    """OPT runs its MLP on [B*T, H]: a mixed batch still gives each sequence its own persona."""
    import transformers

    cfg = transformers.OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=64, word_embed_proj_dim=32)
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(cfg).eval()
    store = _store(model, seed=7)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    pm.apply(model, store, format="shared_bitmask")
    want = []
    for i, p in enumerate(("a", "b")):
        pm.set_persona(model, p)
        with torch.no_grad():
            want.append(model(input_ids=ids[i:i + 1]).logits[0])
    pm.set_batch_personas(model, ["a", "b"])
    with torch.no_grad():
        got = model(input_ids=ids).logits
    for i in range(2):
        torch.testing.assert_close(got[i], want[i], rtol=1e-5, atol=1e-5)
    pm.remove(model)


def test_linear_subclasses_with_their_own_forward_are_never_swapped():
    """A router-like nn.Linear subclass returning a tuple is neither calibrated nor masked, and a
    mask store naming it is refused before anything changes."""
    from persona_kernels.hf import is_plain_linear

    class Router(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x), x

    model = tiny_causal_lm("llama", seed=8)
    assert all(is_plain_linear(m) for _, m in linear_layers(model))
    store = _store(model)
    model.model.layers[0].mlp.router = Router(64, 4)
    assert "model.layers.0.mlp.router" not in dict(linear_layers(model))
    masks = {p: {**{n: store.mask(p, n) for n in store.layers}, "model.layers.0.mlp.router": torch.ones(4, 64, dtype=torch.bool)}
             for p in store.personas}
    bad = MaskStore.from_masks(model, masks)
    with pytest.raises(pm.PersonaError, match="not plain linear"):
        pm.apply(model, bad, persona="a")
    assert not pm.is_applied(model) and not any(getattr(m, "_pk_wrapper", False) for m in model.modules())

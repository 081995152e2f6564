"""Calibration on tiny random-weight transformers models."""
import os

import numpy as np
import pytest
import torch

import persona_kernels as pk
from persona_kernels.calibrate import CalibrationConfig, CalibrationResult, calibrate
from persona_kernels.fingerprint import FingerprintMismatch
from persona_kernels.io import ArtifactError
from persona_kernels.sites import discover_sites
from persona_kernels.stats import npti_edges
from persona_kernels.testing import char_tokenizer, tiny_causal_lm

from stats_oracle import oracle

TEXTS = {
    "extravert": ["I love big parties and meeting new people!", "Let's all go out tonight.", "Talking energises me.",
                  "Call everyone, we are celebrating!"],
    "introvert": ["I prefer a quiet evening with a book.", "Small groups are enough.", "I need time alone to recharge."],
}


def _capture(model, sites):
    """Record every site's activation and the batch's attention mask / texts, independently of calibrate."""
    modules = dict(model.named_modules())
    seen = {s.name: [] for s in sites}
    masks, handles = [], []
    for s in sites:
        if s.kind == "linear":
            handles.append(modules[s.module].register_forward_pre_hook(lambda m, a, n=s.name: seen[n].append(a[0].detach().clone())))
        else:
            handles.append(modules[s.module].register_forward_hook(lambda m, a, o, n=s.name: seen[n].append(o.detach().clone())))
    handles.append(model.register_forward_pre_hook(
        lambda m, a, kw: masks.append((kw["input_ids"].clone(), kw["attention_mask"].bool().clone())), with_kwargs=True))
    return seen, masks, handles


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "phi3"])
def test_statistics_equal_captured_activations(arch):
    model, tok = tiny_causal_lm(arch, seed=1), char_tokenizer()
    sites = discover_sites(model)
    seen, masks, handles = _capture(model, sites)
    try:
        res = calibrate(model, tok, TEXTS, batch_size=3, progress=False, backend="reference")
    finally:
        for h in handles:
            h.remove()
    assert list(res.sites) == [s.name for s in sites]
    assert any(s.kind == "act" for s in sites) == (arch != "gpt2")
    persona_of = {t: i for i, texts in enumerate(TEXTS.values()) for t in texts}
    segs = [torch.tensor([persona_of[tok.decode(ids[m])] for ids, m in zip(b_ids, b_mask)]) for b_ids, b_mask in masks]
    for s in sites:
        xs = seen[s.name]
        assert len(xs) == len(masks)
        x = np.concatenate([a.double().numpy().reshape(-1, a.shape[-1]) for a in xs]).reshape(-1, 1, s.channels)
        valid = np.concatenate([m.numpy().reshape(-1) for _, m in masks]).reshape(-1, 1)
        seg = np.concatenate([np.repeat(sg.numpy(), m.shape[1]) for sg, (_, m) in zip(segs, masks)])
        want = oracle(x, valid, seg, 2, npti_edges() if s.kind == "act" else None)
        # per-sample norms need the sample structure: recompute them per padded sequence
        state = res.stats[s.name]
        for key in ("count", "sum", "m2", "sumsq", "sumabs", "pos", "min", "max", "absmax", "hist"):
            if key not in want:
                continue
            got = getattr(state, key).double().numpy() if key != "hist" else state.hist.numpy()
            np.testing.assert_allclose(got, want[key], rtol=1e-9, atol=1e-9, err_msg=f"{s.name}:{key}")
        norms = [[], []]
        for a, (_, m), sg in zip(xs, masks, segs):
            for b in range(a.shape[0]):
                norms[int(sg[b])].append(a[b][m[b]].double().pow(2).sum(0).sqrt())
        for p in range(2):
            n = torch.stack(norms[p])
            torch.testing.assert_close(state.norm_mean[p], n.mean(0), rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(state.sample_norm_var()[p], n.var(0, unbiased=False), rtol=1e-7, atol=1e-12)
        assert state.samples.tolist() == [4, 3]


def test_fused_backend_matches_reference_on_model():
    model, tok = tiny_causal_lm("llama", seed=2), char_tokenizer()
    ref = calibrate(model, tok, TEXTS, batch_size=4, progress=False, backend="reference")
    other = "cpp" if pk.backends.available("cpp", torch.device("cpu")) else "triton"
    fast = calibrate(model, tok, TEXTS, batch_size=4, progress=False, backend=other, layers=[0])
    for name, st in fast.stats.items():
        torch.testing.assert_close(st.norm_mean, ref.stats[name].norm_mean, rtol=1e-5, atol=1e-6)
        assert torch.equal(st.pos, ref.stats[name].pos)


def test_site_selection_options():
    model = tiny_causal_lm("llama")
    all_sites = discover_sites(model)
    assert not any("lm_head" in s.name for s in all_sites)
    assert len(all_sites) == 2 * (7 + 1 + 1)
    assert [s.name for s in all_sites if s.kind == "resid"] == ["model.layers.0", "model.layers.1"]
    assert all(s.channels == 64 for s in all_sites if s.kind == "resid")
    assert all(s.layer == 1 for s in discover_sites(model, layers=[1]))
    # mlp_only / include / exclude pick linear and act sites; residual sites follow `layers` only
    assert all(".mlp." in s.name for s in discover_sites(model, mlp_only=True) if s.kind != "resid")
    assert len(discover_sites(model, mlp_only=True, layers=[0], kinds=("resid",))) == 1
    assert [s.kind for s in discover_sites(model, kinds=("act",))] == ["act", "act"]
    assert all("down_proj" not in s.name for s in discover_sites(model, exclude="down_proj"))
    model.model.layers[1].mlp.act_fn = model.model.layers[0].mlp.act_fn
    with pytest.raises(ValueError, match="same module object"):
        discover_sites(model)


def test_hooks_removed_even_when_a_batch_raises():
    model, tok = tiny_causal_lm("llama"), char_tokenizer()
    calls = {"n": 0}

    def boom(module, args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")

    h = model.model.layers[1].register_forward_pre_hook(boom)
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        calibrate(model, tok, TEXTS, batch_size=2, progress=False)
    h.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert model.training  # the caller's mode is restored
    assert calls["n"] == 2


@pytest.mark.parametrize("deferred", [False, True], ids=["checked-per-call", "deferred-check"])
def test_nonfinite_activation_names_the_site_and_cleans_up(deferred, monkeypatch):
    """deferred: the accelerator path (the NaN/Inf check waits for the flush), forced here."""
    from persona_kernels.ops import accumulate_stats as acc

    monkeypatch.setattr(acc, "DEFER_CHECKS_ON_CPU", deferred)
    model, tok = tiny_causal_lm("llama"), char_tokenizer()
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[3, 0] = float("nan")
    with pytest.raises(pk.NonFiniteActivationError, match=r"site model\.layers\.1\.mlp" + (".*deferred" if deferred else "")):
        calibrate(model, tok, TEXTS, progress=False)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("texts, match", [
    ({}, "non-empty mapping"), ({"a": ["x"], "b": []}, "persona 'b' has no calibration texts"),
    ({"a": "just a string"}, "expected a list of texts"), ({"a": ["ok", "  "]}, "text 1 is empty"),
    ({"a": ["ok", 3]}, "expected str"),
])
def test_bad_calibration_sets(texts, match):
    model, tok = tiny_causal_lm("llama"), char_tokenizer()
    with pytest.raises((ValueError, TypeError), match=match):
        calibrate(model, tok, texts, progress=False)


def test_bad_config():
    with pytest.raises(ValueError, match="kinds"):
        CalibrationConfig(kinds=("attention",))
    with pytest.raises(ValueError, match="batch_size"):
        CalibrationConfig(batch_size=0)
    with pytest.raises(ValueError, match="no statistics sites"):
        calibrate(tiny_causal_lm("llama"), char_tokenizer(), TEXTS, layers=[7], progress=False)


def test_save_load_roundtrip_and_model_check(tmp_path):
    model, tok = tiny_causal_lm("qwen2"), char_tokenizer()
    res = calibrate(model, tok, TEXTS, progress=False)
    path = res.save(tmp_path / "stats.safetensors")
    back = CalibrationResult.load(path, model=model)
    assert back.personas == res.personas and back.sites == res.sites and back.fingerprint == res.fingerprint
    for name, st in res.stats.items():
        for k, v in st.tensors().items():
            assert torch.equal(getattr(back.stats[name], k), v)
    with pytest.raises(FingerprintMismatch, match="different model"):
        CalibrationResult.load(path, model=tiny_causal_lm("llama"))
    with pytest.raises(FingerprintMismatch):
        CalibrationResult.load(path, model=tiny_causal_lm("qwen2", hidden_size=32, intermediate_size=48))
    assert os.listdir(tmp_path) == ["stats.safetensors"]


def test_truncated_foreign_and_wrong_kind_files(tmp_path):
    from safetensors.torch import save_file

    from persona_kernels.io import save_artifact

    model, tok = tiny_causal_lm("llama"), char_tokenizer()
    path = calibrate(model, tok, TEXTS, progress=False).save(tmp_path / "s.safetensors")
    data = open(path, "rb").read()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated or foreign"):
        CalibrationResult.load(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ArtifactError):
        CalibrationResult.load(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ArtifactError, match="not a persona-kernels artifact"):
        CalibrationResult.load(tmp_path / "foreign.safetensors")
    save_artifact(tmp_path / "mask.safetensors", {"w": torch.zeros(2)}, "masks", {})
    with pytest.raises(ArtifactError, match="expected 'statistics'"):
        CalibrationResult.load(tmp_path / "mask.safetensors")
    with pytest.raises(ArtifactError, match="no such file"):
        CalibrationResult.load(tmp_path / "missing.safetensors")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    import persona_kernels.io as pio

    model, tok = tiny_causal_lm("llama"), char_tokenizer()
    res = calibrate(model, tok, TEXTS, progress=False)
    path = res.save(tmp_path / "s.safetensors")
    before = open(path, "rb").read()

    def failing_save(tensors, metadata=None):
        raise OSError("disk full")

    real_atomic_write = pio.atomic_write

    def write_partial_then_fail(path, write):
        def partial(f):
            f.write(b"partial")
            write(f)
        return real_atomic_write(path, partial)

    monkeypatch.setattr(pio, "save", failing_save)
    monkeypatch.setattr(pio, "atomic_write", write_partial_then_fail)
    with pytest.raises(OSError, match="disk full"):
        res.save(path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["s.safetensors"]


def test_layers_reading_one_input_share_one_state_and_the_file_stores_it_once(tmp_path):
    """q/k/v and gate/up read the same tensor: one accumulation serves them (equal, bit for bit,
    to accumulating each), the artifact holds it once, and loading restores every site."""
    model, tok = tiny_causal_lm("llama", seed=3), char_tokenizer()
    shared = calibrate(model, tok, TEXTS, progress=False)
    separate = calibrate(model, tok, TEXTS, progress=False, share_inputs=False)
    assert shared.aliases == {"model.layers.0.self_attn.k_proj": "model.layers.0.self_attn.q_proj",
                              "model.layers.0.self_attn.v_proj": "model.layers.0.self_attn.q_proj",
                              "model.layers.0.mlp.up_proj": "model.layers.0.mlp.gate_proj",
                              "model.layers.1.self_attn.k_proj": "model.layers.1.self_attn.q_proj",
                              "model.layers.1.self_attn.v_proj": "model.layers.1.self_attn.q_proj",
                              "model.layers.1.mlp.up_proj": "model.layers.1.mlp.gate_proj"}
    assert not separate.aliases and set(shared.stats) == set(separate.stats)
    for site in shared.stats:
        for k, t in separate.stats[site].tensors().items():
            assert torch.equal(getattr(shared.stats[site], k), t), (site, k)
    a, b = shared.save(tmp_path / "a.safetensors"), separate.save(tmp_path / "b.safetensors")
    assert os.path.getsize(a) < 0.85 * os.path.getsize(b)  # tiny model: the act histograms dominate both
    back = CalibrationResult.load(a, model=model)
    assert back.aliases == shared.aliases
    for site in shared.stats:
        for k, t in shared.stats[site].tensors().items():
            got = getattr(back.stats[site], k)
            assert got.dtype == t.dtype and torch.equal(got, t), (site, k)


def test_compact_storage_is_exact():
    from persona_kernels.stats import compact

    g = torch.Generator().manual_seed(0)
    cases = {
        "few large bins": (torch.randint(0, 40, (2, 5, 303), generator=g) * (torch.rand(2, 5, 303, generator=g) < 0.03) * 1000),
        "int16": torch.randint(0, 30000, (3, 7), generator=g),
        "int32": torch.randint(0, 2**31 - 1, (3, 7), generator=g),
        "int64": torch.full((2, 3), 2**40),
        "negative": torch.tensor([[-1, 5]]),
        "empty": torch.zeros(0, 4, dtype=torch.int64),
    }
    for what, t in cases.items():
        packed = compact.pack({"hist": t.to(torch.int64)})
        back = compact.unpack(packed)["hist"]
        assert back.dtype == torch.int64 and torch.equal(back, t.to(torch.int64)), what
        assert sum(v.numel() * v.element_size() for v in packed.values()) <= t.numel() * 8, what
    assert compact.pack({"hist": cases["few large bins"].to(torch.int64)})["hist"].dtype == torch.uint8
    exact = torch.tensor([[1.5, float("inf"), -3.25]], dtype=torch.float64)
    inexact = torch.tensor([[0.1]], dtype=torch.float64)
    p = compact.pack({"min": exact, "max": inexact, "mean": exact})
    assert p["min"].dtype == torch.float32 and p["max"].dtype == torch.float64 and p["mean"].dtype == torch.float64
    u = compact.unpack(p)
    assert torch.equal(u["min"], exact) and torch.equal(u["max"], inexact)
    bad = compact.pack({"hist": cases["few large bins"].to(torch.int64)})
    bad["hist.over_idx"] = bad["hist.over_idx"] + 10**9
    with pytest.raises(ValueError, match="overflow table"):
        compact.unpack(bad)

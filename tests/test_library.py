"""The kernel registry and the torch.library ops: one dispatch for every op, opcheck on every
op and backend that runs here, and torch.compile(fullgraph=True) of a persona model with NPTI."""
import pytest
import torch

import persona_kernels as pk
import persona_kernels.model as pm
from persona_kernels.fingerprint import architecture, model_fingerprint
from persona_kernels.hf import decoder_layers
from persona_kernels.masks import MaskStore
from persona_kernels.npti import NeuronSet
from persona_kernels.ops import registry
from persona_kernels.ops.report import env_report
from persona_kernels.steering import SteeringVectors
from persona_kernels.testing import char_tokenizer, tiny_causal_lm

CPU = torch.device("cpu")


def _runnable(op, fmt=None):
    names = registry.kernel_backends(op, fmt, CPU)
    assert "reference" in names
    return names


def _params(op, fmt=None):
    out = []
    for name in registry.BACKEND_MODULES:
        ok = name in _runnable(op, fmt)
        out.append(pytest.param(name, id=name, marks=() if ok else pytest.mark.skip(reason=f"no runnable {name} kernel here")))
    return out


@pytest.mark.parametrize("backend", _params("accumulate_stats"))
@pytest.mark.parametrize("with_hist", [False, True])
def test_opcheck_accumulate_stats(backend, with_hist):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 9, 13, generator=g)
    valid = torch.rand(3, 9, generator=g) > 0.2
    seg = torch.tensor([0, 1, 1])
    edges = torch.tensor([-1.0, 0.0, 0.5, 2.0]) if with_hist else None
    op = torch.ops.persona_kernels.accumulate_stats
    out = op(x, valid, seg, edges, 2, backend)
    state = pk.accumulate_stats(x, valid=valid, segment_ids=seg, backend=backend,
                                config=pk.StatsConfig(2, histogram=with_hist, edges=edges.tolist() if with_hist else None))
    torch.testing.assert_close(out[1], state.sum)  # the op's delta is the state of one call
    assert (out[-1].shape == (2, 13, 3)) == with_hist
    torch.library.opcheck(op.default, (x, valid, seg, edges, 2, backend))


@pytest.mark.parametrize("backend", _params("induce_neurons"))
@pytest.mark.parametrize("act", [0, 1, 2])
def test_opcheck_induce_neurons(backend, act):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 5, 37, generator=g)
    deact = torch.rand(37, generator=g) < 0.3
    add = torch.rand(37, generator=g)
    torch.library.opcheck(torch.ops.persona_kernels.induce_neurons.default, (a, deact, add, act, backend))


@pytest.mark.parametrize("backend", _params("topk_mask"))
def test_opcheck_topk_mask(backend):
    score = torch.randn(7, 45, generator=torch.Generator().manual_seed(3))
    out = torch.ops.persona_kernels.topk_mask(score, 11, backend)
    assert out.dtype == torch.bool and bool((out.sum(1) == 11).all())
    torch.library.opcheck(torch.ops.persona_kernels.topk_mask.default, (score, 11, backend))


def test_every_op_is_a_torch_library_op():
    for name in registry.OPS:
        assert hasattr(torch.ops.persona_kernels, name), name


def test_one_poison_switch_reaches_every_op(monkeypatch):
    monkeypatch.setattr(registry, "POISON_OUTPUTS", True)
    assert bool((registry.new_output((2, 3), torch.float32, CPU) == 777.0).all())
    monkeypatch.setattr(registry, "POISON_OUTPUTS", False)
    assert registry.new_output((2, 3), torch.float32, CPU).shape == (2, 3)


def test_explicit_backend_that_cannot_run_is_an_error():
    with pytest.raises(pk.BackendUnavailable, match="cuda"):
        registry.resolve("accumulate_stats", "cuda", CPU)
    with pytest.raises(ValueError, match="unknown backend"):
        registry.resolve("accumulate_stats", "bogus", CPU)
    with pytest.raises(pk.BackendUnavailable, match="no 'torch' kernel for topk_mask"):
        registry.resolve("topk_mask", "torch", CPU)


def test_auto_fallback_is_recorded_and_reported(monkeypatch):
    monkeypatch.setattr(registry, "FALLBACKS", {})
    # nothing preferred runs: 'auto' takes the reference, and says why
    assert registry.resolve("topk_mask", "auto", CPU, order=("cuda",)) == "reference"
    assert ("topk_mask", None, "cpu") in registry.FALLBACKS
    assert "cuda" in registry.FALLBACKS[("topk_mask", None, "cpu")]
    report = env_report()
    for op in registry.OPS:
        assert op in report
    assert "fallback topk_mask on cpu" in report


def test_a_backend_module_that_fails_to_import_is_recorded(monkeypatch, tmp_path):
    import importlib

    monkeypatch.setattr(registry, "_LOADED", set())
    monkeypatch.setattr(registry, "LOAD_ERRORS", {})
    real = importlib.import_module

    def broken(name, *a, **k):
        if name == "persona_kernels.ops.induce_neurons.triton":
            raise ImportError("simulated broken triton")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", broken)
    registry.load("induce_neurons")
    assert "simulated broken triton" in registry.LOAD_ERRORS["induce_neurons.triton"]
    assert registry.get_kernel("induce_neurons", "reference") is not None  # the other backends still load


def test_has_native_matches_the_extension():
    from persona_kernels import _native

    mod = _native.load("cpu")
    for name in ("bitmap_linear", "topk_mask", "induce_neurons", "accumulate_stats_partials"):
        assert registry.has_native(name) == (mod is not None and hasattr(mod, name))
    assert not registry.has_native("no_such_kernel")


def _npti_sets(model):
    """A target and an opposite neuron set over every gated MLP (fixed, not calibrated)."""
    from persona_kernels.hf import gated_mlps, intermediate_size

    sites = [f"{n}.act_fn" for n, _ in gated_mlps(model)]
    I = intermediate_size(gated_mlps(model)[0][1])
    site_t = torch.arange(len(sites)).repeat_interleave(4)
    idx = torch.tensor([1, 5, 9, 30] * len(sites))
    n = idx.numel()
    ones = torch.ones(n)
    fp, arch = model_fingerprint(model), architecture(model)
    target = NeuronSet("t", "o", sites, site_t, idx, 0.5 * ones, 0.6 * ones, 0.1 * ones, 2.0 * ones, fp, arch, {})
    opposite = NeuronSet("o", "t", sites, site_t, (idx + 2) % I, 0.5 * ones, 0.6 * ones, 0.1 * ones, 2.0 * ones, fp, arch, {})
    return target, opposite


@pytest.mark.parametrize("fuse", [True, False])
def test_torch_compile_fullgraph_of_a_persona_model_with_npti(fuse):
    """Masks, NPTI induction and steering vectors together trace into one graph (fullgraph=True fails on a break)
    and the compiled model gives the eager logits (keep_prob=1: no random draw matters). Fused
    q/k/v and gate/up make one masked_linear op per group in the graph, as they make one call eagerly."""
    import torch._dynamo

    model = tiny_causal_lm("llama", seed=4)
    tok = char_tokenizer()
    g = torch.Generator().manual_seed(5)
    masks = {p: {n: torch.rand(m.weight.shape, generator=g) < 0.6 for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.endswith("_proj")} for p in ("a", "b")}
    store = MaskStore.from_masks(model, masks)
    target, opposite = _npti_sets(model)
    pm.apply(model, store, persona="a", format="bitmap", fuse=fuse)
    pm.apply_neurons(model, target, opposite, strength=1.5, keep_prob=1.0)
    g = torch.Generator().manual_seed(6)
    vectors = SteeringVectors(["a", "b"], {n: torch.randn(2, 64, generator=g) for n, _ in decoder_layers(model)},
                              store.fingerprint, store.architecture)
    pm.apply_steering(model, vectors, strength=0.5)
    enc = tok(["Question: plans?"], return_tensors="pt")
    with torch.no_grad():
        want = model(**enc, use_cache=False).logits
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=keep_graph, fullgraph=True)
    with torch.no_grad():
        got = compiled(**enc, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        steered = model(**enc, use_cache=False).logits
    pm.set_steering_strength(model, 0.0)
    with torch.no_grad():
        assert not torch.allclose(model(**enc, use_cache=False).logits, steered)  # steering took part
    pm.set_steering_strength(model, 0.5)
    code = "".join(graphs)
    layers = len(decoder_layers(model))
    assert len(store.layers) == 7 * layers
    assert code.count("persona_kernels.masked_linear") == (4 if fuse else 7) * layers
    assert all(m._group is None or m._group._traced is None for m in model.modules() if isinstance(m, pm.MaskedLinear))
    assert code.count("persona_kernels.induce_neurons") == len(target.sites)
    pm.remove(model)
    torch._dynamo.reset()


def test_graph_route_keeps_cached_dense_weights_out_of_cuda_graphs(monkeypatch):
    """Inside a compiled graph on a GPU (which CUDA graphs may capture) the 'dense' route becomes
    the format's sparse kernel: a cached dense weight would be read through a raw pointer that a
    persona switch frees. Elsewhere, and for the other routes, nothing changes."""
    from persona_kernels.ops.masked_linear import dispatch

    monkeypatch.setattr(dispatch, "_sparse_backend", lambda kind, device: {"bitmap": "cuda"}.get(kind))
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert dispatch.graph_route("dense", "bitmap", gpu) == "cuda"
    assert dispatch.graph_route("dense", "dense_only", gpu) == "dense"  # no sparse kernel: unchanged
    assert dispatch.graph_route("dense", "bitmap", cpu) == "dense"
    assert dispatch.graph_route("triton", "bitmap", gpu) == "triton"

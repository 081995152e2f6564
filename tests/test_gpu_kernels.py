"""The kernels on the device they are built for, against float64 references: the GPU subset of
the suite (benchmarks/gpu_suite.sh). On a CUDA machine every CUDA and compiled-Triton kernel
runs on CUDA tensors, bf16 included; here (and on CI) the same tests run the CPU backends and
the Triton interpreter (fp32/fp16), so they cannot rot between GPU sessions. Outputs are
poisoned (conftest), shapes are odd and not multiples of any block."""
import numpy as np
import pytest
import torch

import persona_kernels as pk
from persona_kernels import backends
from persona_kernels.ops import registry
from persona_kernels.stats import npti_edges

from stats_oracle import oracle

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EXACT = ("count", "pos", "samples", "hist", "min", "max", "absmax")


def _backends(op):
    """The non-reference backends of ``op`` that run on DEVICE (skipped, with why, otherwise)."""
    out = []
    for name in ("cuda", "triton", "cpp"):
        runs = registry.get_kernel(op, name) is not None and backends.available(name, DEVICE)
        why = f"{name} does not run on {DEVICE.type}: {backends.describe(name, DEVICE)}"
        out.append(pytest.param(name, id=name, marks=() if runs else pytest.mark.skip(reason=why)))
    return out


def _skip_interpreted_bf16(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and backends.triton_interpreter():
        pytest.skip("the Triton interpreter has no bf16 arithmetic; bf16 Triton runs on a GPU")


@pytest.mark.parametrize("backend", _backends("accumulate_stats"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 123, 123), (3, 300, 77), (1, 1, 9)], ids=lambda s: "x".join(map(str, s)))
def test_accumulate_stats_on_device(backend, dtype, shape):
    _skip_interpreted_bf16(backend, dtype)
    g = torch.Generator().manual_seed(sum(shape))
    B, T, C = shape
    x = (torch.randn(B, T, C, generator=g) * 2 + 0.3 * torch.rand(C, generator=g)).to(dtype)
    valid = torch.rand(B, T, generator=g) > 0.25
    valid[0, 0] = True
    seg = torch.randint(0, 2, (B,), generator=g)
    state = pk.accumulate_stats(x.to(DEVICE), valid=valid.to(DEVICE), segment_ids=seg.to(DEVICE), backend=backend,
                                config=pk.StatsConfig(num_personas=2, histogram=True))
    want = oracle(x.double().numpy(), valid.numpy(), seg.numpy(), 2, npti_edges())
    for key, ref in want.items():
        got = getattr(state, key).cpu()
        got = got.numpy() if key == "hist" else got.double().numpy()
        if key in EXACT:
            np.testing.assert_array_equal(got, ref, err_msg=key)
        else:
            np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * max(float(np.abs(ref).max()), 1e-12), err_msg=key)


@pytest.mark.parametrize("backend", _backends("induce_neurons"))
@pytest.mark.parametrize("act", [None, "silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_induce_neurons_on_device(backend, act, dtype):
    _skip_interpreted_bf16(backend, dtype)
    g = torch.Generator().manual_seed(7)
    a = (4 * torch.randn(5, 37, 123, generator=g)).to(dtype)
    deact = torch.rand(123, generator=g) > 0.6
    add = torch.where(torch.rand(123, generator=g) > 0.5, torch.rand(123, generator=g), torch.zeros(123))
    out = pk.induce_neurons(a.to(DEVICE), deact.to(DEVICE), add.to(DEVICE), backend=backend, act=act).cpu()
    f = {None: lambda t: t, "silu": torch.nn.functional.silu,
         "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh")}[act](a.double())
    want = torch.where(deact, f.clamp(max=0), f) + add.double()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", _backends("topk_mask"))
def test_topk_mask_on_device(backend):
    score = torch.randn(33, 257, generator=torch.Generator().manual_seed(2))
    score[:, 100:110] = 0.5  # ties: the lower column wins
    got = pk.ops.topk_mask.topk_mask(score.to(DEVICE), 101, backend=backend).cpu()
    assert torch.equal(got, pk.ops.topk_mask.topk_mask_reference(score, 101))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_persona_model_fused_and_separate_on_device(dtype):
    """A whole tiny Llama on DEVICE through the persona layer (the dispatcher's kernels: CUDA there),
    fused q/k/v and gate/up against separate layers and a masked copy's logits in float64."""
    import copy

    import persona_kernels.model as pm
    from persona_kernels.masks import MaskStore
    from persona_kernels.testing import tiny_causal_lm

    model = tiny_causal_lm("llama", seed=7)
    g = torch.Generator().manual_seed(8)
    masks = {p: {n: torch.rand(m.weight.shape, generator=g) < 0.4 for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.endswith("_proj")} for p in ("a", "b")}
    store = MaskStore.from_masks(model, masks)
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        for n, m in ref.named_modules():
            if n in masks["b"]:
                m.weight.mul_(masks["b"][n])
    ids = torch.randint(3, 60, (2, 9), generator=g)
    with torch.inference_mode():
        want = ref(input_ids=ids).logits.float()
    model = model.to(DEVICE, dtype)
    got = {}
    for fuse in (True, False):
        pm.apply(model, store, persona="b", fuse=fuse)
        with torch.inference_mode():  # batch 2 (kernels) and one row (decode GEMV)
            got[fuse] = (model(input_ids=ids.to(DEVICE)).logits.float().cpu(),
                         model(input_ids=ids[:1].to(DEVICE)).logits.float().cpu())
        pm.remove(model)
    # bf16 logits here are off by about 3e-3 at most; another persona's are off by 0.4
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.02, atol=0.02)
    for fuse in (True, False):
        torch.testing.assert_close(got[fuse][0], want, **tol)
        torch.testing.assert_close(got[fuse][1], want[:1], **tol)
    torch.testing.assert_close(got[True][0], got[False][0], **tol)


@pytest.mark.parametrize("density", [0.5, 0.1], ids=["50%", "90%"])
def test_compiled_persona_decode_on_device(density):
    """torch.compile of a persona model's decode step on DEVICE (on a GPU: inductor with CUDA
    graphs, the recommended GPU decode path; here: aot_eager, fast), fused groups included,
    against the eager model, with persona switches a -> b -> a between compiled calls. At 50%
    the dispatcher's route is a dense GEMM on a cached masked weight eagerly; inside the graph
    it must not be (dispatch.graph_route)."""
    import torch._dynamo

    import persona_kernels.model as pm
    from persona_kernels.masks import MaskStore
    from persona_kernels.testing import tiny_causal_lm

    model = tiny_causal_lm("llama", seed=11)
    g = torch.Generator().manual_seed(12)
    masks = {p: {n: torch.rand(m.weight.shape, generator=g) < density for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.endswith("_proj")} for p in ("a", "b")}
    model = model.to(DEVICE)
    pm.apply(model, MaskStore.from_masks(model, masks), persona="b")
    ids = torch.randint(3, 60, (1, 1), generator=g).to(DEVICE)
    want = {}
    with torch.inference_mode():
        for p in ("a", "b"):
            pm.set_persona(model, p)
            want[p] = model(input_ids=ids, use_cache=False).logits
    torch._dynamo.reset()
    kw = dict(mode="reduce-overhead") if DEVICE.type == "cuda" else dict(backend="aot_eager")
    step = torch.compile(model, fullgraph=True, **kw)
    with torch.inference_mode():
        for p in ("b", "a", "b", "a"):
            pm.set_persona(model, p)
            for _ in range(3):  # the CUDA graph is recorded on a later call, then replayed
                got = step(input_ids=ids, use_cache=False).logits.clone()
            torch.testing.assert_close(got, want[p], rtol=1e-4, atol=1e-4, msg=f"persona {p}")
    pm.remove(model)
    torch._dynamo.reset()

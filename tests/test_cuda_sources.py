"""The CUDA sources compile with nvcc for Hopper and their kernels do not spill registers.

Needs only the CUDA toolkit (no GPU, no CUDA build of torch): every csrc/cuda/*.cu is compiled
(no link) with `nvcc -std=c++17 -O3 -arch=sm_90a -Xptxas -v -c`, and ptxas's report must show
0 bytes of spill stores for every kernel. Each source is also compiled the way setup.py's
CUDAExtension compiles it (--use_fast_math, torch's no-half-operator macros, sm_80), which is
what breaks first when a kernel leans on fp16/bf16 operators or sm_90-only instructions.
"""
import glob
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
NVCC = shutil.which("nvcc")

needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc is not on PATH: the CUDA sources are compile-checked only where the CUDA toolkit is installed")

HOPPER_FLAGS = ["-std=c++17", "-O3", "-arch=sm_90a", "-Xptxas", "-v"]
# the flags torch.utils.cpp_extension + setup.py give nvcc (one arch, to keep the test fast)
TORCH_EXTENSION_FLAGS = [
    "-std=c++17", "-O3", "--use_fast_math", "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__", "-Xcompiler", "-fPIC", "-gencode=arch=compute_80,code=sm_80",
]
CONFIGS = {"sm_90a": HOPPER_FLAGS, "torch_extension_sm_80": TORCH_EXTENSION_FLAGS}


def _name(path):
    return os.path.basename(path)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{(source name, config): CompletedProcess}, all compiles run concurrently."""
    out = tmp_path_factory.mktemp("nvcc")
    jobs = [(src, cfg) for src in CU_SOURCES for cfg in CONFIGS]

    def run(job):
        src, cfg = job
        obj = out / f"{_name(src)}.{cfg}.o"
        cmd = [NVCC, *CONFIGS[cfg], "-c", src, "-o", str(obj)]
        return (_name(src), cfg), subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        return dict(pool.map(run, jobs))


def ptxas_report(text):
    """{kernel (mangled name): {"registers": int, "spill_stores": int, "spill_loads": int}} from -Xptxas -v."""
    kernels, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = m.group(1)
            kernels[cur] = {}
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            cur = m.group(1) if m.group(1) in kernels else None
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            kernels[cur]["spill_stores"], kernels[cur]["spill_loads"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            kernels[cur]["registers"] = int(m.group(1))
    return kernels


def test_there_are_cuda_sources():
    assert CU_SOURCES, "no csrc/cuda/*.cu found"


@pytest.mark.parametrize("src", CU_SOURCES, ids=_name)
def test_sources_have_no_torch_headers(src):
    """The .cu files are compiled without torch's CUDA headers in mind (the binding is the .cpp)."""
    text = open(src).read()
    bad = re.findall(r'^\s*#\s*include\s*[<"]((?:torch|ATen|c10)/[^>"]*)[>"]', text, re.M)
    assert not bad, f"{_name(src)} includes torch headers: {bad}"


@needs_nvcc
@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("src", CU_SOURCES, ids=_name)
def test_compiles(compiled, src, cfg):
    res = compiled[(_name(src), cfg)]
    assert res.returncode == 0, f"nvcc {cfg} failed on {_name(src)}:\n{res.stderr[-6000:]}"


@needs_nvcc
@pytest.mark.parametrize("src", CU_SOURCES, ids=_name)
def test_kernels_do_not_spill(compiled, src):
    res = compiled[(_name(src), "sm_90a")]
    assert res.returncode == 0, f"nvcc failed on {_name(src)}:\n{res.stderr[-6000:]}"
    kernels = ptxas_report(res.stdout + res.stderr)
    assert kernels, f"no ptxas report for {_name(src)} (is -Xptxas -v honoured?)"
    missing = [k for k, v in kernels.items() if "spill_stores" not in v or "registers" not in v]
    assert not missing, f"unparsed ptxas report for {missing}"
    spilling = {k: v for k, v in kernels.items() if v["spill_stores"] or v["spill_loads"]}
    assert not spilling, "kernels spill registers:\n" + "\n".join(f"  {k}: {v}" for k, v in spilling.items())

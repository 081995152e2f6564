"""Build script: the pure-Python package always installs; native backends are optional.

* ``persona_kernels._C_cpu``: C++/OpenMP CPU kernels from ``csrc/cpu/*.cpp``.
* ``persona_kernels._C_cuda``: CUDA kernels from ``csrc/cuda/*.cu`` plus the torch
  bindings ``csrc/cuda/*.cpp``; built only when torch is a CUDA build and nvcc is found.

Environment:
  PERSONA_KERNELS_NO_NATIVE=1   skip every native build (reference/Triton paths only)
  PERSONA_KERNELS_NO_CUDA=1     skip the CUDA build
  PERSONA_KERNELS_NO_CPU=1      skip the C++ CPU build (the GPU suite builds only CUDA)
  PERSONA_KERNELS_CPU_FLAGS     extra/replacement arch flags for the CPU build (default -march=native)
  PERSONA_KERNELS_CUDA_ARCH     nvcc -gencode list, default sm_90 (Hopper) + sm_80 + PTX

A native build that fails prints a warning and the package stays importable; the status of
each build is written to persona_kernels/_native_build.json so that the runtime can say why a
backend is missing.
"""
import glob
import json
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
STATUS_FILE = os.path.join(HERE, "persona_kernels", "_native_build.json")


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _write_status(status):
    tmp = STATUS_FILE + ".tmp"
    with open(tmp, "w") as f:
        json.dump(status, f, indent=2, sort_keys=True)
    os.replace(tmp, STATUS_FILE)


def _native_extensions(status):
    if _truthy("PERSONA_KERNELS_NO_NATIVE"):
        status["cpu"] = status["cuda"] = "skipped: PERSONA_KERNELS_NO_NATIVE is set"
        return [], None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # torch missing in the build env: pure-Python install
        status["cpu"] = status["cuda"] = f"skipped: torch not importable at build time ({exc}); install torch first and use --no-build-isolation"
        return [], None

    cpu_flags = os.environ.get("PERSONA_KERNELS_CPU_FLAGS", "-march=native").split()
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    exts = []
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if _truthy("PERSONA_KERNELS_NO_CPU"):
        status["cpu"] = "skipped: PERSONA_KERNELS_NO_CPU is set"
    elif cpu_sources:
        exts.append(CppExtension(
            "persona_kernels._C_cpu", cpu_sources,
            extra_compile_args=["-O3", *openmp, *cpu_flags],
            extra_link_args=openmp,
            depends=sorted(glob.glob(os.path.join("csrc", "cpu", "*.h"))),
        ))
        status["cpu"] = "pending"
    else:
        status["cpu"] = "skipped: no sources"

    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    if _truthy("PERSONA_KERNELS_NO_CUDA"):
        status["cuda"] = "skipped: PERSONA_KERNELS_NO_CUDA is set"
    elif torch.version.cuda is None:
        status["cuda"] = f"skipped: torch {torch.__version__} is a CPU-only build"
    elif CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
        status["cuda"] = "skipped: nvcc / CUDA_HOME not found"
    elif cuda_sources:
        arch = os.environ.get(
            "PERSONA_KERNELS_CUDA_ARCH",
            "-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_90,code=compute_90",
        ).split()
        exts.append(CUDAExtension(
            "persona_kernels._C_cuda", cuda_sources,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *arch]},
        ))
        status["cuda"] = "pending"

    class OptionalBuildExtension(BuildExtension):
        """Build each native extension independently; a failure is reported, not fatal."""

        def build_extension(self, ext):
            key = "cuda" if ext.name.endswith("_C_cuda") else "cpu"
            try:
                super().build_extension(ext)
                status[key] = "built"
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                status[key] = f"failed: {type(exc).__name__}: {exc}"
                print(f"\n*** persona-kernels: the {key} extension failed to build; "
                      f"the package still works on its other backends.\n*** {exc}\n", file=sys.stderr)
            _write_status(status)

    return exts, OptionalBuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


status = {}
ext_modules, build_ext = _native_extensions(status)
_write_status(status)
setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext} if build_ext else {})

# Two entry points do all the set-up on a fresh machine: `make demo` and `make test`.
# Everything lives in a local virtual environment (.venv). torch 2.13.0 (CPU wheel) is
# installed first when missing, so pip never pulls a multi-GB CUDA build; the package is
# then installed without build isolation so its C++ extension builds against that torch.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.persona-kernels-installed
NATIVE_SOURCES := $(wildcard csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*)
PYTEST_ARGS ?=

.PHONY: install test lint demo bench gpu-check cuda-check env clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(NATIVE_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet setuptools wheel
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,plot]"
	$(PY) -m persona_kernels env
	touch $(STAMP)

# TRITON_INTERPRET=1 runs the Triton kernels on the CPU (tests/conftest.py sets it too).
test: install lint
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check persona_kernels tests benchmarks

demo: install
	$(PY) -m persona_kernels demo

bench: install
	$(PY) benchmarks/bench_accumulate_stats.py

# The one prepared GPU run (a lent GPU machine): build CUDA in place, GPU tests, every kernel
# timed; results under $(OUT) (default gpu-suite-out/). `make test` runs its CPU dry run.
OUT ?= gpu-suite-out
gpu-check:
	OUT=$(OUT) bash benchmarks/gpu_suite.sh

# Compile (no link) every CUDA source for Hopper with register/spill reports; needs only nvcc.
cuda-check:
	@for f in csrc/cuda/*.cu; do \
	  echo "nvcc $$f"; \
	  nvcc -std=c++17 -O3 -arch=sm_90a -Xptxas -v -c $$f -o /tmp/$$(basename $$f).o || exit 1; \
	done

env: install
	$(PY) -m persona_kernels env

clean:
	rm -rf $(VENV) build *.egg-info persona_kernels/*.so persona_kernels/_native_build.json

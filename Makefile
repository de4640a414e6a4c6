# Set-up and everyday commands. Every target creates the virtual environment itself.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# CPU torch on machines without one; a GPU user installs their CUDA torch into the venv first.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# DeepSpeed JIT-compiles its CPU shm-comm op on first use and caches it with the venv's absolute
# paths: one build directory per venv, so two checkouts never rebuild (or race on) each other's.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: venv demo test test-fast test-integration bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[all]"
	touch $(STAMP)

demo: venv
	$(PY) -m deploy.demo --workdir runs/demo

# Tiers (tests/conftest.py enforces the first two): unmarked = fast in-process unit tests;
# `integration` = starts a process, a server or DeepSpeed; `slow` = in-process real-shape forwards
# (seconds each); `gpu` = CUDA only (skipped without it). Per-test timeouts and the timeout method
# are in pyproject.toml; the slowest tests' durations are printed.
test: venv
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -m "not integration and not gpu and not slow" --durations=10 $(PYTEST_ARGS)

test-integration: venv
	$(PY) -m pytest -q -m integration --durations=25 $(PYTEST_ARGS)

bench: venv
	for b in bench/[!_]*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache

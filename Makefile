# The two Quickstart commands (README): `make demo` and `make test`. Each sets itself up.
# torch is pinned first so that pip never pulls a multi-GB CUDA build on a CPU machine;
# override with `make test TORCH=torch==X` elsewhere.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: demo test lint setup wheel-test compat-test

$(VENV)/.runtime: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime pyproject.toml
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.test

demo: $(VENV)/.runtime
	HF_HUB_OFFLINE=1 $(PY) -m lokr_diffusers demo

lint: $(VENV)/.test
	$(PY) -m ruff check lokr_diffusers tests examples benchmarks
	$(PY) -m mypy lokr_diffusers

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# Packaging checks (CI runs both after `make test`; each builds its own throwaway venv):
# wheel-test: build the wheel, install it into an empty venv, run it. compat-test: the oldest declared
# diffusers against the compatibility tests (DIFFUSERS=X for another version; docs/compatibility.md).
wheel-test:
	TORCH="$(TORCH)" .ci/wheel.sh

compat-test:
	TORCH="$(TORCH)" .ci/compat.sh

# The two Quickstart commands (README): `make demo` and `make test`. Each sets itself up.
# Both install the exact set in constraints.txt (the lock; `make lock` refreshes it), so a fresh clone
# installs what was tested, whatever was released since. torch is installed first, on its own, so that pip
# never pulls a multi-GB CUDA build on a CPU machine: `make test TORCH=torch==X` for another build (the rest
# of the lock still applies). pyproject.toml keeps the ranges users install.
VENV  ?= .venv
PY    := $(VENV)/bin/python
LOCK  := constraints.txt
TORCH ?= $(shell sed -nE 's/^(torch==[^ ;]+).*/\1/p' $(LOCK))
# the lock less its torch pin, which $(TORCH) takes the place of
PIN   := -c $(VENV)/constraints.txt

.PHONY: demo test lint setup lock test-latest wheel-test compat-test test-distributed test-tools

$(VENV)/.runtime: pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	grep -vE '^torch==' $(LOCK) > $(VENV)/constraints.txt
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIN) "$(TORCH)"
	$(PY) -m pip install -q $(PIN) -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime pyproject.toml $(LOCK)
	$(PY) -m pip install -q $(PIN) -e ".[test]"
	touch $@

setup: $(VENV)/.test

demo: $(VENV)/.runtime
	HF_HUB_OFFLINE=1 $(PY) -m lokr_diffusers demo

lint: $(VENV)/.test
	$(PY) .ci/lockdiff.py $(LOCK)
	$(PY) -m ruff check lokr_diffusers tests examples benchmarks
	$(PY) -m mypy lokr_diffusers

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# the 2-process training runs left out of the default suite (torchrun, gloo; about 40 s): CI runs them after `make test`
test-distributed: $(VENV)/.test
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow tests/test_training_sharded.py

# the tools' slower cases left out of the default suite (more families, the extraction benchmark's dry run; about a
# minute): CI runs them after `make test`
test-tools: $(VENV)/.test
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow tests/test_extract.py tests/test_lora_convert.py tests/test_merge.py \
		tests/test_combine.py tests/test_bench_extract.py

# The lock: `make lock` re-resolves the newest releases inside pyproject.toml's ranges into constraints.txt;
# `make test-latest` runs the suite on them in a throwaway venv and says which packages differ from the lock
# (not part of CI: a new release that breaks a test is news, not a broken build). docs/compatibility.md.
lock:
	TORCH="$(TORCH)" .ci/lock.sh

test-latest:
	TORCH="$(TORCH)" .ci/latest.sh

# Packaging checks (CI runs both after `make test`; each builds its own throwaway venv with the lock):
# wheel-test: build the wheel, install it into an empty venv, run it. compat-test: the oldest declared
# diffusers against the compatibility tests (DIFFUSERS=X for another version; docs/compatibility.md).
wheel-test:
	TORCH="$(TORCH)" .ci/wheel.sh

compat-test:
	TORCH="$(TORCH)" .ci/compat.sh

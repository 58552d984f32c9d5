#!/usr/bin/env bash
# The suite against the newest releases inside pyproject.toml's ranges (`make test-latest`), not the lock:
# a throwaway venv where pip resolves freely (torch held at $TORCH, by default the lock's pin: an unpinned
# torch may be a multi-GB CUDA build), then which packages differ from constraints.txt, then the same
# checks as `make test` (ruff, mypy, pytest), each run to the end. Exit 0 when all pass. Not part of CI:
# it says what the next lock would break. docs/compatibility.md: what to do with a failure.
#   .ci/latest.sh                     (make test-latest)
#   TORCH=torch .ci/latest.sh         the newest torch as well
#   PYTEST_ARGS="tests/test_loader.py" .ci/latest.sh
source "$(dirname "$0")/lib.sh" latest

step "venv: $TORCH, then the package and its [test] extra at the newest releases pip finds"
"$PYTHON" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -m pip install -q --upgrade pip
echo "$TORCH" > "$WORK/torch.txt"  # held: without it pip would take the newest torch, a CUDA build on PyPI
"$PY" -m pip install -q -c "$WORK/torch.txt" "$TORCH"
"$PY" -m pip install -q -c "$WORK/torch.txt" -e ".[test]"  # a fresh venv: the newest release of everything else

step "what differs from $LOCK"
"$PY" .ci/lockdiff.py "$LOCK"

failed=()
step "ruff"
"$PY" -m ruff check lokr_diffusers tests examples benchmarks || failed+=(ruff)
step "mypy"
"$PY" -m mypy lokr_diffusers || failed+=(mypy)
step "pytest"
# shellcheck disable=SC2086  # PYTEST_ARGS: words for pytest
HF_HUB_OFFLINE=1 "$PY" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} || failed+=(pytest)

if [ ${#failed[@]} -eq 0 ]; then
    step "the newest releases pass: \`make lock\` may take them"
else
    step "FAILED on the newest releases: ${failed[*]} (the lock stays; see the package lines above)"
    exit 1
fi

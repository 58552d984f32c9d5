#!/usr/bin/env bash
# Refresh constraints.txt, the exact set `make test`, `make demo` and CI install (`make lock`), and
# constraints-compat.txt, the same for the compatibility test (.ci/compat.sh) with diffusers at the lower
# bound pyproject.toml declares (what that diffusers needs moves with it, e.g. huggingface-hub; nothing else).
# uv resolves the newest releases inside pyproject.toml's ranges (the runtime dependencies and the [test]
# extra, which includes [train]) once for every Python the package supports (--universal: one pin per
# package, or one per Python where the newest release differs), with torch held at $TORCH. The torch
# wheel itself is installed separately (a CPU build here); the lock pins its version and dependencies.
# Review the diff, run `make test` and `make compat-test` on the new locks, then commit them with
# docs/compatibility.md's tested set.
#   .ci/lock.sh                        (make lock)
#   TORCH=torch==2.14.1 .ci/lock.sh    another torch
source "$(dirname "$0")/lib.sh" lock
UV=uv==0.13.9  # the resolver, pinned so that a refresh is repeatable
TORCH=${TORCH:-torch==2.13.0}  # no lock yet
LOWEST=$(sed -nE 's/^requires-python = ">=([0-9.]+)"/\1/p' pyproject.toml)

OLDEST=$(sed -nE 's/^[[:space:]]*"diffusers>=([0-9][0-9.]*)[,"].*/\1/p' pyproject.toml | head -n 1)
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "$UV"

# lock OUT WHAT PIN...: one resolution held at the given pins, written to OUT with a header saying so
lock() {
    local out=$1 what=$2
    shift 2
    printf '%s\n' "$@" > "$WORK/overrides.txt"
    "$WORK/venv/bin/uv" pip compile pyproject.toml --extra test --universal --python-version "$LOWEST" \
        --override "$WORK/overrides.txt" --no-header --quiet -o "$WORK/lock.txt"
    {
        echo "# $what"
        echo "# Made by \`make lock\` (.ci/lock.sh: $UV, pip compile --universal from Python $LOWEST, held at: $*)"
        echo "# on $(date -u +%Y-%m-%d): the newest releases inside pyproject.toml's ranges that day. Users"
        echo "# install from pyproject.toml's ranges; docs/compatibility.md says how this file is kept."
        sed "s#--override $WORK/overrides.txt#held by make lock#" "$WORK/lock.txt"  # no temporary path in the lock
    } > "$out"
    echo "wrote $out: $(grep -cE '^[a-z0-9]' "$out") pins; git diff $out shows what moved"
}
lock "$LOCK" "The exact set that \`make test\`, \`make demo\` and CI install (pip install -c constraints.txt)." \
    "$TORCH"
lock constraints-compat.txt "The exact set of the compatibility test (.ci/compat.sh): the oldest declared diffusers." \
    "$TORCH" "diffusers==$OLDEST"

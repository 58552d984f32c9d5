#!/usr/bin/env bash
# Refresh constraints.txt, the exact set `make test`, `make demo` and CI install (`make lock`).
# uv resolves the newest releases inside pyproject.toml's ranges (the runtime dependencies and the [test]
# extra, which includes [train]) once for every Python the package supports (--universal: one pin per
# package, or one per Python where the newest release differs), with torch held at $TORCH. The torch
# wheel itself is installed separately (a CPU build here); the lock pins its version and dependencies.
# Review the diff, run `make test` on the new lock, then commit it with docs/compatibility.md's tested set.
#   .ci/lock.sh                        (make lock)
#   TORCH=torch==2.14.1 .ci/lock.sh    another torch
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOCK=constraints.txt
UV=uv==0.13.9  # the resolver, pinned so that a refresh is repeatable
[ -n "${TORCH:-}" ] || TORCH=$(sed -nE 's/^(torch==[^ ;]+).*/\1/p' "$LOCK" 2>/dev/null || true)
TORCH=${TORCH:-torch==2.13.0}
LOWEST=$(sed -nE 's/^requires-python = ">=([0-9.]+)"/\1/p' pyproject.toml)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lokr-lock.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "$UV"
echo "$TORCH" > "$WORK/torch.txt"
"$WORK/venv/bin/uv" pip compile pyproject.toml --extra test --universal --python-version "$LOWEST" \
    --override "$WORK/torch.txt" --no-header --quiet -o "$WORK/lock.txt"
{
    echo "# The exact set that \`make test\`, \`make demo\` and CI install (pip install -c constraints.txt)."
    echo "# Made by \`make lock\` (.ci/lock.sh: $UV, pip compile --universal from Python $LOWEST, $TORCH)"
    echo "# on $(date -u +%Y-%m-%d): the newest releases inside pyproject.toml's ranges that day. Users"
    echo "# install from pyproject.toml's ranges; docs/compatibility.md says how this file is kept."
    cat "$WORK/lock.txt"
} > "$LOCK"
echo "wrote $LOCK: $(grep -cE '^[a-z0-9]' "$LOCK") pins; git diff $LOCK shows what moved"

#!/usr/bin/env bash
# The wheel a user installs: build it from the working tree (tracked and untracked-but-not-ignored
# files, in a clean copy, so no stale build/ output can slip in), check what is inside, install it in
# an EMPTY venv (torch first, its dependencies at constraints.txt's pins as `make test` installs them)
# and run it from outside the repo.
#   .ci/wheel.sh                 (make wheel-test)
#   PYTHON=python3.12 TORCH=torch==X .ci/wheel.sh
source "$(dirname "$0")/lib.sh" wheel
REPO=$PWD

step "copy the tree"
mkdir -p "$WORK/src"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$WORK/src"

step "build (isolated: the build backend comes from the index)"
"$PYTHON" -m venv "$WORK/build"
"$WORK/build/bin/python" -m pip install -q --upgrade pip
"$WORK/build/bin/python" -m pip wheel -q --no-deps -w "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK"/dist/lokr_diffusers-*.whl)
echo "built $(basename "$WHEEL")"

step "check its contents"
"$WORK/build/bin/python" - "$WHEEL" "$REPO" <<'PY'
import pathlib, sys, zipfile
wheel, repo = sys.argv[1], pathlib.Path(sys.argv[2])
names = zipfile.ZipFile(wheel).namelist()
meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
problems = []
if "lokr_diffusers/py.typed" not in names:
    problems.append("no lokr_diffusers/py.typed")
if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
    problems.append("no LICENSE in the dist-info")
if "License-Expression: Apache-2.0" not in meta:
    problems.append("METADATA has no License-Expression: Apache-2.0")
if not any(l.startswith("Requires-Dist: diffusers") and "<" in l for l in meta.splitlines()):
    problems.append("METADATA: diffusers without an upper bound")
sources = {str(p.relative_to(repo)) for p in (repo / "lokr_diffusers").rglob("*.py")}
missing = sorted(sources - set(names))
if missing:
    problems.append(f"modules missing from the wheel: {missing}")
stray = sorted(n for n in names if not n.startswith(("lokr_diffusers/", "lokr_diffusers-")))
if stray:
    problems.append(f"files outside the package: {stray}")
if problems:
    sys.exit("wheel check failed:\n  " + "\n  ".join(problems))
print(f"{len(names)} files; py.typed, LICENSE, License-Expression and every module are in")
PY
"$WORK/build/bin/python" -m zipfile -l "$WHEEL" | grep -E "py.typed|licenses/LICENSE"

step "install into an empty venv ($TORCH first, then the wheel with its dependencies at $LOCK's pins)"
"$PYTHON" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
grep -vE '^torch==' "$LOCK" > "$WORK/constraints.txt"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q -c "$WORK/constraints.txt" "$TORCH"
"$PY" -m pip install -q -c "$WORK/constraints.txt" "$WHEEL"
"$PY" -m pip check

step "run it (from outside the repository)"
cd "$WORK"
"$PY" -c "import lokr_diffusers, sys; assert lokr_diffusers.__file__.startswith(sys.prefix), lokr_diffusers.__file__; print('lokr_diffusers', lokr_diffusers.__version__)"
"$WORK/venv/bin/lokr-diffusers" --help > /dev/null
echo "lokr-diffusers --help: ok"
# the quickstart example, alone: a tiny offline pipeline, LoKr layers, images (numpy, PIL) from the wheel's deps
cp "$REPO/examples/quickstart.py" "$WORK/quickstart.py"
HF_HUB_OFFLINE=1 "$PY" "$WORK/quickstart.py" --out "$WORK/quickstart-out" | tail -1
HF_HUB_OFFLINE=1 "$PY" -c "
import lokr_diffusers.compat as c, diffusers
print('diffusers', diffusers.__version__, 'known good' if c.check_diffusers_version() else 'NOT in KNOWN_GOOD_DIFFUSERS')
"
step "ok"

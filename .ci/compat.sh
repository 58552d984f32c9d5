#!/usr/bin/env bash
# Which diffusers versions are known good: install the package with diffusers==$DIFFUSERS (default:
# the lower bound declared in pyproject.toml) in a throwaway venv, everything else at the pins of
# constraints-compat.txt (the lock of that lower bound: constraints.txt's set, with what that diffusers
# needs moved with it, `make lock`), and run the compatibility subset of the tests against it. Another
# diffusers has no lock: pip resolves the rest, and the versions it took are printed. `make test` covers
# the locked diffusers; this covers the oldest one we declare. A pass means the version may stay in docs/compatibility.md and
# lokr_diffusers/compat.py (KNOWN_GOOD_DIFFUSERS); a failure means the declared range is wrong.
#   .ci/compat.sh                                (make compat-test)
#   DIFFUSERS=0.43.0 .ci/compat.sh               another version
#   COMPAT_TESTS="tests/test_loader.py" .ci/compat.sh
source "$(dirname "$0")/lib.sh" compat constraints-compat.txt
if [ -z "${DIFFUSERS:-}" ]; then
    DIFFUSERS=$(sed -nE 's/^[[:space:]]*"diffusers>=([0-9][0-9.]*)[,"].*/\1/p' pyproject.toml | head -n 1)
    [ -n "$DIFFUSERS" ] || { echo "compat: no diffusers>= lower bound found in pyproject.toml" >&2; exit 1; }
fi
# What touches diffusers: the API checks, loading (routing through load_lora_weights, offloading, LoRA
# and LoKr side by side), diffusers' adapter methods, save_pretrained, the call scale, export.
DEFAULT_TESTS="tests/test_packaging.py
tests/test_loader.py::test_path_folder_dict_and_load_lora_weights_agree[sd1]
tests/test_loader.py::test_mixed_lora_and_lokr_file_and_coexistence
tests/test_loader.py::test_model_cpu_offload_before_or_after_loading
tests/test_loader.py::test_other_pipelines_sharing_the_components_have_the_methods
tests/test_loader.py::test_every_layout_loads_to_the_same_outputs[sdxl-kohya_ldm]
tests/test_pipeline.py::test_seed_example_verbatim
tests/test_export_comfyui.py::test_ldm_table_agrees_with_diffusers_single_file_converter
tests/test_export_round_trips.py::test_round_trip
tests/test_diffusers_api.py"
TESTS=${COMPAT_TESTS:-$DEFAULT_TESTS}

# the [test] extra without the linters and without [train] (datasets is not needed by these tests)
EXTRAS=$("$PYTHON" - <<'PY'
import re, tomllib
test = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]
print(" ".join(r for r in test if re.split(r"[\[<>=!~; ]", r)[0].lower() not in ("ruff", "mypy", "lokr-diffusers")))
PY
)

step "diffusers==$DIFFUSERS: venv ($TORCH, then the package, diffusers==$DIFFUSERS and: $EXTRAS; the rest at $LOCK's pins)"
"$PYTHON" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
if grep -qE "^diffusers==$DIFFUSERS( |$)" "$LOCK"; then
    grep -vE '^torch==' "$LOCK" > "$WORK/constraints.txt"  # torch: $TORCH
else
    echo "compat: $LOCK is the lock of another diffusers: pip resolves everything but torch"
    : > "$WORK/constraints.txt"
fi
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q -c "$WORK/constraints.txt" "$TORCH"
# shellcheck disable=SC2086  # EXTRAS is a list of requirement strings without spaces
"$PY" -m pip install -q -c "$WORK/constraints.txt" -e . "diffusers==$DIFFUSERS" $EXTRAS
"$PY" .ci/lockdiff.py "$LOCK"
"$PY" -m pip list 2>/dev/null | grep -iE "^(diffusers|transformers|peft|accelerate|huggingface.hub|torch) " | tr -s ' ' | paste -sd ',' -

step "diffusers==$DIFFUSERS: tests"
# shellcheck disable=SC2086  # one node id per word
HF_HUB_OFFLINE=1 "$PY" -m pytest -q -p no:cacheprovider $TESTS
step "diffusers==$DIFFUSERS: pass"

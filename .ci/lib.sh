# Shared by the .ci scripts (sourced: `source "$(dirname "$0")/lib.sh" NAME [LOCK]`): strict mode, the
# repository root as the working folder, the lock, torch's pin from it, a throwaway folder removed on
# exit ($WORK) and timed steps (`step "what"` prints `== NAME: what (N s)`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LIB_NAME=$1
LOCK=${2:-constraints.txt}
PYTHON=${PYTHON:-python3}
lock_pin() {  # lock_pin NAME: NAME==version as the lock pins it (empty without a lock or a pin)
    [ -f "$LOCK" ] && sed -nE "s/^($1==[^ ;]+).*/\\1/p" "$LOCK" | head -n 1
    return 0
}
TORCH=${TORCH:-$(lock_pin torch)}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lokr-$LIB_NAME.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
t0=$SECONDS
step() { echo "== $LIB_NAME: $* ($((SECONDS - t0)) s)"; }

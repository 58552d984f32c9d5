"""What the running environment has that constraints.txt does not say: packages at another version than the
lock pins for this Python and platform, and packages the lock does not name. Reports; exits 0 unless asked
(--strict). Used by `make test` (a line saying the venv is the lock) and `make test-latest` (what moved).

    python .ci/lockdiff.py [constraints.txt] [--strict]
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

NOT_LOCKED = {"lokr-diffusers", "pip", "setuptools", "wheel"}  # the package itself and the installers


def pins(lock: Path, environment: dict[str, str] | None = None) -> dict[str, str]:
    """{name: version} of the lock's `name==version` lines whose marker holds here (or in `environment`,
    marker variables over this interpreter's). Two pins of one package for one environment: ValueError."""
    out: dict[str, str] = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        if not line or line[0] in " #-":
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(environment):
            (spec,) = req.specifier
            name = canonicalize_name(req.name)
            if name in out:
                raise ValueError(f"{lock.name}: {name} pinned twice ({out[name]}, {spec.version}) for one environment")
            out[name] = spec.version
    return out


def installed() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}


def main(argv: list[str]) -> int:
    strict = "--strict" in argv
    args = [a for a in argv if a != "--strict"]
    lock = Path(args[0] if args else Path(__file__).resolve().parent.parent / "constraints.txt")
    want, have = pins(lock), installed()
    moved = sorted(n for n in have if n in want and have[n].split("+")[0] != want[n] and n not in NOT_LOCKED)
    extra = sorted(n for n in have if n not in want and n not in NOT_LOCKED)
    if not moved and not extra:
        print(f"lockdiff: the environment is {lock.name} ({sum(n in have for n in want)} packages at its pins)")
        return 0
    print(f"lockdiff: {len(moved)} package(s) differ from {lock.name}, {len(extra)} not in it")
    for n in moved:
        print(f"  {n:28} {want[n]:>14} -> {have[n]}")
    for n in extra:
        print(f"  {n:28} {'(not locked)':>14}    {have[n]}")
    return 1 if strict else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

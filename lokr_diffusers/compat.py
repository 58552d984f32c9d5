"""The diffusers versions lokr_diffusers is known to work with, and one warning for any other.

lokr_diffusers wraps diffusers' LoRA loaders and calls some of its private helpers (listed in
docs/compatibility.md; tests/test_packaging.py checks that they exist and take the arguments we pass),
so a diffusers release can break it without notice. The versions below passed the compatibility
subset of the test suite (.ci/compat.sh); docs/compatibility.md holds the same list as a table, and
pyproject.toml bounds diffusers to the range they span.

Nothing here imports diffusers: the installed version is read from the package metadata.
"""

from __future__ import annotations

import logging
from importlib import metadata

logger = logging.getLogger(__name__)

# Oldest first. Add a version only after the compatibility subset passed against it
# (DIFFUSERS=X .ci/compat.sh), and add its row to docs/compatibility.md.
KNOWN_GOOD_DIFFUSERS: tuple[str, ...] = ("0.41.0", "0.42.1")

_warned: set[str] = set()


def installed_diffusers_version() -> str | None:
    """The installed diffusers version, from its metadata (diffusers is not imported); None if absent."""
    try:
        return metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        return None


def check_diffusers_version() -> bool:
    """True when the installed diffusers is one of KNOWN_GOOD_DIFFUSERS. Otherwise log a warning
    (once per process for each version) and return False; nothing is raised."""
    version = installed_diffusers_version()
    if version in KNOWN_GOOD_DIFFUSERS:
        return True
    key = str(version)
    if key not in _warned:
        _warned.add(key)
        found = "is not installed" if version is None else f"{version} is installed"
        logger.warning(
            "diffusers %s; lokr_diffusers was tested with diffusers %s. It touches diffusers' LoRA loading "
            "internals, so other versions may fail or misbehave (see docs/compatibility.md).",
            found, ", ".join(KNOWN_GOOD_DIFFUSERS))
    return False

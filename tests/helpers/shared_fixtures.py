"""Fixtures shared by test modules split by concern (tests/conftest.py registers them by importing them):
each stays module-scoped, so a module sees what it saw when it was one file.

- `sources`: the export tests' source pipelines with inputs and outputs (tests/helpers/sd_export.py);
- `env`: the reliability tests' valid files and pipelines (tests/helpers/bad_files.py);
- `template`, `ctx`: the training checkpoint tests' complete checkpoint and per-test context
  (tests/helpers/training_faults.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from helpers.bad_files import Env, build_env
from helpers.sd_export import cached_sources
from helpers.training_faults import Ctx, image_folder, write_template


@pytest.fixture(scope="module")
def sources() -> Callable[..., tuple]:
    """(kind, extras, dora_out=True) -> (pipeline, inputs, its outputs), built once per module."""
    return cached_sources()


@pytest.fixture(scope="module")
def env() -> Env:
    return build_env()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete checkpoint-1 of the tiny model (copied and damaged by the cases)."""
    return write_template(tmp_path_factory.mktemp("template"))


@pytest.fixture
def ctx(tmp_path: Path, tiny_sd_dir: str, template: Path) -> Ctx:
    c = Ctx(tmp_path, tiny_sd_dir, template)
    image_folder(Path(c.data()))
    return c

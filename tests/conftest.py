"""Shared fixtures: tiny offline pipelines (built once per session) and deterministic torch."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

# the fixtures of test modules split by concern, registered by importing them (after HF_HUB_OFFLINE is set)
from helpers.shared_fixtures import ctx, env, sources, template  # noqa: E402, F401


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from lokr_diffusers.tiny import save_tiny_pipeline

    return save_tiny_pipeline(str(tmp_path_factory.mktemp("tiny_sd")))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from lokr_diffusers.tiny import save_tiny_pipeline

    return save_tiny_pipeline(str(tmp_path_factory.mktemp("tiny_sdxl")), sdxl=True)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """For modules of tiny ops: one thread avoids OpenMP spin/sync costs (10x+ on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _warnings_said_afresh() -> None:
    """logs.warn_once says each warning once per process; every test starts with none said."""
    from lokr_diffusers import logs

    logs.reset_warnings()

"""Shared fixtures: tiny offline pipelines (built once per session) and deterministic torch."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from lokr_diffusers.tiny import save_tiny_pipeline

    return save_tiny_pipeline(str(tmp_path_factory.mktemp("tiny_sd")))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from lokr_diffusers.tiny import save_tiny_pipeline

    return save_tiny_pipeline(str(tmp_path_factory.mktemp("tiny_sdxl")), sdxl=True)

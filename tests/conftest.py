"""Shared fixtures: tiny models built from configs (never downloaded)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Two threads per process; one per worker when pytest-xdist runs the suite in parallel processes,
# so the workers do not contend for the same cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))

from tests.devices import test_device  # noqa: E402
from tests.tiny_models import TINY_BUILDERS, build_tiny  # noqa: E402


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where models run in this session (``ADAPTERKIT_TEST_DEVICE``, default cpu)."""
    return test_device()


@pytest.fixture(params=sorted(TINY_BUILDERS))
def tiny_kind(request: pytest.FixtureRequest) -> str:
    """Each tiny architecture in turn."""
    return request.param


@pytest.fixture
def tiny(tiny_kind: str):
    """(model in eval mode, example inputs) for each tiny architecture."""
    return build_tiny(tiny_kind)

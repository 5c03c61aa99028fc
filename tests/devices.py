"""The device the test suite runs its models on: ``ADAPTERKIT_TEST_DEVICE`` (default ``cpu``).

``ADAPTERKIT_TEST_DEVICE=cuda pytest tests`` runs the suite on a GPU: the
tiny-model builders and the fixtures below put models and inputs there, and
``ak.train`` follows the model's ``auto`` device.
"""

from __future__ import annotations

import os

import torch


def test_device() -> torch.device:
    """The device named by ``ADAPTERKIT_TEST_DEVICE`` (``cpu`` when unset)."""
    from adapterkit.runtime.device import resolve_device

    return resolve_device(os.environ.get("ADAPTERKIT_TEST_DEVICE", "cpu"))


test_device.__test__ = False  # a helper, not a test

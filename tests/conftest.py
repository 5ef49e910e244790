"""Test set-up; the helpers live in swp_plugin.testing."""

from __future__ import annotations

import os

import pytest
import torch

from swp_plugin.recipes.data import DEBIAN_FASHION_MNIST
from swp_plugin.testing import (  # noqa: F401 - re-exported for the tests
    calibrate_bn,
    outputs_around_step,
    randomize_skeletons,
    regularized_step,
    rel_err,
)

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))  # a shared machine: OMP_NUM_THREADS=1


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.needs_data``: skipped where Debian's Fashion-MNIST is not installed."""
    if item.get_closest_marker("needs_data") and not DEBIAN_FASHION_MNIST.exists():
        pytest.skip("Debian's dataset-fashion-mnist missing (apt install dataset-fashion-mnist)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

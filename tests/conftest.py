"""Test set-up; the helpers live in swp_plugin.testing."""

from __future__ import annotations

import pytest
import torch

from swp_plugin.testing import (  # noqa: F401 - re-exported for the tests
    calibrate_bn,
    outputs_around_step,
    randomize_skeletons,
    regularized_step,
    rel_err,
)

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

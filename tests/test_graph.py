"""swp_plugin.utils.timeout (nested time limits) and swp_plugin.pruning.graph (graph builds that leave nothing)."""

from __future__ import annotations

import time

import pytest

from swp_plugin.utils import time_limit


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_inner_limit_fires_and_outer_keeps_running():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="outer"):
        with time_limit(0.6, "outer"):
            with pytest.raises(TimeoutError, match="inner"):
                with time_limit(0.1, "inner"):
                    _spin(1.0)
            _spin(2.0)
    assert 0.5 < time.monotonic() - start < 1.5


def test_sooner_outer_limit_wins():
    with pytest.raises(TimeoutError, match="outer"):
        with time_limit(0.2, "outer"):
            with time_limit(5.0, "inner"):
                _spin(1.0)


def test_no_limit():
    with time_limit(None):
        _spin(0.01)


def test_a_failed_graph_build_leaves_no_hook_and_keeps_the_mode():
    """torch-pruning's tracing removes its forward hooks only when the traced forward succeeds."""
    import torch
    import torch.nn as nn

    from swp_plugin.pruning.graph import build_graph

    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            self.conv(x)
            raise RuntimeError("boom")

    model = Fails().train()
    with pytest.raises(RuntimeError, match="boom"):
        build_graph(model, torch.randn(1, 3, 8, 8), {})
    assert not model.conv._forward_hooks and model.training
    good = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    assert build_graph(good, torch.randn(1, 3, 8, 8), {}, timeout=30) is not None
    assert good.training and not any(m._forward_hooks for m in good.modules())

"""swp_plugin.pruning.graph: nested time limits (graph build, group search)."""

from __future__ import annotations

import time

import pytest

from swp_plugin.pruning.graph import time_limit


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

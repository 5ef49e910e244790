"""swp_plugin.utils.timing: the side-by-side loop and the in-TorchScript timing of small layers."""

from __future__ import annotations

import torch
import torch.nn as nn

from swp_plugin.utils import fastest, fastest_in_script


class _Unscriptable(nn.Module):
    def forward(self, x):
        return x * len({id(x): x})  # a dict keyed by id(): TorchScript cannot compile it


def test_fastest_times_every_callable():
    calls = {"a": 0, "b": 0}

    def run(name):
        calls[name] += 1

    times = fastest({"a": lambda: run("a"), "b": lambda: run("b")}, rounds=3, budget_s=10)
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    assert calls == {"a": 4, "b": 4}  # one warm-up call, then the rounds


def test_in_script_times_every_layer():
    torch.manual_seed(0)
    small, large = nn.Conv2d(8, 8, 3, padding=1).eval(), nn.Conv2d(8, 64, 3, padding=1).eval()
    x = torch.randn(1, 8, 32, 32)
    times = fastest_in_script({"small": small, "large": large}, x, calls=16)
    assert set(times) == {"small", "large"} and all(t > 0 for t in times.values())


def test_in_script_refuses_what_does_not_script():
    assert fastest_in_script({"odd": _Unscriptable(), "conv": nn.Conv2d(3, 3, 1)}, torch.randn(1, 3, 4, 4), 4) is None

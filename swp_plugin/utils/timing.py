"""Side-by-side timing of alternatives (the auto backend of ``StripeConv2d``, deployment's per-layer choice)."""

from __future__ import annotations

import time
from typing import Callable, Dict


def fastest(runs: Dict[str, Callable[[], object]], rounds: int = 5, budget_s: float = 0.5) -> Dict[str, float]:
    """Best-of-``rounds`` wall time (seconds) of each zero-argument callable, timed side by side.

    Each callable runs once untimed (warm-up: caches, plans, lazy builds), then the rounds interleave them in
    rotated order so that a burst of load from elsewhere hits all alike. Stops after ``budget_s`` seconds of
    timed rounds (at least two rounds).
    """
    names = list(runs)
    for name in names:
        runs[name]()
    best = {name: float("inf") for name in names}
    start = time.perf_counter()
    for r in range(rounds):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            t0 = time.perf_counter()
            runs[name]()
            best[name] = min(best[name], time.perf_counter() - t0)
        if r >= 1 and time.perf_counter() - start > budget_s:
            break
    return best

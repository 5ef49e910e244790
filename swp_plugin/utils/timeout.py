"""A nestable wall-clock limit for blocks of Python code (SIGALRM; main thread only).

Used around torch-pruning's graph work, whose group search does not end on some models. The ``TimeoutError`` is
raised between Python bytecodes, so it never interrupts native code halfway; code that can be interrupted must
clean up in ``finally`` (``swp_plugin.pruning.graph.build_graph`` removes the hooks torch-pruning leaves).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Iterator


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str = "DepGraph work") -> Iterator[None]:
    """Raise ``TimeoutError`` in the block after ``seconds`` (main thread only; elsewhere no limit).

    Nests: inside another ``time_limit`` the sooner deadline wins, and the outer one keeps running.
    """
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return
    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    if outer_left and outer_left <= seconds:  # the enclosing limit fires first
        yield
        return

    def _raise(signum, frame):
        raise TimeoutError(f"{what} took longer than {seconds:g} s")

    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-3))

"""Side-by-side timing of alternatives: the one timing loop of the project (the auto backend of ``StripeConv2d``,
deployment's per-layer choice, ``swp_plugin.measure.measure_latency``, the benchmarks)."""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Callable, Dict, List

import torch


def side_by_side(runs: Dict[str, Callable[[], object]], rounds: int, warmup: int = 1, stat: str = "median",
                 budget_s: float | None = None, progress: bool = False, block: int = 1,
                 settle_s: float = 0.0) -> Dict[str, float]:
    """Wall time (seconds) of each zero-argument callable: ``warmup`` untimed calls each (caches, plans, lazy
    builds), then ``rounds`` rounds in which every callable runs ``block`` times in a row, in an order rotated
    from round to round so that load from elsewhere and frequency changes hit all alike. ``stat``: ``'median'``
    or ``'min'`` of the calls. With ``budget_s``, stops after that many seconds of timed rounds (at least two).

    Use ``block > 1`` for callables that run on different thread pools (PyTorch's OpenMP threads, onnxruntime's
    pool): a pool's threads spin for a while after a call and slow the other pool's next calls; in a block, the
    median is taken past that, and ``settle_s`` seconds of sleep before each block let the spinning end."""
    names = list(runs)
    for name in names:
        for _ in range(warmup):
            runs[name]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    start = time.perf_counter()
    iterator = range(rounds)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="latency", leave=False)
    for r in iterator:
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            if settle_s:
                time.sleep(settle_s)
            for _ in range(block):
                t0 = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - t0)
        if budget_s is not None and r >= 1 and time.perf_counter() - start > budget_s:
            break
    reduce = min if stat == "min" else statistics.median
    return {name: reduce(values) for name, values in times.items()}


def synchronized(runs: Dict[str, Callable[[], object]], device) -> Dict[str, Callable[[], object]]:
    """``runs`` as they must be timed on ``device``: on CUDA each call waits for the device (its kernels are
    asynchronous), elsewhere unchanged."""
    if torch.device(device).type != "cuda":
        return runs
    return {name: (lambda run=run: (run(), torch.cuda.synchronize(device))[0]) for name, run in runs.items()}


def fastest(runs: Dict[str, Callable[[], object]], rounds: int = 5, budget_s: float = 0.5) -> Dict[str, float]:
    """Best-of-``rounds`` wall time (seconds) of each callable, timed side by side (a quick choice)."""
    return side_by_side(runs, rounds, warmup=1, stat="min", budget_s=budget_s)


class _Repeat(torch.nn.Module):
    """``layer`` ``calls`` times in one TorchScript call, on the inputs in turn."""

    def __init__(self, layer: torch.nn.Module, calls: int) -> None:
        super().__init__()
        self.layer, self.calls = layer, calls

    def forward(self, xs: List[torch.Tensor]) -> torch.Tensor:
        y = xs[0]
        for i in range(self.calls):
            y = self.layer(xs[i % len(xs)])
        return y


def fastest_in_script(layers: Dict[str, torch.nn.Module], x: torch.Tensor, calls: int) -> Dict[str, float] | None:
    """Best-of wall time (seconds) of one call ``layer(x)`` of each layer, run ``calls`` times in a row inside
    TorchScript (on ``x`` and a copy, alternately): a small layer's time without Python's call overhead (tens of
    microseconds, more than the layer itself at batch 1 on a CIFAR net), as a TorchScript-run model pays it.
    None where a layer does not script."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice
            runs = {name: torch.jit.script(_Repeat(layer, calls)) for name, layer in layers.items()}
    except Exception:  # a layer TorchScript cannot compile: the caller keeps its Python-timed figures
        return None
    xs = [x, x.clone()]
    # without the JIT's optimizations: unrolled, a loop's dead results would be eliminated (a pure op run 1 in 8)
    with torch.no_grad(), torch.jit.optimized_execution(False):
        times = fastest({name: (lambda run=run: run(xs)) for name, run in runs.items()})
    return {name: t / calls for name, t in times.items()}

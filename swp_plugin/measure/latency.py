"""Side-by-side CPU latency of several models (median of interleaved rounds)."""

from __future__ import annotations

import statistics
import time
from typing import Dict, List, Mapping

import torch
import torch.nn as nn
from tqdm import tqdm


@torch.inference_mode()
def measure_latency(
    models: Mapping[str, nn.Module],
    example: torch.Tensor,
    repeats: int = 50,
    warmup: int = 5,
    threads: int | None = None,
    progress: bool = True,
) -> Dict[str, float]:
    """Median forward time in milliseconds of each model on ``example`` (CPU, eval mode).

    The models are timed side by side: each round runs every model once, in an order rotated from round to
    round, so that load from other processes and frequency changes hit all of them alike.
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        names = list(models)
        for model in models.values():
            model.eval()
            for _ in range(warmup):
                model(example)
        times: Dict[str, List[float]] = {name: [] for name in names}
        for r in tqdm(range(repeats), desc="latency", leave=False, disable=not progress):
            for k in range(len(names)):
                name = names[(r + k) % len(names)]
                start = time.perf_counter()
                models[name](example)
                times[name].append(time.perf_counter() - start)
        return {name: 1000 * statistics.median(values) for name, values in times.items()}
    finally:
        torch.set_num_threads(previous)

"""Side-by-side CPU latency of several models (median of interleaved rounds)."""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Mapping

import torch
import torch.nn as nn

from ..utils.timing import side_by_side


@torch.inference_mode()
def measure_latency(
    models: Mapping[str, nn.Module | Callable],
    example,
    repeats: int = 50,
    warmup: int = 5,
    threads: int | None = None,
    progress: bool = True,
) -> Dict[str, float]:
    """Median forward time in milliseconds of each model (eval mode) or callable on ``example``.

    The models are timed side by side (:func:`swp_plugin.utils.timing.side_by_side`): each round runs every model
    once, in an order rotated from round to round, so that load from other processes and frequency changes hit
    all of them alike. A callable (e.g. an onnxruntime session wrapped in a function) is called as it is.
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for model in models.values():
            if isinstance(model, nn.Module):
                model.eval()
        runs = {name: partial(model, example) for name, model in models.items()}
        times = side_by_side(runs, repeats, warmup=warmup, progress=progress)
        return {name: 1000 * t for name, t in times.items()}
    finally:
        torch.set_num_threads(previous)

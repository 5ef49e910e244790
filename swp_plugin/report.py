"""Reporting for the examples: side-by-side CPU latency, the results table, the filter-shape picture."""

from __future__ import annotations

import os
import statistics
import time
from typing import Dict, List, Mapping, Sequence

import torch
import torch.nn as nn
from tqdm import tqdm

from .layers import StripeConv2d


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


def format_table(stages: Sequence[Mapping], title: str | None = None) -> str:
    """The stage table: accuracy, params (M, with stripe indexes), MACs (M), latency, training cost."""
    lines = [title] if title else []
    lines.append(f"{'stage':<12}{'acc (%)':>9}{'params (M)':>12}{'MACs (M)':>10}{'latency (ms)':>14}"
                 f"{'epochs':>8}{'train (s)':>11}")
    for s in stages:
        latency = s.get("latency_ms")
        lines.append(
            f"{s['name']:<12}{s['accuracy']:>9.2f}{s['params'] / 1e6:>12.4f}{s['macs'] / 1e6:>10.2f}"
            f"{(f'{latency:.3f}' if latency is not None else '-'):>14}"
            f"{s.get('epochs', 0):>8g}{s.get('train_seconds', 0):>11.0f}"
        )
    return "\n".join(lines)


def stripe_layers(model: nn.Module) -> List[tuple]:
    """``(name, layer)`` of every ``StripeConv2d`` with a kernel larger than 1x1."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, StripeConv2d) and m.kernel_size[0] * m.kernel_size[1] > 1]


def kept_stripe_fraction(layer: StripeConv2d, filters: int | None = None) -> torch.Tensor:
    """``(kh, kw)``: fraction of the layer's filters (or of ``filters``) that kept the stripe at each position."""
    mask = layer.stripe_mask().float()
    return mask.sum(0).cpu() / max(1, filters or layer.out_channels)


def save_filter_shapes(
    model: nn.Module, path: str | os.PathLike, original_filters: Mapping[str, int] | None = None,
    title: str | None = None,
) -> bool:
    """A heatmap per ``StripeConv2d`` layer (kernel > 1x1): the fraction of filters that kept the stripe at
    each kernel position. ``original_filters`` (layer name -> filters before SWP) makes the fractions
    relative to the layer before pruning. Returns False (nothing written) when there is no such layer."""
    layers = stripe_layers(model)
    if not layers:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(6, len(layers))
    rows = (len(layers) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols + 0.8, 2.5 * rows + 0.6), squeeze=False)
    image = None
    for ax, (name, layer) in zip(axes.flat, layers):
        filters = (original_filters or {}).get(name)
        frac = kept_stripe_fraction(layer, filters)
        image = ax.imshow(frac.numpy(), vmin=0, vmax=1, cmap="viridis")
        kept = layer.num_stripes / max(1, (filters or layer.out_channels) * frac.numel())
        ax.set_title(f"{name}\n{layer.out_channels}{'/' + str(filters) if filters else ''} filters\n"
                     f"{100 * kept:.0f}% of stripes kept", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.suptitle(title or "kept stripes per kernel position (fraction of filters)", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, fraction=0.03, pad=0.02)
    fig.savefig(os.fspath(path), dpi=110)
    plt.close(fig)
    return True

"""Pictures of a stripe-pruned model: remaining stripes per kernel position (paper Fig. 9) and the most
frequent filter shapes per layer (paper Fig. 6). Needs matplotlib (Agg backend, no display)."""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import List, Mapping, Tuple, Union

import torch.nn as nn

from ..layers.stripe_conv import StripeConv2d


def _stripe_layers(model: nn.Module) -> List[Tuple[str, StripeConv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, StripeConv2d) and m.kernel_size != (1, 1)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_stripe_ratios(
    model: nn.Module,
    path: Union[str, os.PathLike],
    cols: int = 8,
    original_filters: Mapping[str, int] | None = None,
    title: str | None = None,
) -> None:
    """PNG: for every KxK stripe layer, the fraction of filters keeping the stripe at each kernel position.

    ``original_filters`` (layer name -> filters before pruning) makes the fractions relative to the layer
    before pruning, so that removed filters count as lost stripes."""
    layers = _stripe_layers(model)
    if not layers:
        raise ValueError("the model has no stripe-pruned KxK conv (StripeConv2d); prune it first")
    plt = _pyplot()
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, layer) in zip(axes.flat, layers):
        filters = (original_filters or {}).get(name) or layer.out_channels
        ratio = (layer.stripe_mask().float().sum(dim=0) / filters).cpu().numpy()
        ax.imshow(ratio, vmin=0, vmax=1, cmap="viridis")
        for i in range(ratio.shape[0]):
            for j in range(ratio.shape[1]):
                value = ratio[i, j]
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="w" if value < 0.6 else "k")
        ax.set_title(name[-18:], fontsize=6)
    fig.suptitle(title or "remaining stripes per kernel position (fraction of filters)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_filter_shapes(model: nn.Module, path: Union[str, os.PathLike], top: int = 5) -> None:
    """PNG: per KxK stripe layer, its ``top`` most frequent filter shapes (kept stripe patterns) and counts."""
    layers = _stripe_layers(model)
    if not layers:
        raise ValueError("the model has no stripe-pruned KxK conv (StripeConv2d); prune it first")
    plt = _pyplot()
    fig, axes = plt.subplots(len(layers), top, figsize=(1.3 * top, 1.1 * len(layers)), squeeze=False)
    for row, (name, layer) in zip(axes, layers):
        masks = layer.stripe_mask().cpu()
        counts = Counter(tuple(m.flatten().tolist()) for m in masks)
        for ax in row:
            ax.axis("off")
        for ax, (pattern, count) in zip(row, counts.most_common(top)):
            ax.imshow([[float(v) for v in pattern[i * layer.kernel_size[1]:(i + 1) * layer.kernel_size[1]]]
                       for i in range(layer.kernel_size[0])], vmin=0, vmax=1, cmap="Greys")
            ax.set_title(f"{count}/{len(masks)}", fontsize=6)
        row[0].text(-0.6, 0.5, name[-20:], transform=row[0].transAxes, ha="right", va="center", fontsize=6)
    fig.suptitle("most frequent filter shapes per layer (black: kept stripe)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

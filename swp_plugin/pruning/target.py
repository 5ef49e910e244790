"""Target-driven stripe selection: kill the least important stripes until MACs or params drop by ``r``.

Stripe importance is ``|FS| * ||W_stripe||_2`` (with untrained skeletons, FS = 1, it is the stripe's weight
magnitude: a data-free start), optionally times the gain ``|gamma| / sqrt(running_var + eps)`` of the BatchNorm
channel the stripe's filter feeds (``score='fs_bn'``: the stripe's size after the BatchNorm, which is what the
next layer sees), divided by the mean importance of the stripe's layer so that layers compete on relative
terms (torch-pruning's ``normalizer='mean'``). Stripes are ranked globally, lowest first, each layer capped at
``max_pruning_ratio`` of its stripes.

How many stripes go is searched on the real outcome: each candidate is rehearsed on a copy of the model
(merge, channel cleanup through DepGraph, conversion) and counted with ``count_ops_and_params``, so the
savings of channel cleanup are included. A fast estimate (stripe MACs only) proposes candidates; a few
rehearsals correct it.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

#: The reduction is accepted once within this distance of the target (the contract is 0.03).
ACCEPT = 0.01
MAX_REHEARSALS = 8


#: the stripe scores of target-driven pruning (``StripePruner(score=...)``)
SCORES = ("fs", "fs_bn")


def stripe_scores(skeletons: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                  alive: Sequence[torch.Tensor], gains: Sequence[torch.Tensor | None] | None = None
                  ) -> List[torch.Tensor]:
    """Per layer, FS-shaped importance of each alive stripe (``inf`` for dead ones), mean-normalised.
    ``gains``: per layer ``None`` or a multiplier broadcastable to the skeleton (see :func:`batchnorm_gains`)."""
    scores = []
    for i, (fs, weight, live) in enumerate(zip(skeletons, weights, alive)):
        magnitude = weight.detach().float().norm(dim=1)  # (out, kh, kw) for a conv, (S,) for a stripe conv
        score = fs.detach().float().abs() * magnitude
        if gains is not None and gains[i] is not None:
            score = score * gains[i].to(score)
        mean = score[live].mean() if live.any() else torch.tensor(1.0)
        score = score / (mean if mean > 0 else 1.0)
        scores.append(torch.where(live, score, torch.full_like(score, float("inf"))))
    return scores


@torch.no_grad()
def batchnorm_gains(layers: Sequence[nn.Module], norms: Sequence[nn.Module | None]) -> List[torch.Tensor | None]:
    """Per skeleton layer, the gain ``|gamma| / sqrt(running_var + eps)`` of the BatchNorm channel each of its
    filters feeds, shaped to multiply the layer's skeleton (``(out, 1, 1)`` for a conv, one value per stripe
    for a ``StripeConv2d``); ``None`` where ``norms[i]`` is not a BatchNorm with running statistics."""
    gains: List[torch.Tensor | None] = []
    for layer, norm in zip(layers, norms):
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or norm.running_var is None:
            gains.append(None)
            continue
        gain = norm.running_var.detach().float().add(norm.eps).rsqrt()
        if norm.affine:
            gain = gain * norm.weight.detach().float().abs()
        stripe_out = getattr(layer, "stripe_out", None)
        gains.append(gain[stripe_out] if stripe_out is not None else gain.view(-1, 1, 1))
    return gains


def unit_scores(scores: List[torch.Tensor], units: Sequence[torch.Tensor]
                ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Scores of kill units (groups of stripes that die together, e.g. one kernel position across all filters
    of a layer for shape-wise pruning). ``units``: per layer, FS-shaped ids in ``[0, n)``. A unit's score is
    the sum of its stripes' scores (``inf`` if one is dead), mean-normalised over the layer's units.
    Returns ``(scores, sizes)``: per layer ``(n,)`` tensors."""
    grouped, sizes = [], []
    for score, unit in zip(scores, units):
        ids = unit.flatten().to(torch.long).cpu()
        n = int(ids.max()) + 1 if ids.numel() else 0
        total = torch.zeros(n).index_add_(0, ids, score.flatten().float().cpu())
        finite = torch.isfinite(total)
        mean = total[finite].mean() if finite.any() else torch.tensor(1.0)
        grouped.append(total / (mean if mean > 0 else 1.0))
        sizes.append(torch.bincount(ids, minlength=n).float())
    return grouped, sizes


def ranked_candidates(scores: List[torch.Tensor], costs: Sequence[float | torch.Tensor], max_ratio: float
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Alive stripes (or units) in kill order, honouring the per-layer cap: ``(layer index, flat index, cost)``.
    ``costs``: per layer, the cost of one entry (a number) or of each entry (a tensor shaped like the scores)."""
    layers, flats, values, cost = [], [], [], []
    for i, score in enumerate(scores):
        flat = score.flatten()
        alive = torch.isfinite(flat)
        allowed = int(max_ratio * flat.numel()) - int((~alive).sum())
        if allowed <= 0:
            continue
        order = torch.argsort(flat.masked_fill(~alive, float("inf")))[: min(allowed, int(alive.sum()))]
        layers.append(torch.full((len(order),), i, dtype=torch.long))
        flats.append(order)
        values.append(flat[order])
        if isinstance(costs[i], torch.Tensor):
            cost.append(costs[i].flatten().float().cpu()[order])
        else:
            cost.append(torch.full((len(order),), float(costs[i])))
    if not layers:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, torch.zeros(0)
    order = torch.argsort(torch.cat(values), stable=True)
    return torch.cat(layers)[order], torch.cat(flats)[order], torch.cat(cost)[order]


def kill_masks(shapes: Sequence[torch.Size], layers: torch.Tensor, flats: torch.Tensor, k: int) -> List[torch.Tensor]:
    """Bool masks (FS-shaped) of the first ``k`` candidates."""
    masks = [torch.zeros(s, dtype=torch.bool).flatten() for s in shapes]
    for layer, flat in zip(layers[:k].tolist(), flats[:k].tolist()):
        masks[layer][flat] = True
    return [m.view(s) for m, s in zip(masks, shapes)]


def search_kill_count(target: float, estimate: Callable[[int], float], measure: Callable[[int], float],
                      n: int) -> Tuple[int, float]:
    """Find ``k`` in ``[0, n]`` whose measured reduction is closest to ``target``.

    ``estimate(k)`` is cheap and monotone (stripe MACs only); ``measure(k)`` rehearses. The estimate is shifted
    by the last measured gap until the result is within :data:`ACCEPT`, then a bisection on measurements.
    """
    measured: Dict[int, float] = {}

    def k_for(goal: float) -> int:
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi) // 2
            if estimate(mid) >= goal:
                hi = mid
            else:
                lo = mid + 1
        return lo

    goal = target
    for _ in range(MAX_REHEARSALS):
        k = k_for(goal)
        if k in measured:
            break
        measured[k] = measure(k)
        if abs(measured[k] - target) <= ACCEPT:
            return k, measured[k]
        goal = min(max(goal + target - measured[k], 0.0), 1.0)
    below = [k for k, r in measured.items() if r < target]
    above = [k for k, r in measured.items() if r >= target]
    lo, hi = (max(below) if below else 0), (min(above) if above else n)
    while hi - lo > 1 and len(measured) < 2 * MAX_REHEARSALS:
        mid = (lo + hi) // 2
        measured[mid] = measure(mid)
        if abs(measured[mid] - target) <= ACCEPT:
            return mid, measured[mid]
        lo, hi = (mid, hi) if measured[mid] < target else (lo, mid)
    best = min(measured, key=lambda k: abs(measured[k] - target))
    return best, measured[best]

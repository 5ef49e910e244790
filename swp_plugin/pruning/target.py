"""Target-driven stripe selection (``StripePruner(..., macs_reduction=r)``): kill the least important stripes until
MACs or params drop by ``r``.

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

import warnings
from typing import TYPE_CHECKING, Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from ..utils import run_with_hooks

if TYPE_CHECKING:
    from .options import PrunerOptions
    from .rehearsal import Rehearsal
    from .skeletons import Skeletons

#: The reduction is accepted once within this distance of the target (the contract is 0.03).
ACCEPT = 0.01
MAX_REHEARSALS = 8


#: the stripe scores of target-driven pruning (``StripePruner(score=...)``)
SCORES = ("fs", "fs_bn")


def stripe_scores(skeletons: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                  alive: Sequence[torch.Tensor], gains: Sequence[torch.Tensor | None] | None = None,
                  raw: Sequence[torch.Tensor] | None = None) -> List[torch.Tensor]:
    """Per layer, FS-shaped importance of each alive stripe (``inf`` for dead ones), mean-normalised.
    ``gains``: per layer ``None`` or a multiplier broadcastable to the skeleton (see :func:`batchnorm_gains`);
    ``raw``: per layer scores of a stripe importance (the protocol of :mod:`.importance`) instead of
    ``|FS| * ||W_stripe||``."""
    scores = []
    for i, (fs, weight, live) in enumerate(zip(skeletons, weights, alive)):
        if raw is not None:
            score = raw[i].detach().float()
        else:
            score = fs.detach().float().abs() * weight.detach().float().norm(dim=1)  # (out, kh, kw) or (S,)
        if gains is not None and gains[i] is not None:
            score = score * gains[i].to(score)
        mean = score[live].mean() if live.any() else torch.tensor(1.0)
        score = score / (mean if mean > 0 else 1.0)
        scores.append(torch.where(live, score, torch.full_like(score, float("inf"))))
    return scores


def layer_scores(state: Skeletons, score: str = "fs", importance=None) -> List[torch.Tensor]:
    """The ranking of every layer's alive stripes (:func:`stripe_scores`): ``importance``'s scores (the stripe
    protocol) if given, else ``score`` (``'fs'`` or ``'fs_bn'``)."""
    layers = [state.layer(n) for n in state.names]
    fs = [state.skeleton(n).skeleton for n in state.names]
    weights = state.weights()
    raw = None
    if importance is not None:
        raw = []
        for name, layer, f, w in zip(state.names, layers, fs, weights):
            value = importance.stripe_scores(layer, f, w)
            if not isinstance(value, torch.Tensor) or value.shape != f.shape or not torch.isfinite(value).all() \
                    or bool((value < 0).any()):
                raise ValueError(f"{type(importance).__name__}.stripe_scores for '{name}' must return finite scores "
                                 f">= 0 of shape {tuple(f.shape)} (the skeleton's), got "
                                 f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
            raw.append(value)
    gains = batchnorm_gains(layers, state.fed_batchnorms()) if score == "fs_bn" else None
    return stripe_scores(fs, weights, state.alive(), gains, raw)


def round_kept(kills: List[torch.Tensor], scores: Sequence[torch.Tensor], round_to: int | None
               ) -> List[torch.Tensor]:
    """Adjust per-layer ``kills`` (FS-shaped bool) so that each layer keeps a multiple of ``round_to`` alive stripes:
    down to the multiple below (killing the next lowest-ranked), or, where that is 0, up to ``round_to`` (killing
    fewer). ``scores``: :func:`stripe_scores` (``inf`` = dead already)."""
    if not round_to or round_to == 1:
        return kills
    rounded = []
    for kill, score in zip(kills, scores):
        flat_kill, flat_score = kill.flatten().clone(), score.flatten().cpu()
        alive = torch.isfinite(flat_score)
        kept = int((alive & ~flat_kill).sum())
        want = kept - kept % round_to
        if want == 0:
            want = min(int(alive.sum()), round_to)
        if want < kept:  # kill more: the lowest-ranked survivors
            survivors = (alive & ~flat_kill).nonzero().flatten()
            order = survivors[torch.argsort(flat_score[survivors])]
            flat_kill[order[: kept - want]] = True
        elif want > kept:  # kill fewer: spare the highest-ranked of this selection
            chosen = (alive & flat_kill).nonzero().flatten()
            order = chosen[torch.argsort(flat_score[chosen], descending=True)]
            flat_kill[order[: want - kept]] = False
        rounded.append(flat_kill.view(kill.shape))
    return rounded


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


@torch.no_grad()
def output_positions(model: nn.Module, layers: List[nn.Module], example_inputs) -> List[int]:
    """Output positions ``H_out * W_out`` of each layer for one forward of the example inputs."""
    sizes: Dict[int, int] = {}

    def record(module, inputs, output) -> None:
        sizes.setdefault(id(module), output.shape[-2] * output.shape[-1])

    run_with_hooks(model, layers, record, example_inputs)
    return [sizes.get(id(m), 0) for m in layers]


def stripe_costs(layers: Sequence[nn.Module], metric: str, positions: Sequence[int] | None) -> List[float]:
    """Per layer, what one stripe costs: ``C_in / groups`` params, times its output positions for MACs."""
    return [layer.in_channels // getattr(layer, "groups", 1) * (positions[i] if metric == "macs" else 1)
            for i, layer in enumerate(layers)]


def reach_target(state: Skeletons, rehearsal: Rehearsal, options: PrunerOptions, goal: float,
                 dense: Tuple[float, int], positions: List[int] | None, units: List[torch.Tensor] | None) -> float:
    """Kill the least important alive stripes of ``state``'s layers so that the pruned model's metric (MACs or
    params, stripe indexes and channel cleanup included: every candidate is rehearsed) drops by ``goal`` relative
    to ``dense`` (the unpruned model's counts); returns the reduction reached. ``positions``: output positions per
    layer (MACs targets); ``units``: kill units (see ``StripePruner.kill_units``). Raises ``ValueError`` (nothing
    killed) if the target is out of reach."""
    metric = options.target[0]
    layers = [state.layer(n) for n in state.names]
    scores = layer_scores(state, options.score, options.importance)
    stripe_ranking = scores
    costs = stripe_costs(layers, metric, positions)
    if units is not None:  # coarser granularity: rank and kill groups of stripes
        if options.round_to not in (None, 1):
            raise ValueError("round_to rounds single stripes; this pruner kills groups of stripes (kill_units)")
        scores, sizes = unit_scores(scores, units)
        costs = [size * cost for size, cost in zip(sizes, costs)]
    order, flats, cost = ranked_candidates(scores, costs, options.max_pruning_ratio)
    total = dense[0 if metric == "macs" else 1]
    shapes = [s.shape for s in scores]

    def kills(k: int) -> List[torch.Tensor]:
        masks = kill_masks(shapes, order, flats, k)
        if units is not None:
            return [m[u.to(torch.long).cpu()] for m, u in zip(masks, units)]
        return round_kept(masks, stripe_ranking, options.round_to)

    def measure(k: int) -> float:
        return 1.0 - rehearsal.counts(kills(k))[0 if metric == "macs" else 1] / total

    start = measure(0)
    cumulative = torch.cat([torch.zeros(1), torch.cumsum(cost, 0)]) / total
    k, reached = search_kill_count(goal, lambda i: start + float(cumulative[i]), measure, len(order))
    if reached < goal - 0.03 and (reachable := measure(len(order))) < goal - 0.03:
        raise ValueError(
            f"{metric}_reduction target {goal:.3f} is unreachable: killing every stripe allowed by "
            f"max_pruning_ratio={options.max_pruning_ratio:g} gives {reachable:.3f} (ignored layers and "
            "non-conv layers keep the rest). Lower the target or raise max_pruning_ratio."
        )
    state.kill_masks(kills(k))
    if abs(reached - goal) > 0.03:
        warnings.warn(f"StripePruner: reached {metric}_reduction {reached:.3f} for a target of {goal:.3f} "
                      "(the closest the stripe granularity allows)", stacklevel=4)
    return reached

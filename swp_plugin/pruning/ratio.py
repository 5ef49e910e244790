"""Ratio-driven stripe selection (``StripePruner(..., pruning_ratio=p)``): torch-pruning's ``pruning_ratio`` with
the stripe meaning.

At step ``k`` a layer should have lost ``scheduler(ratio, iterative_steps)[k]`` of the stripes it had when the
pruner was built (``ratio`` from ``pruning_ratio_dict`` if a key holds the layer, else ``pruning_ratio``; capped by
``max_pruning_ratio``). Layers are ranked in *scopes*, as torch-pruning does:

* ``global_pruning=False`` (torch-pruning's default): each layer on its own;
* ``global_pruning=True``: one ranking of all stripes (layer-mean-normalised scores, :func:`.target.stripe_scores`)
  over the layers without a ``pruning_ratio_dict`` entry, and one per dict key (a tuple key: its modules share one);
* ``isomorphic=True``: one ranking per stripe shape (layer type, input channels, kernel size) instead of the
  global one.

The scope loses the lowest-ranked alive stripes until it keeps ``int(initial * (1 - ratio))``; every layer keeps at
least one stripe and at most ``max_pruning_ratio`` of its stripes go; ``round_to`` then rounds each layer's kept
stripes to a multiple (:func:`.target.round_kept`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Tuple

import torch
import torch.nn as nn

from .target import layer_scores, round_kept

if TYPE_CHECKING:
    from .options import PrunerOptions
    from .skeletons import Skeletons


def _dict_entry(layer: nn.Module, ratio_dict: Dict) -> Tuple[int, float] | None:
    """``(index of the last pruning_ratio_dict key holding layer, its ratio)``, else ``None``."""
    found = None
    for i, (key, ratio) in enumerate(ratio_dict.items()):
        modules = key if isinstance(key, tuple) else (key,)
        if any(layer is m or any(layer is sub for sub in m.modules()) for m in modules):
            found = (i, ratio)
    return found


def _signature(layer: nn.Module) -> str:
    return f"{type(layer).__name__}:{layer.in_channels}:{tuple(layer.kernel_size)}:{getattr(layer, 'groups', 1)}"


def scopes(state: Skeletons, options: PrunerOptions) -> Dict[str, Tuple[float, List[int]]]:
    """Ranking scope name -> (its ratio before scheduling, indexes of its layers in ``state.names``)."""
    found: Dict[str, Tuple[float, List[int]]] = {}
    for i, name in enumerate(state.names):
        layer = state.layer(name)
        entry = _dict_entry(layer, options.ratio_dict)
        if entry is not None:
            scope, ratio = (f"dict:{entry[0]}" if options.global_pruning else f"layer:{name}"), entry[1]
        elif options.isomorphic:
            scope, ratio = f"isomorphic:{_signature(layer)}", options.pruning_ratio
        elif options.global_pruning:
            scope, ratio = "global", options.pruning_ratio
        else:
            scope, ratio = f"layer:{name}", options.pruning_ratio
        found.setdefault(scope, (ratio, []))[1].append(i)
    return found


def ratio_kills(state: Skeletons, options: PrunerOptions, step: int, initial: Dict[str, int]) -> List[torch.Tensor]:
    """FS-shaped bool masks of the stripes step ``step`` (1-based) kills; ``initial``: conv name -> its stripes
    when the pruner was built."""
    scores = layer_scores(state, options.score, options.importance)
    kills = [torch.zeros(s.shape, dtype=torch.bool) for s in scores]
    for ratio, members in scopes(state, options).values():
        goal = min(float(options.scheduler(ratio, options.iterative_steps)[step]), options.max_pruning_ratio)
        candidates = []  # (score, layer index, flat index) of the stripes the caps allow to die
        for i in members:
            flat = scores[i].flatten().cpu()
            alive = torch.isfinite(flat)
            n_alive, n_initial = int(alive.sum()), initial.get(state.names[i], flat.numel())
            allowed = min(int(options.max_pruning_ratio * n_initial) - (n_initial - n_alive), n_alive - 1)
            if allowed <= 0:
                continue
            order = torch.argsort(flat.masked_fill(~alive, float("inf")))[:allowed]
            candidates += [(float(flat[j]), i, int(j)) for j in order]
        total_initial = sum(initial.get(state.names[i], scores[i].numel()) for i in members)
        total_alive = sum(int(torch.isfinite(scores[i]).sum()) for i in members)
        n_kill = total_alive - int(total_initial * (1 - goal))
        for _, i, j in sorted(candidates)[: max(n_kill, 0)]:
            kills[i].view(-1)[j] = True
    return round_kept(kills, scores, options.round_to)


@torch.no_grad()
def filter_kills(state: Skeletons, options: PrunerOptions, name: str, ratio_or_idxs) -> torch.Tensor:
    """The alive mask of conv ``name`` with every stripe of some filters dead (``manual_prune_width``): the
    filters ``ratio_or_idxs`` (indexes), or that fraction of its filters (a float), the lowest-ranked first."""
    layer, fs = state.layer(name), state.skeleton(name)
    filters = layer.out_channels
    if isinstance(ratio_or_idxs, float):
        if not 0.0 <= ratio_or_idxs < 1.0:
            raise ValueError(f"manual_prune_width: a ratio must be in [0, 1), got {ratio_or_idxs!r}")
        score = layer_scores(state, options.score, options.importance)[state.names.index(name)]
        score = score.masked_fill(~torch.isfinite(score), 0)
        per_filter = score.flatten(1).sum(1) if score.dim() > 1 else layer.per_filter(score)
        idxs = torch.argsort(per_filter.cpu())[: int(filters * ratio_or_idxs)].tolist()
    else:
        idxs = [int(i) for i in ratio_or_idxs]
    if any(not 0 <= i < filters for i in idxs) or len(set(idxs)) >= filters:
        raise ValueError(f"manual_prune_width: filter indexes must lie in [0, {filters}) and leave one filter of "
                         f"'{name}'")
    alive = fs.alive.clone()
    if alive.dim() > 1:
        alive[idxs] = False
    else:
        alive &= ~torch.isin(layer.stripe_out.to(alive.device), torch.tensor(idxs, device=alive.device))
    return alive

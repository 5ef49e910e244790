"""Pruners to compare SWP with, at other granularities (the granularity benchmark, ``benchmarks/granularity.py``).

* :class:`ShapeWisePruner`: shape-wise pruning (Lebedev & Lempitsky 2016, Wen et al. 2016) done with the Filter
  Skeleton, as in the paper's Fig. 8: one skeleton per layer shared by all its filters, so a kernel position is
  kept or pruned in every filter of the layer at once. Same L1 training, same targets, same exact ``step()`` as
  :class:`~swp_plugin.StripePruner` (whose subclass it is); the pruned layers are ``StripeConv2d`` with the same
  kept positions in every filter.
* :class:`StripeGroupLasso`: group lasso on the stripes of the conv weights (the paper's Fig. 7: FS vs group
  lasso), ``strength * sum_stripes ||W[o, :, i, j]||_2``, as a gradient term; prune afterwards with
  ``StripePruner(model, x, macs_reduction=r)`` on the trained model: untrained skeletons (FS = 1) rank the stripes
  by their weight norm (layer-normalised), the group lasso criterion.
* :func:`prune_channels_to_macs`: a torch-pruning channel pruner (L1 filter pruning, Network Slimming) at the
  pruning ratio that removes a given fraction of the MACs, found by bisection on copies.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch_pruning as tp

from ..layers import StripeConv2d
from ..measure import count_ops_and_params
from ..pruning import StripePruner


def _pointwise(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, StripeConv2d)) and tuple(module.kernel_size) == (1, 1)


def pointwise_convs(model: nn.Module) -> List[nn.Module]:
    """The 1x1 convs of ``model`` (e.g. ResNet shortcuts), which the reference SWP code leaves unpruned."""
    return [m for m in model.modules() if _pointwise(m)]


class ShapeWisePruner(StripePruner):
    """Shape-wise pruning with a Filter Skeleton shared by the filters of a layer (the paper's Fig. 8 baseline).

    Built like :class:`~swp_plugin.StripePruner` (any of its options; a ``macs_reduction`` / ``params_reduction``
    target or a ``threshold``). The skeleton keeps the ``(out, kh, kw)`` shape of SWP's, but its values are tied
    across filters: ``regularize()`` replaces the gradient of each entry by the sum over the layer's filters (the
    gradient of one shared ``(kh, kw)`` parameter; FS starts at 1 and the optimizer then moves every filter's
    copy identically), then applies SWP's L1 term and threshold, which therefore kill a position in all filters.
    With a target, ``step()`` ranks kernel positions (sum of their stripes' ``|FS| * ||W||`` scores, normalised by
    the layer's mean) and kills whole positions.

    1x1 convs get no skeleton and stay dense (their single position is the whole layer; ``prune_pointwise=True``
    gives them one, i.e. one gate for the whole layer).
    """

    def __init__(self, model: nn.Module, example_inputs, ignored_layers: Sequence[nn.Module] | None = None,
                 prune_pointwise: bool = False, **kwargs) -> None:
        ignored = list(ignored_layers or ())
        if not prune_pointwise:
            ignored += pointwise_convs(model)
        super().__init__(model, example_inputs, ignored_layers=ignored, **kwargs)

    @torch.no_grad()
    def tie_gradients(self) -> None:
        """Each FS entry's gradient becomes the sum over the layer's filters (same kernel position)."""
        for name, fs in self.skeletons.items():
            if fs.grad is None:
                continue
            if fs.dim() == 1:  # a StripeConv2d (second round): tie the stripes of each kernel position
                pos = self.module(name).stripe_pos.to(fs.device)
                kh, kw = self.module(name).kernel_size
                total = torch.zeros(kh * kw, dtype=fs.grad.dtype, device=fs.device).index_add_(0, pos, fs.grad)
                fs.grad.copy_(total[pos])
            else:
                fs.grad.copy_(fs.grad.sum(0, keepdim=True).expand_as(fs.grad))

    def regularize(self, model: nn.Module | None = None, reg: float | None = None) -> None:
        """Tie the gradients across filters, then SWP's ``regularize`` (L1 term, threshold, channel masks)."""
        self.tie_gradients()
        super().regularize(model, reg)

    def kill_units(self) -> List[torch.Tensor]:
        """One unit per kernel position of a layer (all its filters' stripes there)."""
        units = []
        for name in self.names:
            layer = self.module(name)
            fs = self.skeleton(name).skeleton
            if fs.dim() == 1:
                units.append(layer.stripe_pos.detach().cpu())
            else:
                out, kh, kw = fs.shape
                units.append(torch.arange(kh * kw).view(1, kh, kw).expand(out, kh, kw))
        return units


def _stripe_convs(model: nn.Module, ignored: Iterable[nn.Module]) -> List[Tuple[str, nn.Conv2d]]:
    ignored_ids = {id(m) for layer in ignored for m in layer.modules()}
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups == 1 and id(m) not in ignored_ids]


class StripeGroupLasso:
    """Group lasso on the stripes of the conv weights: ``strength * sum over stripes ||W[o, :, i, j]||_2``.

    Call :meth:`regularize` after ``loss.backward()`` and before ``optimizer.step()`` (it adds the penalty's
    gradient ``strength * W_stripe / ||W_stripe||`` to the weights' gradients; 0 for an all-zero stripe), like
    ``pruner.regularize``. Every ``groups=1`` conv not in ``ignored_layers`` is regularised (the convs that
    :class:`~swp_plugin.StripePruner` would give a skeleton).
    """

    def __init__(self, model: nn.Module, strength: float, ignored_layers: Sequence[nn.Module] | None = None) -> None:
        self.strength = float(strength)
        self.layers = _stripe_convs(model, ignored_layers or ())
        if not self.layers:
            raise ValueError("StripeGroupLasso: the model has no conv to regularise")

    @torch.no_grad()
    def stripe_norms(self) -> Dict[str, torch.Tensor]:
        """Conv name -> ``(out, kh, kw)`` L2 norms of its stripes."""
        return {name: conv.weight.norm(dim=1) for name, conv in self.layers}

    @torch.no_grad()
    def mean_stripe_norm(self) -> float:
        norms = torch.cat([n.flatten() for n in self.stripe_norms().values()])
        return float(norms.mean())

    @torch.no_grad()
    def penalty(self) -> float:
        return self.strength * float(sum(n.sum() for n in self.stripe_norms().values()))

    @torch.no_grad()
    def regularize(self, model: nn.Module | None = None) -> None:
        for _, conv in self.layers:
            weight = conv.weight
            if weight.grad is None:
                continue
            norms = weight.norm(dim=1, keepdim=True)
            weight.grad.add_(self.strength * weight / torch.where(norms > 0, norms, torch.ones_like(norms)))


def l1_filter_pruner(model: nn.Module, example_inputs, pruning_ratio: float,
                     ignored_layers: Sequence[nn.Module] = ()) -> tp.pruner.BasePruner:
    """L1-norm filter pruning (Li et al. 2017) with torch-pruning: the same fraction of every layer's filters
    (its coupled group, e.g. a ResNet stage's residual channels, counted once), lowest L1 norm first."""
    return tp.pruner.BasePruner(model, example_inputs, importance=tp.importance.MagnitudeImportance(p=1),
                                pruning_ratio=pruning_ratio, ignored_layers=list(ignored_layers))


def slimming_pruner(model: nn.Module, example_inputs, pruning_ratio: float = 0.5, reg: float = 1e-5,
                    ignored_layers: Sequence[nn.Module] = (), max_pruning_ratio: float = 0.9
                    ) -> tp.pruner.BNScalePruner:
    """Network Slimming (Liu et al. 2017) with torch-pruning: ``regularize`` (L1 on BatchNorm scales) while
    training, then a global ranking of the channels by ``|gamma|``, at most ``max_pruning_ratio`` of a layer."""
    return tp.pruner.BNScalePruner(model, example_inputs, importance=tp.importance.BNScaleImportance(normalizer=None),
                                   reg=reg, global_pruning=True, pruning_ratio=pruning_ratio,
                                   max_pruning_ratio=max_pruning_ratio, ignored_layers=list(ignored_layers))


def prune_channels_to_macs(model: nn.Module, example_inputs, make_pruner: Callable[[nn.Module, float], object],
                           macs_reduction: float, max_ratio: float = 0.95, tolerance: float = 0.01,
                           max_trials: int = 14) -> Tuple[float, float]:
    """Prune ``model`` in place with ``make_pruner(model, ratio).step()``, at the ratio (found by bisection on
    copies) whose pruned model has ``macs_reduction`` fewer MACs than ``model`` (within ``tolerance`` if the
    channel granularity allows). Returns ``(ratio, reached reduction)``."""
    dense = count_ops_and_params(model, example_inputs)[0]

    def reduction(ratio: float, target: nn.Module | None = None) -> float:
        trial = copy.deepcopy(model) if target is None else target
        make_pruner(trial, ratio).step()
        return 1.0 - count_ops_and_params(trial, example_inputs)[0] / dense

    lo, hi = 0.0, max_ratio
    tried: Dict[float, float] = {}
    for _ in range(max_trials):
        mid = (lo + hi) / 2
        tried[mid] = reduction(mid)
        if abs(tried[mid] - macs_reduction) <= tolerance:
            break
        lo, hi = (mid, hi) if tried[mid] < macs_reduction else (lo, mid)
    best = min(tried, key=lambda r: abs(tried[r] - macs_reduction))
    return best, reduction(best, model)

"""Importance of stripes (for ``StripePruner``) and of channels (for torch-pruning's channel pruners).

The stripe-importance protocol (``StripePruner(importance=...)``): an object with

    ``stripe_scores(layer, skeleton, weight) -> Tensor``

``layer`` is the conv (``nn.Conv2d`` or ``StripeConv2d``), ``skeleton`` its Filter Skeleton values (``(out, kh, kw)``,
or ``(S,)`` for a ``StripeConv2d``), ``weight`` the weight the skeleton multiplies (``(out, C_in, kh, kw)`` or
``(S, C_in)``). It returns finite scores >= 0 shaped like ``skeleton``, higher = more important. ``StripePruner``
divides them by the layer's mean (layers compete on relative terms), then ranks; dead stripes are never
ranked. :class:`StripeImportance` is one (``|FS|^p * ||W_stripe||_2``, the default ranking).

torch-pruning's channel importances score groups, not stripes. Two have a stripe reading and are translated by
:func:`as_stripe_importance`, so a torch-pruning call site runs with only the pruner changed:
``tp.importance.GroupMagnitudeImportance(p)`` / ``MagnitudeImportance(p)`` -> :class:`StripeMagnitude` (the
p-norm of each stripe of the effective weight ``W * FS``) and ``tp.importance.RandomImportance`` ->
:class:`StripeRandom`. The others (Taylor, Hessian, BN scale, LAMP, FPGM, ...) are refused with this recipe.
"""

from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch_pruning as tp
from torch.nn.utils import parametrize

from ..layers.stripe_conv import StripeConv2d
from ..skeleton.parametrizations import FilterSkeleton


def _attached_skeleton(layer: nn.Module) -> torch.Tensor | None:
    if parametrize.is_parametrized(layer, "weight"):
        for p in layer.parametrizations["weight"]:
            if isinstance(p, FilterSkeleton):
                return p.skeleton * p.alive
    return None


def filter_scores(layer: nn.Module, skeleton: torch.Tensor, p: int = 1) -> torch.Tensor:
    """Per output channel ``sum |FS|^p`` over the filter's stripes: ``(out,)``."""
    values = skeleton.detach().abs().float().pow(p)
    if isinstance(layer, StripeConv2d):
        return layer.per_filter(values)
    return values.flatten(1).sum(dim=1)


@runtime_checkable
class StripeScores(Protocol):
    """The stripe-importance protocol of ``StripePruner(importance=...)`` (see the module docstring)."""

    def stripe_scores(self, layer: nn.Module, skeleton: torch.Tensor, weight: torch.Tensor) -> torch.Tensor: ...


class StripeImportance(tp.importance.GroupMagnitudeImportance):
    """Scores stripes for ``StripePruner(importance=...)`` (:meth:`stripe_scores`), and the channels of a
    torch-pruning group by the Filter Skeletons of the convs producing them.

    The score of a channel is ``sum |FS|^p`` over the stripes of its filter, reduced over the group's
    convs with ``group_reduction`` (torch-pruning's reductions). Skeletons are read from the convs'
    parametrizations while attached, else from ``skeletons`` (``StripePruner.skeletons``: qualified conv
    name -> FS), so the scores survive :func:`swp_plugin.detach_skeletons`. A group without any skeleton
    gets ``None`` (torch-pruning then leaves it alone).

    Example::

        imp = StripeImportance(pruner.skeletons)
        swp_plugin.detach_skeletons(model)            # FS merged into the weights
        tp.pruner.BasePruner(model, x, importance=imp, pruning_ratio=0.3, global_pruning=True).step()
    """

    def __init__(
        self,
        skeletons: Mapping[str, torch.Tensor] | None = None,
        p: int = 1,
        group_reduction: str = "mean",
        normalizer: str | None = None,
    ) -> None:
        super().__init__(p=p, group_reduction=group_reduction, normalizer=normalizer)
        self.skeletons = skeletons

    def _skeleton_of(self, layer: nn.Module, group) -> torch.Tensor | None:
        fs = _attached_skeleton(layer)
        if fs is None and self.skeletons is not None:
            fs = self.skeletons.get(group._DG._module2name.get(layer, ""))
        return fs

    @torch.no_grad()
    def stripe_scores(self, layer: nn.Module, skeleton: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``|FS|^p * ||W_stripe||_2`` per stripe, shaped like ``skeleton`` (the stripe-importance protocol)."""
        return skeleton.detach().float().abs().pow(self.p) * weight.detach().float().norm(dim=1)

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            if not group._DG.is_out_channel_pruning_fn(dep.handler):
                continue
            fs = self._skeleton_of(dep.layer, group)
            if fs is None:
                continue
            scores = filter_scores(dep.layer, fs, self.p)
            group_imp.append(scores[torch.as_tensor(list(idxs), dtype=torch.long, device=scores.device)])
            group_idxs.append(group[i].root_idxs)
        if not group_imp:
            return None
        return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)


class StripeMagnitude:
    """torch-pruning's magnitude importance read on stripes: ``|FS| * ||W_stripe||_p`` (the p-norm of the stripe of
    the effective weight ``W * FS``), shaped like the skeleton."""

    def __init__(self, p: float = 2) -> None:
        self.p = p

    @torch.no_grad()
    def stripe_scores(self, layer: nn.Module, skeleton: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return skeleton.detach().float().abs() * weight.detach().float().norm(p=self.p, dim=1)


class StripeRandom:
    """torch-pruning's random importance read on stripes: uniform random scores (a baseline)."""

    @torch.no_grad()
    def stripe_scores(self, layer: nn.Module, skeleton: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.rand(skeleton.shape, device=skeleton.device)


def as_stripe_importance(importance) -> StripeScores | None:
    """``importance`` if it scores stripes; the stripe reading of torch-pruning's magnitude and random importances
    (see the module docstring); ``None`` for an importance that has none."""
    if callable(getattr(importance, "stripe_scores", None)):
        return importance
    if type(importance) in (tp.importance.GroupMagnitudeImportance, tp.importance.MagnitudeImportance):
        return StripeMagnitude(importance.p)
    if type(importance) is tp.importance.RandomImportance:
        return StripeRandom()
    return None

"""The one owner of a ``StripePruner``'s skeleton state: which convs carry a Filter Skeleton, the channel masks a
dead filter sets, and every read or write of them (kill, merge, sparsity, checks).

``StripePruner`` holds one :class:`Skeletons` per round; the rehearsal and the target search get it (or a copy's
modules) through this interface and never touch parametrizations themselves.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

import torch
import torch.nn as nn
import torch_pruning as tp

from ..skeleton import attach_channel_mask, attach_skeletons, detach_skeletons, filter_alive
from ..skeleton.attach import skeleton_input, skeleton_of
from ..skeleton.parametrizations import FilterSkeleton
from .graph import fed_norms


class Skeletons:
    """The Filter Skeletons of one pruning round of ``model``.

    Attributes:
        names: qualified names of the convs with a skeleton (the order of every per-layer list).
        skipped: qualified conv name -> why it got no skeleton.
        mask_targets: conv name -> ``[(module name, tensor name)]`` masked when one of its filters dies.
    """

    def __init__(self, model: nn.Module, ignored_layers: Sequence[nn.Module], graph: tp.DependencyGraph | None
                 ) -> None:
        fs_modules, self.skipped = attach_skeletons(model, ignored_layers)
        if not fs_modules:
            raise ValueError("StripePruner found no eligible conv in the model (every nn.Conv2d is ignored or "
                             f"excluded: {self.skipped or 'the model has none'}); nothing to prune.")
        self.model = model
        self.names: List[str] = list(fs_modules)
        self.modules: Dict[str, nn.Module] = dict(model.named_modules())
        module_names = {m: n for n, m in self.modules.items()}
        self.mask_targets: Dict[str, List[Tuple[str, str]]] = {}
        for name in self.names:
            norms = fed_norms(graph, self.modules[name]) if graph is not None else []
            targets = [(module_names[n], t) for n in norms for t in ("weight", "bias")]
            if getattr(self.modules[name], "bias", None) is not None:
                targets.append((name, "bias"))
            for module_name, tensor_name in targets:
                attach_channel_mask(self.modules[module_name], tensor_name)
            self.mask_targets[name] = targets

    # ------------------------------------------------------------------ reads
    def layer(self, name: str, modules: Mapping[str, nn.Module] | None = None) -> nn.Module:
        return (modules or self.modules)[name]

    def skeleton(self, name: str, modules: Mapping[str, nn.Module] | None = None) -> FilterSkeleton:
        """The Filter Skeleton parametrization of conv ``name`` (in ``modules``, a copy's, if given)."""
        return skeleton_of(self.layer(name, modules))

    def values(self) -> Dict[str, nn.Parameter]:
        return {name: self.skeleton(name).skeleton for name in self.names}

    def weights(self) -> List[torch.Tensor]:
        """Per layer, the weight its skeleton multiplies: ``(out, C_in, kh, kw)`` or ``(S, C_in)``."""
        return [skeleton_input(self.modules[name]) for name in self.names]

    def alive(self) -> List[torch.Tensor]:
        return [self.skeleton(name).alive for name in self.names]

    def sparsity(self) -> float:
        """Fraction of stripes that are dead over all layers."""
        masks = self.alive()
        return sum(int((~m).sum()) for m in masks) / max(1, sum(m.numel() for m in masks))

    def fed_batchnorms(self) -> List[nn.Module | None]:
        """Per layer, the one BatchNorm its filters feed (the one a dead filter masks), else ``None``."""
        norms = [[self.modules[m] for m, t in self.mask_targets[n] if t == "weight"] for n in self.names]
        return [found[0] if len(found) == 1 else None for found in norms]

    # ------------------------------------------------------------------ writes
    @torch.no_grad()
    def kill(self, name: str, alive: torch.Tensor, modules: Mapping[str, nn.Module] | None = None,
             mask_channels: bool = True) -> None:
        """Mark the stripes of ``name`` outside ``alive`` dead (in ``modules``, a copy's, if given); with
        ``mask_channels``, also zero the bias and norm channels of the filters left without a stripe."""
        modules = modules or self.modules
        fs = self.skeleton(name, modules)
        fs.alive.copy_(alive)
        fs.skeleton.mul_(alive)
        if fs.skeleton.grad is not None:
            fs.skeleton.grad.mul_(alive)
        if not mask_channels:
            return
        channels = filter_alive(modules[name], alive)
        for module_name, tensor_name in self.mask_targets[name]:
            parametrization = modules[module_name].parametrizations[tensor_name]
            parametrization[0].mask.copy_(channels)
            parametrization.original.mul_(channels)
            if parametrization.original.grad is not None:
                parametrization.original.grad.mul_(channels)

    def kill_masks(self, kills: Sequence[torch.Tensor], modules: Mapping[str, nn.Module] | None = None) -> None:
        """Kill ``kills`` (FS-shaped bool masks, one per layer) on top of what is dead."""
        for name, kill in zip(self.names, kills):
            alive = self.skeleton(name, modules).alive
            self.kill(name, alive & ~kill.to(alive.device), modules)

    @torch.no_grad()
    def merge(self, model: nn.Module) -> None:
        """The merge phase on ``model`` (this round's model or a copy of it): prune what was killed (and stripes
        whose FS is exactly 0), bake the skeletons into the weights, remove the parametrizations.

        A stripe that the very last optimizer step pushed under the threshold still computes something and is
        kept; a filter whose FS values are all exactly 0 but were never killed keeps its bias / norm channels:
        they still compute. So merging never changes the function."""
        modules = dict(model.named_modules())
        for name in self.names:
            fs = self.skeleton(name, modules)
            self.kill(name, fs.alive & fs.skeleton.ne(0), modules, mask_channels=False)
        detach_skeletons(model, merge=True)

    # ------------------------------------------------------------------ checks
    def check_attached(self) -> None:
        """Every skeleton conv is still in the model, with its Filter Skeleton."""
        for name in self.names:
            layer = self.modules[name]
            try:
                in_model = self.model.get_submodule(name) is layer
            except AttributeError:
                in_model = False
            if not in_model or not any(isinstance(p, FilterSkeleton) for p in getattr(
                    getattr(layer, "parametrizations", {}), "weight", [])):
                raise RuntimeError(f"the Filter Skeleton of '{name}' is gone (the conv was replaced or its "
                                   "parametrization removed after the StripePruner was built); build a new "
                                   "StripePruner for this model.")

    def check_finite(self) -> None:
        """``ValueError`` naming the first skeleton holding NaN/Inf."""
        for name in self.names:
            if not torch.isfinite(self.skeleton(name).skeleton).all():
                raise ValueError(f"Filter Skeleton of '{name}' holds NaN/Inf; fix training (lower lr/sr) first")

"""Building blocks for continual pruning: a channel-pruning first stage with torch-pruning, then SWP.

* :func:`classifier_of`: the head to leave out of pruning (``ignored_layers``);
* :class:`BNTaylorImportance`: Gate Decorator's score for BatchNorm gates, ``|gamma * dL/dgamma|`` summed
  over batches, as a torch-pruning importance (global, iterative pruning with ``tp.pruner.BasePruner``);
* :func:`load_pruned_checkpoint`: an already pruned net, a ``swp_plugin.save`` file (or, trusted explicitly, a
  whole-model ``torch.save(model)`` pickle);
* :func:`sr_for_push`: the L1 strength that moves a parameter by ``push`` over a given SGD schedule;
* :func:`restore_filter_norms`: after ``StripePruner.step()``, scale shrunken filters back up (exactly, through
  the BatchNorm statistics) so that fine-tuning at an ordinary learning rate works.

The pipeline itself is ``examples/continual_prune.py``.
"""

from __future__ import annotations

import os
from typing import Dict, Mapping, Sequence, Tuple

import torch
import torch.nn as nn
import torch_pruning as tp

from ..layers import StripeConv2d
from ..models import create_model
from ..persistence import CheckpointError, PickledCheckpointError, load, model_spec, read
from ..pruning import customized_pruners
from ..pruning.graph import build_graph, norm_after
from .training import lr_sum

_BN = nn.modules.batchnorm._BatchNorm


def classifier_of(model: nn.Module) -> nn.Module | None:
    """The classification head: timm's ``get_classifier()``, else ``fc`` / ``classifier`` / ``head`` when it
    is a module with parameters, else the last ``nn.Linear``; ``None`` if there is none."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return head
    for name in ("fc", "classifier", "head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


class BNTaylorImportance(tp.importance.GroupTaylorImportance):
    """Taylor importance of BatchNorm gates (Gate Decorator, You et al. 2019): ``sum_batches |gamma * dL/dgamma|``.

    Call :meth:`accumulate` after each ``loss.backward()`` (e.g. as the training loop's ``after_backward``),
    prune with a ``tp.pruner.BasePruner(..., importance=this, global_pruning=True, iterative_steps=K)``,
    then :meth:`reset` (channel indices change when a layer is pruned). A group's score is the
    ``group_reduction`` (default mean) over its BatchNorms, left unnormalised so that a global ranking
    compares raw Taylor scores across layers, as Gate Decorator does.

    torch-pruning 1.6.1's ``GroupTaylorImportance`` skips BatchNorm layers (its BN branch tests for
    ``prune_groupnorm_out_channels``), so a BN-only Taylor score needs this subclass.
    """

    def __init__(self, group_reduction: str = "mean", normalizer: str | None = None) -> None:
        super().__init__(group_reduction=group_reduction, normalizer=normalizer, target_types=[_BN])
        self.scores: Dict[nn.Module, torch.Tensor] = {}
        self.batches = 0

    @torch.no_grad()
    def accumulate(self, model: nn.Module) -> None:
        """Add ``|gamma * grad|`` of every affine BatchNorm with a gradient (call after backward)."""
        for m in model.modules():
            if isinstance(m, _BN) and m.affine and m.weight.grad is not None:
                score = (m.weight.detach() * m.weight.grad).abs().float()
                previous = self.scores.get(m)
                self.scores[m] = score if previous is None or previous.shape != score.shape else previous + score
        self.batches += 1

    def reset(self) -> None:
        self.scores.clear()
        self.batches = 0

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if dep.handler != tp.prune_batchnorm_out_channels or layer not in self.scores:
                continue
            group_imp.append(self.scores[layer][list(idxs)])
            group_idxs.append(group[i].root_idxs)
        if not group_imp:
            return None
        return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)


def saved_model(path: str | os.PathLike) -> Tuple[nn.Module, Dict] | None:
    """``(model, metadata)`` of a ``swp_plugin.save`` file whose metadata names its architecture (as
    ``examples/continual_prune.py`` writes them: ``architecture``, ``num_classes``, ``input_size``,
    ``model_kwargs``, checked by :func:`swp_plugin.persistence.model_spec`), rebuilt with :func:`swp_plugin.load`
    on a fresh model; ``None`` for a pickled file (a whole-module ``torch.save``). Any other file: ``ValueError``."""
    try:
        checkpoint = read(path)
    except PickledCheckpointError:
        return None
    except CheckpointError as err:
        raise ValueError(f"{err}. A pruned network's architecture is not in a state_dict: save the whole model "
                         "with swp_plugin.save(model, path, architecture=...) or torch.save(model)") from None
    meta = checkpoint.get("metadata", {})
    spec = model_spec(path, meta)
    fresh = create_model(spec["architecture"], num_classes=spec["num_classes"], in_chans=spec["input_size"][0],
                         **spec["model_kwargs"])
    return load(path, fresh), {**meta, **spec}


def load_pruned_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                           trust_pickle: bool = False) -> nn.Module:
    """An already pruned model: a ``swp_plugin.save`` file with its architecture in the metadata (safe,
    ``weights_only``), or - only with ``trust_pickle=True`` - a whole model saved with ``torch.save(model)`` (e.g.
    by DCP's or Gate Decorator's code), loaded with ``weights_only=False``, which runs code from the file.

    A dict holding the model under ``model`` / ``net`` / ``module`` is accepted; a bare ``state_dict`` is
    not (a pruned network's architecture is not in its state dict).
    """
    saved = saved_model(path)
    if saved is not None:
        return saved[0].to(device)
    if not trust_pickle:
        raise ValueError(f"{path}: holds pickled Python objects (a whole-model torch.save(model)?); unpickling it runs "
                         "code from the file. Only for a file you trust: load_pruned_checkpoint(path, "
                         "trust_pickle=True) (examples/continual_prune.py: --trust-pickle)")
    obj = torch.load(os.fspath(path), map_location=device, weights_only=False)
    if isinstance(obj, dict):
        modules = [obj[k] for k in ("model", "net", "module") if isinstance(obj.get(k), nn.Module)]
        if modules:
            obj = modules[0]
        else:
            raise ValueError(
                f"{path}: holds a dict with keys {sorted(map(str, obj))[:8]}, not a model. A pruned network's "
                "architecture is not in its state_dict: save the whole model with torch.save(model)."
            )
    if not isinstance(obj, nn.Module):
        raise ValueError(f"{path}: expected a whole nn.Module saved with torch.save(model), got {type(obj).__name__}")
    return obj.to(device)


def sr_for_push(push: float, lr: float, total_steps: int, schedule: str = "cosine", momentum: float = 0.9,
                milestones: Sequence[float] = (0.5, 0.75)) -> float:
    """L1 strength ``sr`` such that ``sr * sign`` moves a parameter by ``push`` over the SGD schedule
    (``sr * lr_sum / (1 - momentum) = push``).

    With BatchNorm after a conv, a filter's scale does not change the loss, so SWP's L1 term shrinks all
    Filter Skeleton values of a layer at this common rate and the loss only redistributes between stripes;
    starting from FS = 1, a push a little under 1 lets the stripes the loss does not hold up reach the
    threshold, while a push well over 1 kills whole layers. Expressing ``sr`` as a push makes it independent
    of the number of steps and of the learning rate.
    """
    total = lr_sum(lr, total_steps, schedule, milestones)
    return push * (1 - momentum) / max(total, 1e-12)


def _filter_norms(layer: nn.Module) -> torch.Tensor:
    """L2 norm of each output filter of a conv or ``StripeConv2d``."""
    if isinstance(layer, StripeConv2d):
        squares = layer.weight.detach().pow(2).sum(1)
        return layer.per_filter(squares).sqrt()
    return layer.weight.detach().flatten(1).norm(dim=1)


def filter_norm_rms(model: nn.Module) -> Dict[str, float]:
    """Qualified name -> RMS filter norm of every conv / ``StripeConv2d`` (record before SWP training, for
    :func:`restore_filter_norms`)."""
    return {name: float(_filter_norms(m).pow(2).mean().sqrt()) for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, StripeConv2d)) and m.weight.numel()}


def feeding_batchnorms(model: nn.Module, example_inputs) -> Dict[str, nn.Module]:
    """Qualified name of each conv / ``StripeConv2d`` whose output goes only into a BatchNorm (with running
    statistics) -> that BatchNorm (:func:`swp_plugin.pruning.graph.norm_after` on torch-pruning's DependencyGraph)."""
    graph = build_graph(model, example_inputs, {"customized_pruners": customized_pruners()})
    names = {m: n for n, m in model.named_modules()}
    return {names[layer]: bn for layer, bn in norm_after(graph).items() if layer in names}


@torch.no_grad()
def restore_filter_norms(model: nn.Module, example_inputs, target: Mapping[str, float]) -> Dict[str, float]:
    """Scale up each filter of a conv / ``StripeConv2d`` whose output feeds only a BatchNorm to the RMS norm
    ``target[name]``, compensating in the BatchNorm's running statistics: exact in eval mode.

    Why: merging the Filter Skeletons into the weights at ``step()`` leaves filters whose scale the L1 push
    shrank (FS values far under 1). BatchNorm hides the scale from the loss, but SGD's effective step on a
    scale-invariant filter grows like ``lr / |w|^2``, so fine-tuning at an ordinary learning rate wrecks the
    pruned model. Filters are only scaled up (factor >= 1). Returns name -> mean factor applied.
    """
    modules = dict(model.named_modules())
    factors: Dict[str, float] = {}
    for name, bn in feeding_batchnorms(model, example_inputs).items():
        if name not in target:
            continue
        layer = modules[name]
        norms = _filter_norms(layer)
        scale = torch.where(norms > 0, target[name] / norms.clamp_min(1e-12), torch.ones_like(norms)).clamp_min(1.0)
        if isinstance(layer, StripeConv2d):
            layer.weight.mul_(scale[layer.stripe_out].unsqueeze(1).to(layer.weight.dtype))
        else:
            layer.weight.mul_(scale.view(-1, *[1] * (layer.weight.dim() - 1)).to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.mul_(scale.to(layer.bias.dtype))
        _scale_bn_input(bn, scale)
        factors[name] = float(scale.mean())
    return factors


@torch.no_grad()
def renormalize_skeletons(
    pruner, norms: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Divide each filter's Filter Skeleton by its largest value, for the convs that feed a BatchNorm
    (``norms``: conv name -> BatchNorm, from :func:`feeding_batchnorms`), compensating the BatchNorm's
    running statistics (and the FS's SGD momentum buffer). The conv's output channel is only rescaled, which
    the BatchNorm undoes: in train mode exactly (batch statistics, up to ``eps``), in eval mode through the
    compensated running statistics. Call after every optimizer step of SWP training
    (``fit(..., after_step=...)``).

    Why: a filter's scale does not change the loss when a BatchNorm follows, so SWP's L1 term shrinks all of a
    filter's FS values at one common rate; under a short schedule that makes ``sr`` a cliff (a few percent
    below it nothing dies, a few percent above it whole layers die) and, as FS shrinks, SGD's effective step
    on it grows like ``1 / FS^2``. Renormalised, each filter's strongest stripe stays at 1 and the L1 term
    widens the gap of the others to it by about ``exp(push)`` over training, so the threshold acts on a
    stripe's strength relative to its filter and the amount of pruning changes smoothly with ``sr``. Whole
    filters do not die in SWP then (removing channels is the first stage's job). Not in the paper.
    """
    modules = dict(pruner.model.named_modules())
    for name, fs in pruner.skeletons.items():
        bn = norms.get(name)
        if bn is None:
            continue
        layer = modules[name]
        if fs.dim() == 1:  # a StripeConv2d in a second round: one FS value per kept stripe
            peak = layer.per_filter(fs.abs(), "amax")
            per_stripe = peak[layer.stripe_out]
        else:
            peak = fs.abs().flatten(1).amax(1)
            per_stripe = peak.view(-1, *[1] * (fs.dim() - 1))
        peak = torch.where(peak > 0, peak, torch.ones_like(peak))
        per_stripe = torch.where(per_stripe > 0, per_stripe, torch.ones_like(per_stripe))
        fs.div_(per_stripe)
        if optimizer is not None:
            buffer = optimizer.state.get(fs, {}).get("momentum_buffer")
            if buffer is not None:
                buffer.div_(per_stripe)
        _scale_bn_input(bn, 1.0 / peak)


def _scale_bn_input(bn: nn.Module, scale: torch.Tensor) -> None:
    """Running statistics of ``bn`` for an input whose channels are multiplied by ``scale`` (eval mode exact)."""
    scale = scale.to(bn.running_mean.dtype)
    bn.running_mean.mul_(scale)
    bn.running_var.copy_((scale.pow(2) * (bn.running_var + bn.eps) - bn.eps).clamp_min(0))

"""Discrimination-aware Channel Pruning (DCP; Zhuang et al., NeurIPS 2018) on torch-pruning.

DCP removes input channels of a network's convolutions, stage by stage. ``P`` auxiliary classifiers
(:class:`AuxHead`: BatchNorm, ReLU, global average pooling, linear) sit at evenly spaced layers and split the
prunable layers into ``P + 1`` stages. For stage ``p``:

1. the network and head ``p`` are fine-tuned on ``L_f + L_S^p`` (final and auxiliary cross-entropy;
   :meth:`DCPPruner.aux_model` with :func:`aux_criterion`; the last stage has ``L_f`` only);
2. for each layer of the stage, in forward order (:meth:`DCPPruner.select_channels`), greedy channel selection
   on ``L = L_M + lam * L_S^p`` with ``L_M = ||conv(X; W_A) - F||^2 / ||F||^2`` (``F``: the baseline's output of
   the layer, ``X``: the pruned network's input of it, ``W_A``: the weights of the selected input channels,
   the others zero; ``L_f`` stands in for ``L_S`` in the last stage): starting from no channel, add the ``k``
   channels with the largest ``||dL/dW[:, c]||_F``, refine ``W_A`` with a few optimizer steps, until the layer
   keeps ``1 - pruning_ratio`` of its channels;
3. the unselected channels go through torch-pruning: their DependencyGraph group (the producing conv's output
   channels, its BatchNorm, the layer's input channels) is pruned; their weights are zero, so this is exact
   (checked on the example inputs).

A final fine-tune on ``L_f`` follows (the caller's)::

    pruner = DCPPruner(model, example_inputs, pruning_ratio=0.3, num_aux=2, ignored_layers=[model.classifier])
    for p in range(pruner.num_stages):
        fit(pruner.aux_model(p), loader, epochs, lr, criterion=aux_criterion)   # swp_plugin.recipes.training
        pruner.prune_stage(p, batches)                                         # a few (x, y) training batches
    fit(model, loader, epochs, lr)

Prunable layers: ``nn.Conv2d`` (``groups=1``) whose input channels form a DependencyGraph group with a producing
conv / linear, no other consumer (ResNets: the block-internal channels, as DCP prunes them), the same channel
indices throughout and no ignored layer; the others are listed in :attr:`DCPPruner.skipped`.
Simplifications against the paper (sized for a CPU): ``k`` channels per greedy step (``greedy_steps`` steps per
layer), Adam steps scaled to the layer's weight RMS to refine ``W_A``, ``L_M`` normalised by the baseline's
feature energy, no early stop on the loss change, BatchNorm in eval mode during selection.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, Iterable, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

Batch = Tuple[torch.Tensor, torch.Tensor]


class AuxHead(nn.Sequential):
    """DCP's auxiliary classifier: ``(N, C, H, W)`` features -> BatchNorm, ReLU, average pool, linear ->
    ``(N, num_classes)`` logits."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__(nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(channels, num_classes))


class AuxModel(nn.Module):
    """``model`` with head ``head`` on the output of ``layer``: ``forward(x) -> (logits, aux_logits)``, both
    ``(N, num_classes)``; its parameters are the model's and the head's (train it with :func:`aux_criterion`)."""

    def __init__(self, model: nn.Module, layer: nn.Module, head: AuxHead) -> None:
        super().__init__()
        self.model, self.head = model, head
        self._layer = (layer,)  # a reference, not a second registration of the model's module

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        logits, (features,) = _forward(self.model, x, [self._layer[0]], clone=True)
        return logits, self.head(features)


def aux_criterion(outputs, y: torch.Tensor) -> torch.Tensor:
    """DCP's fine-tuning loss: ``CE(logits, y) + CE(aux_logits, y)`` for an :class:`AuxModel`'s
    ``(logits, aux_logits)``, plain cross-entropy for a tensor of logits."""
    if isinstance(outputs, torch.Tensor):
        return F.cross_entropy(outputs, y)
    return sum(F.cross_entropy(out, y) for out in outputs)


class _Stop(Exception):
    """Raised by a forward hook to end a forward pass once the features needed are computed."""


def _forward(model: nn.Module, x: torch.Tensor, capture: Sequence[nn.Module], stop: nn.Module | None = None,
             clone: bool = False):
    """Run ``model(x)``, recording the outputs of ``capture``; stop after ``stop`` ran (the logits are then
    ``None``). Returns ``(logits, [output of each captured module])``."""
    found: Dict[nn.Module, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, i, out: found.__setitem__(mod, out.clone() if clone else out))
               for m in dict.fromkeys(capture)]
    if stop is not None:
        def halt(*_):
            raise _Stop
        handles.append(stop.register_forward_hook(halt))
    try:
        logits = model(x)
    except _Stop:
        logits = None
    finally:
        for handle in handles:
            handle.remove()
    missing = [m for m in capture if m not in found]
    if missing:
        raise RuntimeError(f"{type(missing[0]).__name__} was not called in the forward pass: it cannot be a DCP layer")
    return logits, [found[m] for m in capture]


def _handler_name(dep) -> str:
    return getattr(dep.handler, "__name__", "")


class DCPPruner:
    """Discrimination-aware channel pruning of ``model`` with torch-pruning groups (see the module docstring).

    Args:
        model: the trained network (pruned in place); a frozen copy is kept as the reconstruction baseline.
        example_inputs: a batch ``(N, C, H, W)`` for tracing, counting and the exactness check.
        pruning_ratio: fraction of each prunable layer's input channels removed (DCP's uniform rate).
        num_aux: ``P``, auxiliary classifiers at evenly spaced prunable layers (their outputs).
        aux_layers: instead, the modules whose ``(N, C, H, W)`` outputs feed the heads, in forward order.
        lam: weight of the discrimination-aware loss against the reconstruction loss.
        greedy_steps: channel additions per layer (``k = ceil(kept / greedy_steps)`` channels each).
        opt_steps, opt_lr: Adam steps on the selected weights after each addition, at ``opt_lr`` times the
            layer's weight RMS.
        ignored_layers: layers not to prune (the classifier); groups touching them are left alone.
        **dg_kwargs: passed to ``tp.DependencyGraph.build_dependency`` (e.g. ``customized_pruners``).
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, pruning_ratio: float = 0.3, num_aux: int = 2,
                 aux_layers: Sequence[nn.Module] | None = None, lam: float = 1.0, greedy_steps: int = 4,
                 opt_steps: int = 5, opt_lr: float = 0.01, ignored_layers: Iterable[nn.Module] | None = None,
                 **dg_kwargs) -> None:
        if not 0 <= pruning_ratio < 1:
            raise ValueError(f"pruning_ratio must be in [0, 1), got {pruning_ratio}")
        if greedy_steps < 1 or opt_steps < 0 or num_aux < 0:
            raise ValueError(f"need greedy_steps >= 1, opt_steps >= 0, num_aux >= 0; got {greedy_steps}, "
                             f"{opt_steps}, {num_aux}")
        self.model, self.example_inputs = model, example_inputs
        self.pruning_ratio, self.lam = pruning_ratio, lam
        self.greedy_steps, self.opt_steps, self.opt_lr = greedy_steps, opt_steps, opt_lr
        self.ignored = set(ignored_layers or [])
        self.names = {m: n for n, m in model.named_modules()}
        dg_kwargs.pop("root_module_types", None)  # a BasePruner option (swp_plugin.torch_pruning_kwargs())
        flags = [q.requires_grad for q in model.parameters()]
        try:  # torch-pruning traces through autograd: frozen layers would be missing from the graph
            with torch.enable_grad():
                model.requires_grad_(True)
                self.DG = tp.DependencyGraph().build_dependency(model, example_inputs, **dg_kwargs)
        finally:
            for q, flag in zip(model.parameters(), flags):
                q.requires_grad_(flag)
        self.skipped: Dict[str, str] = {}
        candidates = [m for m in model.modules() if isinstance(m, nn.Conv2d) and self._is_unit(m)]
        order = self._forward_order(candidates + list(aux_layers or []))
        self.units: List[nn.Conv2d] = sorted(candidates, key=order.__getitem__)
        if aux_layers is None:
            if len(self.units) < num_aux + 1:
                raise ValueError(f"{len(self.units)} prunable layer(s), too few for {num_aux} auxiliary losses "
                                 f"(skipped: {self.skipped})")
            ends = [round((p + 1) * len(self.units) / (num_aux + 1)) for p in range(num_aux)]
            aux_layers = [self.units[end - 1] for end in ends]
        self.aux_layers: List[nn.Module] = list(aux_layers)
        bounds = [order[m] for m in self.aux_layers] + [math.inf]
        if bounds != sorted(bounds):
            raise ValueError("aux_layers must be given in forward order")
        self.stages: List[List[nn.Conv2d]] = [
            [u for u in self.units if (order[u] > bounds[p - 1] if p else True) and order[u] <= bounds[p]]
            for p in range(len(bounds))
        ]
        self.baseline = copy.deepcopy(model).eval().requires_grad_(False)
        self.heads: Dict[int, AuxHead] = {}
        self.selections: Dict[str, List[int]] = {}

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def _is_unit(self, conv: nn.Conv2d) -> bool:
        name = self.names[conv]
        if conv in self.ignored or conv.groups != 1:
            self.skipped[name] = "ignored" if conv in self.ignored else f"grouped conv (groups={conv.groups})"
            return False
        root = list(range(conv.in_channels))
        group = self.DG.get_pruning_group(conv, tp.prune_conv_in_channels, idxs=root)
        modules = [dep.target.module for dep, _ in group]
        consumers = [m for (dep, _), m in zip(group, modules) if _handler_name(dep) == "prune_in_channels"]
        producers = [m for (dep, _), m in zip(group, modules)
                     if _handler_name(dep) == "prune_out_channels" and isinstance(m, (nn.Conv2d, nn.Linear))]
        reason = None
        if not producers:
            reason = "no producing layer (network input)"
        elif consumers != [conv]:
            reason = f"channels also feed {', '.join(self.names.get(m, type(m).__name__) for m in consumers[1:])}"
        elif any(m in self.ignored for m in modules):
            reason = "its channels touch an ignored layer"
        elif any(list(idxs) != root for _, idxs in group):
            reason = "channel indices are remapped in its group (concat / split / flatten)"
        if reason:
            self.skipped[name] = reason
        return reason is None

    def _forward_order(self, modules: Sequence[nn.Module]) -> Dict[nn.Module, int]:
        order: Dict[nn.Module, int] = {}

        def record(module: nn.Module, *_) -> None:
            order.setdefault(module, len(order))

        handles = [m.register_forward_hook(record) for m in dict.fromkeys(modules)]
        training = self.model.training
        try:
            with torch.no_grad():
                self.model.eval()(self.example_inputs)
        finally:
            self.model.train(training)
            for handle in handles:
                handle.remove()
        missing = [self.names.get(m, type(m).__name__) for m in modules if m not in order]
        if missing:
            raise ValueError(f"{missing}: not called in the forward pass of the example inputs")
        return order

    def kept_channels(self, layer: nn.Conv2d) -> int:
        """Input channels ``layer`` keeps: ``C_in - round(pruning_ratio * C_in)``, at least 1."""
        return max(1, layer.in_channels - int(round(self.pruning_ratio * layer.in_channels)))

    def aux_model(self, p: int) -> nn.Module:
        """Stage ``p``'s network to fine-tune before its selection: an :class:`AuxModel` with a (new) head on
        ``aux_layers[p]``, or the model itself in the last stage (train with :func:`aux_criterion`)."""
        if p == len(self.aux_layers):
            return self.model
        layer = self.aux_layers[p]
        if p not in self.heads:
            training = self.model.training
            with torch.no_grad():
                logits, (features,) = _forward(self.model.eval(), self.example_inputs, [layer])
            self.model.train(training)
            if features.dim() != 4:
                raise ValueError(f"aux layer {self.names.get(layer)}: output {tuple(features.shape)}, "
                                 "expected (N, C, H, W)")
            self.heads[p] = AuxHead(features.shape[1], logits.shape[-1]).to(self.example_inputs.device)
        return AuxModel(self.model, layer, self.heads[p])

    def _joint_loss(self, layer: nn.Module, p: int, x, y, target, energy) -> torch.Tensor:
        """``L_M + lam * L_S^p`` on one batch; the forward pass ends at the stage's head."""
        stop = self.aux_layers[p] if p < len(self.aux_layers) else None
        logits, features = _forward(self.model, x, [layer] if stop is None else [layer, stop], stop)
        recon = (features[0] - target).pow(2).mean() / energy
        return recon + self.lam * F.cross_entropy(logits if stop is None else self.heads[p](features[1]), y)

    def select_channels(self, layer: nn.Conv2d, batches: Sequence[Batch]) -> List[int]:
        """Greedy DCP selection of ``layer``'s input channels on ``batches`` (a few ``(x, y)`` training batches);
        leaves the unselected channels' weights at zero and returns the selected ones in selection order."""
        p = next(i for i, stage in enumerate(self.stages) if layer in stage)
        if p < len(self.aux_layers) and p not in self.heads:
            raise ValueError(f"stage {p}'s auxiliary head does not exist: fine-tune pruner.aux_model({p}) first")
        if not batches:
            raise ValueError("select_channels needs at least one (x, y) batch")
        base_layer = dict(self.baseline.named_modules())[self.names[layer]]
        with torch.no_grad():
            targets = [_forward(self.baseline, x, [base_layer], base_layer)[1][0] for x, _ in batches]
        data = [(x, y, t, t.pow(2).mean().clamp_min(1e-12)) for (x, y), t in zip(batches, targets)]
        keep, weight = self.kept_channels(layer), layer.weight  # weight (C_out, C_in, kh, kw)
        if keep == layer.in_channels:
            return list(range(keep))
        original = weight.detach().clone()
        lr = self.opt_lr * float(original.pow(2).mean().sqrt())
        selected = torch.zeros(layer.in_channels, dtype=torch.bool, device=weight.device)
        order: List[int] = []
        heads = list(self.heads.values())
        params = [*self.model.parameters(), *(q for head in heads for q in head.parameters())]
        flags, training = [q.requires_grad for q in params], [m.training for m in [self.model, *heads]]
        for m in [self.model, *heads]:
            m.eval()
        for q in params:
            q.requires_grad_(q is weight)
        try:
            with torch.no_grad():
                weight.zero_()
            while len(order) < keep:
                weight.grad = None
                for x, y, target, energy in data:
                    (self._joint_loss(layer, p, x, y, target, energy) / len(data)).backward()
                norms = weight.grad.transpose(0, 1).flatten(1).norm(dim=1).masked_fill(selected, -1.0)  # (C_in,)
                new = norms.topk(min(math.ceil(keep / self.greedy_steps), keep - len(order))).indices
                selected[new] = True
                order += new.tolist()
                with torch.no_grad():
                    weight[:, new] = original[:, new]
                optimizer = torch.optim.Adam([weight], lr=lr)
                for step in range(self.opt_steps):
                    optimizer.zero_grad()
                    self._joint_loss(layer, p, *data[step % len(data)]).backward()
                    weight.grad[:, ~selected] = 0
                    optimizer.step()
                    with torch.no_grad():
                        weight[:, ~selected] = 0
        except BaseException:
            with torch.no_grad():
                weight.copy_(original)  # leave the layer as it was
            raise
        finally:
            weight.grad = None
            for q, flag in zip(params, flags):
                q.requires_grad_(flag)
            for m, mode in zip([self.model, *heads], training):
                m.train(mode)
        self.selections[self.names[layer]] = order
        return order

    @torch.no_grad()
    def remove_unselected(self, layer: nn.Conv2d, selected: Sequence[int], tol: float = 1e-4) -> None:
        """Prune ``layer``'s input channels not in ``selected`` (zero weights) with their torch-pruning group;
        raises if the model's outputs on the example inputs change by more than ``tol`` (relative)."""
        removed = sorted(set(range(layer.in_channels)) - set(selected))
        if not removed:
            return
        if layer.weight[:, removed].abs().max() > 0:
            raise ValueError(f"{self.names[layer]}: the channels to remove still have non-zero weights; "
                             "remove only what select_channels left unselected")
        training = self.model.training
        self.model.eval()
        before = self.model(self.example_inputs)
        self.DG.get_pruning_group(layer, tp.prune_conv_in_channels, idxs=removed).prune()
        after = self.model(self.example_inputs)
        self.model.train(training)
        error = float((before - after).abs().max() / before.abs().max().clamp_min(1e-12))
        if error > tol:
            raise RuntimeError(f"{self.names[layer]}: removing {len(removed)} channels changed the outputs by "
                               f"{error:.2e} (relative); torch-pruning's group reached more than the layer's input")

    def prune_stage(self, p: int, batches: Sequence[Batch]) -> List[Tuple[str, int, int]]:
        """Select and remove the channels of every layer of stage ``p`` (after fine-tuning
        :meth:`aux_model`\\ ``(p)``). Returns ``(layer name, kept, before)`` per layer."""
        report = []
        for layer in self.stages[p]:
            before = layer.in_channels
            self.remove_unselected(layer, self.select_channels(layer, batches))
            report.append((self.names[layer], layer.in_channels, before))
        self.heads.pop(p, None)
        return report

"""What ``StripePruner`` checks on the model and its example inputs before it touches anything.

Each check raises ``ValueError`` naming the tensor, layer or input and what to do, so that the exactness check of
``step()`` never blames a layer for a NaN, a meta tensor or a tied weight.
"""

from __future__ import annotations

from typing import Iterator, Sequence, Tuple

import torch
import torch.nn as nn

from ..layers.stripe_conv import StripeConv2d


def _tensors(value, path: str = "example_inputs") -> Iterator[Tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{path}[{key!r}]")
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{path}[{i}]")


def check_not_meta(model: nn.Module, example_inputs) -> None:
    """Refuse a model (or inputs) with tensors on the meta device: they have no values to prune or compare."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in items:
            if tensor.is_meta:
                raise ValueError(f"StripePruner: {kind} '{name}' is on the meta device (no values). Materialise the "
                                 "model first (model.to_empty(device='cpu') and load its weights), then build the "
                                 "pruner.")
    for path, tensor in _tensors(example_inputs):
        if tensor.is_meta:
            raise ValueError(f"StripePruner: {path} is on the meta device; pass real example inputs.")


def check_inputs_finite(example_inputs) -> None:
    """Refuse example inputs holding NaN/Inf: every output would be NaN and no check could mean anything."""
    for path, tensor in _tensors(example_inputs):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"StripePruner: {path} holds NaN/Inf; pass finite example inputs (the exactness "
                             "check compares outputs on them).")


def check_model_finite(model: nn.Module) -> None:
    """Refuse NaN/Inf in any floating parameter or buffer (weights, BatchNorm running statistics), named."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in items:
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                what = "BatchNorm statistic" if name.endswith(("running_mean", "running_var")) else kind
                raise ValueError(f"StripePruner: {what} '{name}' holds NaN/Inf; the model cannot be pruned exactly "
                                 "(its outputs are not finite). Fix or reload the weights (for BatchNorm statistics: "
                                 "recalibrate, e.g. reset_running_stats() and a few training-mode forwards).")


def check_untied(model: nn.Module, ignored: Sequence[nn.Module]) -> None:
    """Refuse convs that share one weight tensor (``b.weight = a.weight``) unless all of them are ignored: each conv
    gets its own stripes, and merging a skeleton writes the shared tensor in place (``remove_parametrizations``),
    which would change the other conv too."""
    ignored_ids = {id(m) for m in ignored}
    owners = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, StripeConv2d)):
            owners.setdefault(id(module.weight), []).append((name, module))
    for sharing in owners.values():
        unique = {id(m): n for n, m in sharing}
        if len(unique) > 1 and any(i not in ignored_ids for i in unique):
            names = sorted(unique.values())
            raise ValueError(f"StripePruner: convs {names} share one weight tensor (tied weights). Stripe pruning "
                             "gives each conv its own stripes, so they cannot stay tied: untie them (e.g. "
                             f"model.{names[-1]}.weight = nn.Parameter(model.{names[-1]}.weight.detach().clone())) "
                             "or put all of them in ignored_layers.")

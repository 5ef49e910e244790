"""Saving a pruned model as tensors plus a plain description of its structure (no pickled code).

``save(model, path)`` writes ``{"format", "structure", "state_dict"}`` where ``structure`` maps module
names to their shape attributes (conv/linear/norm channel counts) and marks the convs that became
``StripeConv2d`` with their full configuration. ``load(path, model)`` applies that structure to a freshly
built, unpruned instance of the same architecture and loads the weights; the file opens with
``torch.load(path, weights_only=True)``.

Whole-module ``torch.save(model)`` works too, but loading it runs pickled code:
``torch.load(path, weights_only=False)`` - only for files you trust.
"""

from __future__ import annotations

import os
import pickle
from typing import Dict, Union

import torch
import torch.nn as nn

from .layers.stripe_conv import StripeConv2d

FORMAT = "swp_plugin/1"

#: module type -> shape attributes recorded and restored (checked with isinstance, in order).
SHAPE_ATTRIBUTES: Dict[type, tuple] = {
    StripeConv2d: (
        "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "padding_mode",
        "same_dynamic", "backend",
    ),
    nn.modules.conv._ConvNd: ("in_channels", "out_channels", "groups"),
    nn.Linear: ("in_features", "out_features"),
    nn.modules.batchnorm._BatchNorm: ("num_features",),
    nn.GroupNorm: ("num_groups", "num_channels"),
    nn.LayerNorm: ("normalized_shape",),
    nn.modules.instancenorm._InstanceNorm: ("num_features",),
    nn.PReLU: ("num_parameters",),
}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def describe(model: nn.Module) -> Dict[str, Dict]:
    """Module name -> ``{"type": class name, "stripe": bool, **shape attributes}`` (plain Python only)."""
    structure = {}
    for name, module in model.named_modules():
        for cls, attrs in SHAPE_ATTRIBUTES.items():
            if isinstance(module, cls):
                entry = {a: _plain(getattr(module, a)) for a in attrs}
                entry.update(type=type(module).__name__, stripe=isinstance(module, StripeConv2d))
                if isinstance(module, StripeConv2d):
                    entry.update(num_stripes=module.num_stripes, bias=module.bias is not None)
                structure[name] = entry
                break
    return structure


def save(model: nn.Module, path: Union[str, os.PathLike], **metadata) -> None:
    """Save ``model`` (pruned or not, deployed or not) as tensors + structure; see :func:`load`. ``metadata``:
    plain values (str, numbers, lists, dicts) stored alongside, e.g. the model name the CLI uses to rebuild it.

    A model returned by :func:`swp_plugin.deploy` is saved with what deploy recorded (the structure it started
    from, its example input shapes and its per-layer choices), so that :func:`load` rebuilds it exactly."""
    checkpoint = {"format": FORMAT, "structure": describe(model), "state_dict": model.state_dict(),
                  "metadata": metadata}
    if hasattr(model, "deploy_source"):
        checkpoint["deploy"] = model.deploy_source
    torch.save(checkpoint, path)


def read(path: Union[str, os.PathLike]) -> dict:
    """The checkpoint dict of a :func:`save` file (``weights_only=True``), or a clear ``ValueError``."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path} holds pickled Python objects (a whole-module torch.save(model) file?), not a "
                         "swp_plugin.save file; load it with torch.load(path, weights_only=False) if you trust it, "
                         "then write it with swp_plugin.save(model, path)") from err
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(f"{path} is not a swp_plugin.save file (format {FORMAT!r}); for a whole-module "
                         "torch.save file use torch.load(path, weights_only=False) if you trust it")
    return checkpoint


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def load(path: Union[str, os.PathLike], model: nn.Module, strict: bool = True) -> nn.Module:
    """Load a file written by :func:`save` into ``model``, a fresh instance of the same architecture, and return
    the loaded model (a new object for a deployed file: use the return value).

    Convs recorded as stripe layers are replaced by ``StripeConv2d``; every recorded module gets its saved
    channel counts and tensors of the saved shapes; a deployed file is deployed again with its recorded
    choices (no timing); then ``load_state_dict(strict=strict)``.
    """
    checkpoint = read(path)
    state, deployed = checkpoint["state_dict"], checkpoint.get("deploy")
    if deployed:
        _apply_structure(model, deployed["structure"], {k: tuple(v) for k, v in deployed["shapes"].items()}, path)
        own = model.state_dict()  # the stripe indexes (same names in the deployed layers) fix the kernel plans
        model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)
        from .deployment import deploy  # deploy records structures with this module

        example = tuple(torch.zeros(shape, dtype=getattr(torch, dtype)) for shape, dtype in deployed["example"])
        model = deploy(model.eval(), example, dense_convs=deployed["dense_convs"], fuse=deployed["fuse"],
                       verify=False, choices=deployed["choices"])
    else:
        _apply_structure(model, checkpoint["structure"], {k: tuple(v.shape) for k, v in state.items()}, path)
    model.load_state_dict(state, strict=strict)
    return model


def _apply_structure(model: nn.Module, structure: Dict[str, Dict], shapes: Dict[str, tuple], path) -> None:
    """Give ``model`` the recorded structure: stripe layers, channel counts, tensors of the recorded ``shapes``."""
    modules = dict(model.named_modules())
    missing = sorted(set(structure) - set(modules))
    if missing:
        raise ValueError(f"the model has no module(s) {missing[:5]} recorded in {path}: not the same architecture")
    for name, entry in structure.items():
        module = modules[name]
        if entry["stripe"] and not isinstance(module, StripeConv2d):
            reference = next(iter(module.parameters()), None)
            kwargs = {k: v for k, v in entry.items() if k not in ("type", "stripe")}
            module = StripeConv2d(**kwargs, device=getattr(reference, "device", None),
                                  dtype=getattr(reference, "dtype", None))
            _set_child(model, name, module)
        for attr, value in entry.items():
            if attr not in ("type", "stripe", "num_stripes", "bias"):
                setattr(module, attr, tuple(value) if isinstance(value, list) else value)
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for tensor_name, tensor in tensors:
            shape = shapes.get(f"{name}.{tensor_name}" if name else tensor_name)
            if shape is not None and tuple(shape) != tuple(tensor.shape):
                resized = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
                if isinstance(tensor, nn.Parameter):
                    setattr(module, tensor_name, nn.Parameter(resized, requires_grad=tensor.requires_grad))
                else:
                    setattr(module, tensor_name, resized)

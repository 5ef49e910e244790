"""What a file may say, checked before anything is built from it.

* Structure entries (:func:`entry_values`): per module kind the keys :func:`~swp_plugin.layers.structure.describe`
  records and nothing else; channel counts are ints in ``[1, the fresh model's]``; what pruning never changes
  (kernel size, stride, padding, dilation, padding mode) must equal the fresh model's. ``eps``, ``momentum``... are
  not part of any entry: a file cannot set them.
* Tensor shapes (:func:`expected_shape`): derived from the module's (checked) attributes where its kind is known,
  else the fresh tensor's rank with no dimension larger than the fresh one's - before anything is allocated.
* Tensor values (:func:`check_tensor`): the fresh tensor's kind of dtype, finite floats, non-negative variances.
* Metadata (:func:`model_spec`): the keys the CLI rebuilds a model from, with their types and ranges.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.nn as nn

from ..layers.config import BACKENDS
from ..layers.padding import is_dynamic_same
from ..layers.stripe_conv import StripeConv2d
from ..layers.structure import SHAPE_ATTRIBUTES, kind
from .files import CheckpointError, PathLike

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
#: keys every structure entry has besides its kind's shape attributes
COMMON = ("type", "stripe")
#: stripe entries: these must equal the fresh conv's (pruning never changes them)
FIXED = ("kernel_size", "stride", "padding", "dilation", "padding_mode", "same_dynamic")
#: ``metadata.model_kwargs`` the format defines: name -> (type, low, high)
MODEL_KWARGS = {"width": (float, 1e-3, 16.0)}
MAX_CLASSES, MAX_INPUT_SIDE, MAX_CHANNELS = 1_000_000, 16384, 4096


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _normal(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _count(path: PathLike, field: str, value, high: int, low: int = 1) -> int:
    if not _int(value) or not low <= value <= high:
        raise CheckpointError(path, field, f"{value!r} must be an int in [{low}, {high}] (the fresh model's "
                              "value bounds it: pruning only removes)")
    return value


def entry_values(path: PathLike, name: str, entry, module: nn.Module) -> Dict[str, object]:
    """The checked attribute values of structure ``entry`` for ``module`` (the fresh model's ``name``): for a stripe
    entry the ``StripeConv2d`` arguments, else the shape attributes to set."""
    where = f"structure[{name!r}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("stripe"), bool) or not isinstance(
            entry.get("type"), str):
        raise CheckpointError(path, where, "must be a dict with 'type' (str) and 'stripe' (bool)")
    if entry["stripe"]:
        if entry["type"] != StripeConv2d.__name__:
            raise CheckpointError(path, f"{where}['type']", f"{entry['type']!r}: a stripe entry records a "
                                  "StripeConv2d")
        if not (type(module) is StripeConv2d or (isinstance(module, nn.Conv2d) and module.groups == 1)):
            raise CheckpointError(path, where, f"a stripe layer recorded for a {type(module).__name__}: not the "
                                  "same architecture")
        cls, allowed = StripeConv2d, SHAPE_ATTRIBUTES[StripeConv2d] + ("num_stripes", "bias")
    else:
        cls = kind(module)
        if cls is None or entry["type"] != type(module).__name__:
            raise CheckpointError(path, where, f"records a {entry['type']}, the model has a {type(module).__name__}"
                                  ": not the same architecture")
        allowed = SHAPE_ATTRIBUTES[cls]
    extra, missing = set(entry) - set(allowed) - set(COMMON), set(allowed) - set(entry)
    if extra or missing:
        raise CheckpointError(path, f"{where}[{sorted(extra or missing)[0]!r}]",
                              f"{'unknown key' if extra else 'missing'} (a {entry['type']} entry has exactly "
                              f"{sorted(allowed)})")
    if entry["stripe"]:
        return _stripe_values(path, where, entry, module)
    values = {}
    for attr in allowed:
        field, fresh, value = f"{where}[{attr!r}]", getattr(module, attr), entry[attr]
        if attr == "normalized_shape":
            if not isinstance(value, (list, tuple)) or len(value) != len(fresh):
                raise CheckpointError(path, field, f"{value!r} must be a list of {len(fresh)} ints")
            value = tuple(_count(path, field, v, f) for v, f in zip(value, fresh))
        else:
            _count(path, field, value, fresh)
        values[attr] = value
    if "groups" in values and (values["in_channels"] % values["groups"] or values["out_channels"] % values["groups"]):
        raise CheckpointError(path, f"{where}['groups']", f"{values['groups']} does not divide the channel counts")
    if "num_groups" in values and values["num_channels"] % values["num_groups"]:
        raise CheckpointError(path, f"{where}['num_groups']", f"{values['num_groups']} does not divide num_channels")
    return values


def _stripe_values(path: PathLike, where: str, entry: Dict, module: nn.Module) -> Dict[str, object]:
    fresh = {"same_dynamic": is_dynamic_same(module), **{a: _normal(getattr(module, a)) for a in FIXED
                                                          if a != "same_dynamic" or type(module) is StripeConv2d}}
    for attr in FIXED:
        if _normal(entry[attr]) != fresh[attr]:
            raise CheckpointError(path, f"{where}[{attr!r}]", f"{entry[attr]!r} differs from the model's "
                                  f"{fresh[attr]!r}: pruning never changes it (not the same architecture?)")
    values = {a: fresh[a] for a in FIXED}  # equal to the entry's, in the model's types
    values["in_channels"] = _count(path, f"{where}['in_channels']", entry["in_channels"], module.in_channels)
    values["out_channels"] = _count(path, f"{where}['out_channels']", entry["out_channels"], module.out_channels)
    kh, kw = fresh["kernel_size"]
    values["num_stripes"] = _count(path, f"{where}['num_stripes']", entry["num_stripes"],
                                   values["out_channels"] * kh * kw, low=0)
    if entry["backend"] not in BACKENDS:
        raise CheckpointError(path, f"{where}['backend']", f"{entry['backend']!r} is not one of {BACKENDS}")
    if not isinstance(entry["bias"], bool):
        raise CheckpointError(path, f"{where}['bias']", f"{entry['bias']!r} must be a bool")
    values.update(backend=entry["backend"], bias=entry["bias"])
    return values


def expected_shape(module: nn.Module, tensor: str, fresh: Tuple[int, ...]) -> Tuple[int, ...] | None:
    """The shape ``module``'s tensor ``tensor`` must have given its attributes (None: the kind does not say)."""
    if isinstance(module, StripeConv2d):
        return {"weight": (module.num_stripes, module.in_channels), "bias": (module.out_channels,),
                "stripe_out": (module.num_stripes,), "stripe_pos": (module.num_stripes,)}.get(tensor)
    if isinstance(module, nn.modules.conv._ConvNd):
        first, second = ((module.in_channels, module.out_channels) if module.transposed
                         else (module.out_channels, module.in_channels))
        return {"weight": (first, second // module.groups, *module.kernel_size),
                "bias": (module.out_channels,)}.get(tensor)
    if isinstance(module, nn.Linear):
        return {"weight": (module.out_features, module.in_features), "bias": (module.out_features,)}.get(tensor)
    if isinstance(module, nn.LayerNorm):
        return tuple(module.normalized_shape) if tensor in ("weight", "bias") else None
    channels = {nn.GroupNorm: "num_channels", nn.PReLU: "num_parameters"}.get(type(module), "num_features")
    if kind(module) is not None and hasattr(module, channels):
        return () if tensor == "num_batches_tracked" else (getattr(module, channels),)
    return None


def check_shape(path: PathLike, key: str, shape: Tuple[int, ...], module: nn.Module, tensor: str,
                fresh: Tuple[int, ...]) -> None:
    """Refuse a recorded ``shape`` that does not fit ``module`` (before a tensor of that shape is allocated)."""
    expected = expected_shape(module, tensor, fresh)
    if expected is not None:
        if tuple(shape) != tuple(expected):
            raise CheckpointError(path, f"state_dict[{key!r}]", f"shape {tuple(shape)} does not match the recorded "
                                  f"structure, which needs {tuple(expected)}")
    elif len(shape) != len(fresh) or any(not _int(s) or not 0 <= s <= f for s, f in zip(shape, fresh)):
        raise CheckpointError(path, f"state_dict[{key!r}]", f"shape {tuple(shape)} does not fit the model's "
                              f"{tuple(fresh)} (same rank, no dimension larger)")


def check_tensor(path: PathLike, key: str, value: torch.Tensor, fresh: torch.Tensor) -> None:
    """Refuse a tensor of another kind of dtype than the model's, with NaN/Inf, or a negative variance."""
    field = f"state_dict[{key!r}]"
    if value.is_floating_point() != fresh.is_floating_point() or (
            not fresh.is_floating_point() and value.dtype != fresh.dtype) or value.is_complex():
        raise CheckpointError(path, field, f"dtype {value.dtype}, the model has {fresh.dtype}")
    if value.is_floating_point():
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(path, field, f"{bad} NaN/Inf value(s): the saved model is broken (a diverged "
                                  "training run?); a file must hold finite weights and statistics")
        if key.endswith("running_var") and bool((value < 0).any()):
            raise CheckpointError(path, field, "a negative running variance")


def model_spec(path: PathLike, metadata) -> Dict[str, object]:
    """``{"architecture", "num_classes", "input_size", "model_kwargs"}`` from a file's metadata, checked (as
    ``swp prune`` and ``examples/continual_prune.py`` write them); ``model_kwargs`` only with the keys of
    :data:`MODEL_KWARGS`."""
    if not isinstance(metadata, dict) or not isinstance(metadata.get("architecture"), str) or not (
            metadata["architecture"]):
        raise CheckpointError(path, "metadata['architecture']", "missing: the file does not name its model; `swp "
                              "report` reads files written by `swp prune` or examples/continual_prune.py (or "
                              "swp_plugin.save(model, path, architecture=..., num_classes=..., input_size=[C, H, W]))")
    name = metadata["architecture"]
    if len(name) > 200 or not all(c.isalnum() or c in "._-" for c in name):
        raise CheckpointError(path, "metadata['architecture']", f"{name[:60]!r} is not a model name")
    classes = _count(path, "metadata['num_classes']", metadata.get("num_classes"), MAX_CLASSES)
    size = metadata.get("input_size")
    if not isinstance(size, (list, tuple)) or len(size) != 3:
        raise CheckpointError(path, "metadata['input_size']", f"{size!r} must be [C, H, W]")
    size = [_count(path, "metadata['input_size']", size[0], MAX_CHANNELS)] + [
        _count(path, "metadata['input_size']", s, MAX_INPUT_SIDE) for s in size[1:]]
    kwargs = metadata.get("model_kwargs", {})
    if not isinstance(kwargs, dict):
        raise CheckpointError(path, "metadata['model_kwargs']", f"must be a dict, got {type(kwargs).__name__}")
    for key, value in kwargs.items():
        if key not in MODEL_KWARGS:
            raise CheckpointError(path, f"metadata['model_kwargs'][{key!r}]", f"unknown key (the format defines "
                                  f"{sorted(MODEL_KWARGS)})")
        kind_, low, high = MODEL_KWARGS[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and low <= value <= high):
            raise CheckpointError(path, f"metadata['model_kwargs'][{key!r}]", f"{value!r} must be a number in "
                                  f"[{low:g}, {high:g}]")
        kwargs = {**kwargs, key: kind_(value)}
    return {"architecture": name, "num_classes": classes, "input_size": size, "model_kwargs": dict(kwargs)}

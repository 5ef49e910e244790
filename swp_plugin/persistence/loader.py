"""``save`` / ``load``: a model as tensors plus a plain description of its structure (no pickled code).

``save(model, path)`` writes ``{"format", "structure", "state_dict", "metadata"[, "deploy"], "digest"}`` atomically
(:func:`.files.atomic_save`). ``load(path, model)`` applies the structure to ``model``, a freshly built, unpruned
instance of the same architecture, and loads the tensors. Everything is checked before it is used
(:mod:`.schema`): the structure against the fresh model, every shape before a tensor of it is allocated, every
dtype and value, the stripe indexes; the kernel plans of a deployed model are never read from the file but derived
from its checked stripe indexes. A refused file raises :class:`.files.CheckpointError` naming the file and field.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn

from ..deployment.forward import attach_twin
from ..deployment.rebuild import IMPLEMENTATIONS, rebuild
from ..layers.checks import check_stripes, placeholder_stripes
from ..layers.stripe_conv import StripeConv2d
from ..layers.structure import describe
from ..utils import swap_module
from .files import FORMAT, CheckpointError, PathLike, atomic_save, digest, read
from .schema import check_shape, check_tensor, entry_values

#: dtypes of recorded example inputs, and their largest size (elements) accepted
EXAMPLE_DTYPES = ("float32", "float64", "float16", "bfloat16")
MAX_EXAMPLE = 1 << 27
DEPLOY_KEYS = {"structure", "dense_convs", "fuse", "shapes", "example", "choices"}


def save(model: nn.Module, path: PathLike, **metadata) -> None:
    """Save ``model`` (pruned or not, deployed or not) as tensors + structure; see :func:`load`. ``metadata``:
    plain values (str, numbers, lists, dicts) stored alongside, e.g. the model name the CLI uses to rebuild it.
    The write is atomic: ``path`` keeps its previous content until the new file is complete.

    A model returned by :func:`swp_plugin.deploy` is saved with what deploy recorded (the structure it started
    from, its example input shapes and its per-layer choices), so that :func:`load` rebuilds it exactly."""
    checkpoint = {"format": FORMAT, "structure": describe(model),
                  "state_dict": {k: v.detach() for k, v in model.state_dict().items()}, "metadata": metadata}
    if hasattr(model, "deploy_source"):
        checkpoint["deploy"] = model.deploy_source
    checkpoint["digest"] = digest(checkpoint)
    atomic_save(checkpoint, path)


def load(path: PathLike, model: nn.Module, strict: bool = True) -> nn.Module:
    """Load a file written by :func:`save` into ``model``, a fresh instance of the same architecture, and return
    the loaded model (a new object for a deployed file: use the return value).

    Convs recorded as stripe layers are replaced by ``StripeConv2d``; every recorded module gets its saved
    channel counts and tensors of the saved shapes; a deployed file gets the deployed structure with its recorded
    choices (:func:`swp_plugin.deployment.rebuild.rebuild`: no timing, nothing run on the file's data); then
    ``load_state_dict(strict=strict)``. Raises :class:`~swp_plugin.persistence.CheckpointError` (a ``ValueError``)
    for a file it refuses, before ``model`` sees any of the file's values.
    """
    checkpoint = read(path)
    state = checkpoint["state_dict"]
    if "deploy" in checkpoint:
        return _load_deployed(path, checkpoint["deploy"], state, model, strict)
    _apply_structure(path, model, checkpoint["structure"], {k: tuple(v.shape) for k, v in state.items()})
    _check_values(path, model, state)
    _load_state(path, model, state, strict)
    return model


def _apply_structure(path: PathLike, model: nn.Module, structure: Dict, shapes: Dict[str, Tuple[int, ...]]) -> None:
    """Give ``model`` the recorded structure: stripe layers, channel counts, tensors of the recorded ``shapes``
    (each checked against the module before it is allocated)."""
    modules = dict(model.named_modules())
    missing = sorted(map(str, set(structure) - set(modules)))
    if missing:
        raise CheckpointError(path, f"structure[{missing[0]!r}]", f"the model has no such module (and "
                              f"{len(missing) - 1} more): not the same architecture")
    for name, entry in structure.items():
        module, values = modules[name], entry_values(path, name, entry, modules[name])
        if entry["stripe"]:
            reference = next(iter(module.parameters()), None)
            layer = StripeConv2d(**values, device=getattr(reference, "device", None),
                                 dtype=getattr(reference, "dtype", None))
            layer.stripe_out, layer.stripe_pos = placeholder_stripes(layer.num_stripes, layer.out_channels)
            layer._refresh()  # valid until the file's (checked) indexes are loaded
            modules[name] = swap_module(model, module, layer)
        else:
            for attr, value in values.items():
                setattr(module, attr, value)
    for name, module in model.named_modules():
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for tensor_name, tensor in tensors:
            if tensor is None:
                continue
            key = f"{name}.{tensor_name}" if name else tensor_name
            shape = shapes.get(key)
            if shape is None:
                continue
            check_shape(path, key, shape, module, tensor_name, tuple(tensor.shape))
            if tuple(shape) != tuple(tensor.shape):
                resized = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
                if isinstance(tensor, nn.Parameter):
                    setattr(module, tensor_name, nn.Parameter(resized, requires_grad=tensor.requires_grad))
                else:
                    setattr(module, tensor_name, resized)


def _check_values(path: PathLike, model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Dtypes, finite values, shapes equal to the model's, and the stripe indexes of every stripe layer."""
    own = model.state_dict()
    for key, value in state.items():
        if key in own:
            if tuple(value.shape) != tuple(own[key].shape):
                raise CheckpointError(path, f"state_dict[{key!r}]", f"shape {tuple(value.shape)} does not match "
                                      f"the recorded structure, which needs {tuple(own[key].shape)}")
            check_tensor(path, key, value, own[key])
    for name, module in model.named_modules():
        if isinstance(module, StripeConv2d):
            prefix = f"{name}." if name else ""
            out, pos = state.get(prefix + "stripe_out"), state.get(prefix + "stripe_pos")
            if out is None or pos is None:
                continue  # missing keys: load_state_dict says so (strict) or the layer keeps its own
            try:
                check_stripes(out, pos, module.num_stripes, module.out_channels, module.kernel_size)
            except ValueError as err:
                raise CheckpointError(path, f"state_dict[{prefix + 'stripe_out'!r}/'stripe_pos']", str(err)) from None


def _load_state(path: PathLike, model: nn.Module, state: Dict[str, torch.Tensor], strict: bool) -> None:
    try:
        model.load_state_dict(state, strict=strict)
    except ValueError as err:  # a layer's own check of what it loads (stripe indexes): "['<key>']: <problem>"
        raise CheckpointError(path, None, f"state_dict{err}") from None
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise CheckpointError(path, "state_dict", " ".join(lines)[:600] + " (not the same architecture, or a "
                              "damaged file)") from None


def _deploy_source(path: PathLike, source: Dict) -> Dict:
    """The checked record of ``deploy()``: ``structure``, ``dense_convs``, ``fuse``, ``shapes``, ``example``,
    ``choices``."""
    extra, missing = set(source) - DEPLOY_KEYS, DEPLOY_KEYS - set(source)
    if extra or missing:
        raise CheckpointError(path, f"deploy[{sorted(map(str, extra or missing))[0]!r}]",
                              f"{'unknown key' if extra else 'missing'} (a deploy record has {sorted(DEPLOY_KEYS)})")
    for key in ("dense_convs", "fuse"):
        if not isinstance(source[key], bool):
            raise CheckpointError(path, f"deploy[{key!r}]", f"{source[key]!r} must be a bool")
    if not isinstance(source["structure"], dict):
        raise CheckpointError(path, "deploy['structure']", "must be a dict")
    shapes = source["shapes"]
    if not isinstance(shapes, dict) or not all(
            isinstance(k, str) and isinstance(v, (list, tuple)) and len(v) <= 8
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in v) for k, v in shapes.items()):
        raise CheckpointError(path, "deploy['shapes']", "must map tensor names to lists of sizes (ints >= 0)")
    example = []
    for i, item in enumerate(source["example"] if isinstance(source["example"], (list, tuple)) else [None] * 17):
        ok = isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], (list, tuple)) and (
            item[1] in EXAMPLE_DTYPES) and 0 < len(item[0]) <= 8 and all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in item[0])
        if not ok or i >= 16 or torch.Size(item[0]).numel() > MAX_EXAMPLE:
            raise CheckpointError(path, f"deploy['example'][{i}]", f"{item!r:.80} must be [shape (positive ints, at "
                                  f"most {MAX_EXAMPLE} elements), dtype (one of {EXAMPLE_DTYPES})], at most 16 inputs")
        example.append((tuple(item[0]), getattr(torch, item[1])))
    if not example:
        raise CheckpointError(path, "deploy['example']", "is empty: a deployed model records its example inputs")
    choices = source["choices"]
    if not isinstance(choices, dict) or not all(isinstance(k, str) and v in IMPLEMENTATIONS
                                                for k, v in choices.items()):
        raise CheckpointError(path, "deploy['choices']", f"must map layer names to one of {IMPLEMENTATIONS}")
    return {**source, "shapes": {k: tuple(v) for k, v in shapes.items()}, "example": example}


def _load_deployed(path: PathLike, record: Dict, state: Dict[str, torch.Tensor], model: nn.Module,
                   strict: bool) -> nn.Module:
    source = _deploy_source(path, record)
    _apply_structure(path, model, source["structure"], source["shapes"])
    num_stripes = {}
    for name, impl in source["choices"].items():
        layer = dict(model.named_modules()).get(name)
        weight = state.get(f"{name}.weight")
        if impl != "kernel" or not isinstance(layer, nn.Conv2d | StripeConv2d):
            continue
        kh, kw = layer.kernel_size
        if weight is None or weight.dim() != 2 or weight.shape[1] != layer.in_channels or not (
                weight.shape[0] <= layer.out_channels * kh * kw):
            raise CheckpointError(path, f"state_dict[{name + '.weight'!r}]", f"a kernel layer's weight must be "
                                  f"(stripes <= {layer.out_channels * kh * kw}, {layer.in_channels}), got "
                                  f"{None if weight is None else tuple(weight.shape)}")
        num_stripes[name] = int(weight.shape[0])
    try:
        deployed = rebuild(model, source["example"], source["choices"], num_stripes, source["dense_convs"],
                           source["fuse"])
    except (ValueError, KeyError) as err:
        raise CheckpointError(path, "deploy['choices']", str(err)) from None
    except (RuntimeError, TypeError, IndexError) as err:  # the passes ran on placeholders only: nothing is unsafe
        raise CheckpointError(path, "deploy['example']", f"the recorded example input shapes {source['example']} do "
                              f"not run through the model ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
                              "not a file of this architecture, or a damaged one: save the model again") from None
    _check_values(path, deployed, state)
    _load_state(path, deployed, state, strict)
    deployed.deploy_source = record
    if any(impl == "kernel" for impl in source["choices"].values()):
        attach_twin(deployed)  # the fastest form, as deploy() returns it (eager where it does not script)
    return deployed

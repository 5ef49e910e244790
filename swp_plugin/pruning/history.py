"""Pruning history of ``StripePruner``: torch-pruning's ``pruning_history()`` / ``load_pruning_history()`` with the
stripe structure, so a fresh model gets the pruned structure and then takes the pruned ``state_dict``::

    torch.save({"model": model.state_dict(), "pruning": pruner.pruning_history()}, "pruned.pth")
    fresh = make_model()
    StripePruner(fresh, example_inputs).load_pruning_history(torch.load("pruned.pth")["pruning"])
    fresh.load_state_dict(torch.load("pruned.pth")["model"])

The history is plain data (``torch.load(weights_only=True)`` reads it)::

    {"format": "swp_plugin.pruning_history/1",
     "channels": [[module name, is_out_channel_pruning, [channel indexes]], ...],   # torch-pruning's entries
     "stripes": {conv name: {"out": [output channel per stripe], "pos": [kernel position per stripe]}}}

Replayed in that order: the channel removals through a DependencyGraph of the (merged) fresh model, then every
listed conv becomes a ``StripeConv2d`` with exactly those stripes. It is untrusted input: everything is checked
on a copy of the model first, so a bad history raises ``ValueError`` (naming the entry) and changes nothing.
(torch-pruning's own ``DG.load_pruning_history`` cannot build stripe layers; it raises on this dict.)
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn as nn

from ..layers.stripe_conv import StripeConv2d
from ..utils import copy_model, swap_module

FORMAT = "swp_plugin.pruning_history/1"


def stripe_structure(model: nn.Module, names: List[str]) -> Dict[str, Dict[str, List[int]]]:
    """``{conv name: {"out": [...], "pos": [...]}}`` of the ``StripeConv2d`` layers among ``names``."""
    modules = dict(model.named_modules())
    return {name: {"out": modules[name].stripe_out.tolist(), "pos": modules[name].stripe_pos.tolist()}
            for name in names if isinstance(modules.get(name), StripeConv2d)}


def make_history(channels: List, stripes: Dict) -> Dict:
    return {"format": FORMAT, "channels": [list(entry) for entry in channels], "stripes": dict(stripes)}


def _int_list(value, what: str) -> List[int]:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ValueError(f"pruning history: {what} must be a list of integers, got {value!r:.80}")
    return list(value)


def _replay(model: nn.Module, history: Dict, build_graph) -> List:
    """Replay ``history`` on ``model`` (skeletons already merged); returns the channel entries as replayed."""
    if not isinstance(history, dict) or history.get("format") != FORMAT:
        found = history.get("format") if isinstance(history, dict) else type(history).__name__
        raise ValueError(f"not a StripePruner pruning history (format {found!r}, expected {FORMAT!r}); a history of "
                         "a torch-pruning pruner is loaded with tp.DependencyGraph().load_pruning_history")
    channels, stripes = history.get("channels"), history.get("stripes")
    if not isinstance(channels, list) or not isinstance(stripes, dict):
        raise ValueError("pruning history: 'channels' must be a list and 'stripes' a dict")
    replayed = []
    if channels:
        graph = build_graph(model)
        for i, entry in enumerate(channels):
            if not isinstance(entry, (list, tuple)) or len(entry) != 3 or not isinstance(entry[0], str) \
                    or not isinstance(entry[1], bool):
                raise ValueError(f"pruning history: channel entry {i} must be [module name, bool, [indexes]], "
                                 f"got {entry!r:.80}")
            name, is_out, idxs = entry[0], entry[1], _int_list(entry[2], f"channel entry {i}'s indexes")
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"pruning history: channel entry {i} names '{name}', not in this model") from None
            pruner = graph.get_pruner_of_module(module)
            if pruner is None or module not in graph.module2node:
                raise ValueError(f"pruning history: channel entry {i}: '{name}' is not a prunable layer here")
            count = pruner.get_out_channels(module) if is_out else pruner.get_in_channels(module)
            if not idxs or len(set(idxs)) != len(idxs) or not all(0 <= j < count for j in idxs) \
                    or len(idxs) >= count:
                raise ValueError(f"pruning history: channel entry {i} removes {idxs!r:.80} of the {count} channels "
                                 f"of '{name}' (expected distinct indexes in range, at least one channel left)")
            fn = pruner.prune_out_channels if is_out else pruner.prune_in_channels
            graph.get_pruning_group(module, fn, idxs).prune()
            replayed.append([name, is_out, idxs])
    modules = dict(model.named_modules())
    for name, spec in stripes.items():
        layer = modules.get(name) if isinstance(name, str) else None
        if not isinstance(layer, (nn.Conv2d, StripeConv2d)) or not isinstance(spec, dict):
            raise ValueError(f"pruning history: stripes entry {name!r} is not a conv of this model")
        out, pos = _int_list(spec.get("out"), f"{name}'s stripe 'out'"), _int_list(spec.get("pos"), f"{name}'s 'pos'")
        kh, kw = layer.kernel_size
        if len(out) != len(pos) or not all(0 <= o < layer.out_channels for o in out) \
                or not all(0 <= p < kh * kw for p in pos) or len(set(zip(out, pos))) != len(out):
            raise ValueError(f"pruning history: stripes of '{name}' out of range or duplicated (out < "
                             f"{layer.out_channels}, pos < {kh * kw}, as many of each)")
        if isinstance(layer, StripeConv2d):
            wanted = set(zip(out, pos))
            have = list(zip(layer.stripe_out.tolist(), layer.stripe_pos.tolist()))
            if not wanted <= set(have):
                raise ValueError(f"pruning history: stripes of '{name}' are not a subset of this StripeConv2d's")
            layer.select_stripes(torch.tensor([s in wanted for s in have], dtype=torch.bool))
        elif layer.groups != 1:
            raise ValueError(f"pruning history: '{name}' is a grouped conv here (groups={layer.groups}); it has no "
                             "stripe layer")
        else:
            mask = torch.zeros(layer.out_channels, kh * kw, dtype=torch.bool)
            mask[torch.tensor(out, dtype=torch.long), torch.tensor(pos, dtype=torch.long)] = True
            swap_module(model, layer, StripeConv2d.from_dense(layer, mask.view(layer.out_channels, kh, kw).to(
                layer.weight.device)))
    return replayed


def load_history(model: nn.Module, history: Dict, build_graph: Callable, prepare: Callable = lambda m: None
                 ) -> List:
    """Check ``history`` on a copy of ``model``, then replay it on ``model`` (see the module docstring);
    ``prepare(model)`` runs first on each (e.g. merge the skeletons), ``build_graph(model) -> tp.DependencyGraph``.
    Returns the channel entries."""
    trial = copy_model(model)
    prepare(trial)
    _replay(trial, history, build_graph)
    prepare(model)
    return _replay(model, history, build_graph)

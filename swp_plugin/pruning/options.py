"""What ``StripePruner`` accepts of torch-pruning's ``BasePruner`` options, with their stripe meanings, and what it
refuses (with the reason).

Every option ``StripePruner`` accepts has an effect; a ``BasePruner`` option that stripe pruning cannot honour is
refused with a ``TypeError`` (an option with no meaning here) or ``ValueError`` (a value it cannot honour), before
anything is touched, so a torch-pruning pipeline never silently gets something else than it asked for.

Three modes decide which stripes die:

* ``threshold`` (default): training does (``regularize()`` kills ``|FS| <= threshold``); ``step()`` prunes them.
* ``ratio`` (``pruning_ratio`` / ``pruning_ratio_dict``, torch-pruning's mode): step ``k`` kills the lowest-ranked
  stripes until each layer (or each ranking scope) has lost the scheduler's ratio ``k`` of its initial stripes;
  every ``step()`` then prunes for real (like torch-pruning's pruners: rebuild the optimizer after it).
* ``target`` (``macs_reduction`` / ``params_reduction``, the plug-in's own): step ``k`` kills stripes toward the
  scheduler's reduction ``k``; the intermediate steps only kill (training goes on with the same parameters), the
  last one prunes.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
from torch_pruning.pruner.algorithms.scheduler import linear_scheduler

from .importance import as_stripe_importance
from .target import SCORES

#: Default exactness tolerance of step() (max|diff| / max|y|) by parameter dtype.
DEFAULT_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

#: torch-pruning options handed to its DependencyGraph (honoured there and in the channel cleanup).
GRAPH_OPTIONS = ("forward_fn", "output_transform", "unwrapped_parameters", "customized_pruners")

#: BasePruner options stripe pruning cannot honour -> why (TypeError when given a value other than the default).
REFUSED: Dict[str, str] = {
    "in_channel_groups": "channel grouping of channel pruning; stripe layers keep their channel layout",
    "out_channel_groups": "channel grouping of channel pruning; stripe layers keep their channel layout",
    "channel_groups": "channel grouping of channel pruning; stripe layers keep their channel layout",
    "num_heads": "attention heads; StripePruner prunes convolutions only",
    "prune_num_heads": "attention heads; StripePruner prunes convolutions only",
    "prune_head_dims": "attention heads; StripePruner prunes convolutions only",
    "head_pruning_ratio": "attention heads; StripePruner prunes convolutions only",
    "head_pruning_ratio_dict": "attention heads; StripePruner prunes convolutions only",
}
#: torch-pruning's default of each refused option: passing it explicitly has no effect and is accepted.
REFUSED_DEFAULTS = {"in_channel_groups": {}, "out_channel_groups": {}, "channel_groups": {}, "num_heads": {},
                    "prune_num_heads": False, "prune_head_dims": True, "head_pruning_ratio": 0.0,
                    "head_pruning_ratio_dict": None}

#: BasePruner options StripePruner honours (besides GRAPH_OPTIONS and its own arguments).
HONOURED = ("pruning_ratio", "pruning_ratio_dict", "global_pruning", "iterative_steps",
            "iterative_pruning_ratio_scheduler", "max_pruning_ratio", "round_to", "isomorphic", "root_module_types")
#: torch-pruning's deprecated aliases, mapped with its own warning.
ALIASES = {"ch_sparsity": "pruning_ratio", "ch_sparsity_dict": "pruning_ratio_dict"}


def check_number(name: str, value, minimum: float = 0.0) -> float:
    """``value`` as a finite float ``>= minimum``, else ``ValueError`` naming the option."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be finite and >= {minimum}, got {value!r}")
    return float(value)


def check_fraction(name: str, value, maximum: float = 0.999, allow_zero: bool = False) -> float:
    """``value`` in ``(0, maximum]`` (``[0, maximum]`` with ``allow_zero``), else ``ValueError``."""
    value = check_number(name, value)
    if not (0.0 <= value if allow_zero else 0.0 < value) or value > maximum:
        raise ValueError(f"{name} must be in {'[' if allow_zero else '('}0, {maximum:g}], got {value!r}")
    return value


def check_integer(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


@dataclass
class PrunerOptions:
    """The validated configuration of a ``StripePruner`` (see its docstring and the module docstring)."""

    sr: float
    threshold: float
    target: Tuple[str, float] | None
    mode: str = "threshold"
    pruning_ratio: float = 0.0
    ratio_dict: Dict = field(default_factory=dict)
    global_pruning: bool = False
    isomorphic: bool = False
    round_to: int | None = None
    root_module_types: Tuple[type, ...] | None = None
    importance: object = None
    iterative_steps: int = 1
    scheduler: Callable[[float, int], List[float]] = linear_scheduler
    max_pruning_ratio: float = 1.0
    tolerance: float = 1e-4
    verify: bool = True
    graph_timeout: float | None = 120.0
    score: str = "fs"
    graph_options: Dict = field(default_factory=dict)
    ignored_layers: List[nn.Module] = field(default_factory=list)
    ignored_params: List[nn.Parameter] = field(default_factory=list)

    def step_goals(self) -> List[float]:
        """The target reduction reached after each of the ``iterative_steps`` ``step()`` calls."""
        return list(self.scheduler(self.target[1], self.iterative_steps))[1:] if self.target else []


def _ratio_dict(value) -> Dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"pruning_ratio_dict must be a dict {{module or tuple of modules: ratio}}, got {value!r}")
    for key, ratio in value.items():
        modules = key if isinstance(key, tuple) else (key,)
        if not modules or not all(isinstance(m, nn.Module) for m in modules):
            raise ValueError(f"pruning_ratio_dict keys must be modules or tuples of modules, got {key!r}")
        check_fraction("pruning_ratio_dict value", ratio, 1.0, allow_zero=True)
    return dict(value)


def _importance(importance, score: str):
    if importance is None:
        return None
    converted = as_stripe_importance(importance)
    if converted is None:
        raise TypeError(
            f"importance={type(importance).__name__}: StripePruner ranks stripes, and this object scores channel "
            "groups (torch-pruning's protocol; of those only the magnitude and random importances have a stripe "
            "reading). Pass an object with stripe_scores(layer, skeleton, weight) -> scores "
            "shaped like the skeleton (swp_plugin.pruning.importance, e.g. swp_plugin.StripeImportance()); to prune "
            "channels with it after SWP, give it to a torch-pruning pruner with **swp_plugin.torch_pruning_kwargs().")
    if score != "fs":
        raise ValueError(f"score={score!r} and importance= both rank stripes: give one of them")
    return converted


def parse_options(model: nn.Module, sr, threshold, macs_reduction, params_reduction, importance, verify, tolerance,
                  graph_timeout, ignored_layers: Sequence | None, options: Dict, score: str = "fs") -> PrunerOptions:
    """Validate ``StripePruner``'s arguments and torch-pruning options (see the module docstring)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("StripePruner got a DistributedDataParallel wrapper: build the pruner on the bare model, "
                         "then wrap it (DDP registers the parameters it all-reduces when it is built, and the Filter "
                         "Skeletons are new parameters): pruner = StripePruner(model, ...); "
                         "ddp_model = DistributedDataParallel(model)")
    options = dict(options)
    for old, new in ALIASES.items():
        if old in options:
            warnings.warn(f"{old} is deprecated in torch-pruning; use {new}", stacklevel=3)
            options.setdefault(new, options.pop(old))
    refused = sorted(k for k in set(options) & set(REFUSED) if options[k] != REFUSED_DEFAULTS[k])
    if refused:
        raise TypeError("StripePruner cannot honour " + "; ".join(f"{k}: {REFUSED[k]}" for k in refused))
    unknown = sorted(set(options) - set(HONOURED) - set(GRAPH_OPTIONS) - set(REFUSED))
    if unknown:
        raise TypeError(f"unknown StripePruner option(s) {unknown}; of torch-pruning's BasePruner options it "
                        f"honours {sorted(HONOURED + GRAPH_OPTIONS)} and refuses the others")
    given = (("macs", macs_reduction), ("params", params_reduction))
    targets = [(m, check_fraction(f"{m}_reduction", r)) for m, r in given if r is not None]
    if len(targets) > 1:
        raise ValueError("give one target: macs_reduction or params_reduction, not both")
    ratio_dict = _ratio_dict(options.get("pruning_ratio_dict"))
    ratio = options.get("pruning_ratio")
    ratio = None if ratio is None else check_fraction("pruning_ratio", ratio, 1.0, allow_zero=True)
    mode = "target" if targets else "ratio" if (ratio is not None or ratio_dict) else "threshold"
    if targets and (ratio is not None or ratio_dict):
        raise ValueError("pruning_ratio(_dict) and macs_reduction / params_reduction are two ways to say what dies: "
                         "give one of them")
    if mode != "threshold" and threshold is not None:
        raise ValueError(f"threshold={threshold!r} and {'a target' if targets else 'pruning_ratio'} are mutually "
                         "exclusive: with a target or a ratio, step() chooses which stripes die")
    steps = check_integer("iterative_steps", options.get("iterative_steps", 1))
    cap = check_fraction("max_pruning_ratio", options.get("max_pruning_ratio", 1.0), 1.0)
    round_to = options.get("round_to")
    if round_to is not None:
        round_to = check_integer("round_to", round_to)
    isomorphic = options.get("isomorphic", False)
    if not isinstance(isomorphic, bool):
        raise ValueError(f"isomorphic must be True or False, got {isomorphic!r}")
    if mode == "threshold" and (steps != 1 or cap != 1.0 or "iterative_pruning_ratio_scheduler" in options
                                or round_to not in (None, 1) or isomorphic):
        raise ValueError("iterative_steps, iterative_pruning_ratio_scheduler, max_pruning_ratio, round_to and "
                         "isomorphic act when step() chooses which stripes die: give pruning_ratio or "
                         "macs_reduction / params_reduction (with a threshold, training decides what dies)")
    global_pruning = options.get("global_pruning", mode == "target")
    if not isinstance(global_pruning, bool):
        raise ValueError(f"global_pruning must be True or False, got {global_pruning!r}")
    if mode == "target" and not global_pruning:
        raise ValueError("global_pruning=False: a macs_reduction / params_reduction target ranks the stripes of all "
                         "layers together (layer-normalised scores); cap a layer with max_pruning_ratio, or give "
                         "pruning_ratio for per-layer ratios")
    if mode == "target" and isomorphic:
        raise ValueError("isomorphic: a macs_reduction / params_reduction target ranks all layers together; "
                         "isomorphic ranking scopes act on pruning_ratio")
    roots = options.get("root_module_types")
    if roots is not None:
        if not isinstance(roots, (list, tuple)) or not all(isinstance(t, type) for t in roots):
            raise ValueError(f"root_module_types must be a list of module classes, got {roots!r}")
        roots = tuple(roots)
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if graph_timeout is not None:
        graph_timeout = check_number("graph_timeout", graph_timeout)
        if graph_timeout == 0:
            raise ValueError("graph_timeout must be None (no limit) or a positive number of seconds, got 0")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    parsed = PrunerOptions(
        sr=check_number("sr", sr), target=targets[0] if targets else None, mode=mode,
        threshold=0.0 if mode != "threshold" else check_number("threshold", 0.05 if threshold is None else threshold),
        pruning_ratio=ratio or 0.0, ratio_dict=ratio_dict, global_pruning=global_pruning, isomorphic=isomorphic,
        round_to=round_to, root_module_types=roots, importance=_importance(importance, score),
        iterative_steps=steps, max_pruning_ratio=cap, verify=bool(verify),
        scheduler=options.get("iterative_pruning_ratio_scheduler", linear_scheduler),
        tolerance=check_number("tolerance", DEFAULT_TOLERANCE.get(dtype, 1e-4) if tolerance is None else tolerance),
        graph_timeout=graph_timeout, score=score,
        graph_options={k: options[k] for k in GRAPH_OPTIONS if k in options})
    schedules = [("target", parsed.target[1])] if parsed.target else []
    if mode == "ratio":
        schedules = [("pruning_ratio", r) for r in {parsed.pruning_ratio, *ratio_dict.values()}]
    for what, value in schedules:
        goals = list(parsed.scheduler(value, steps))[1:]
        if len(goals) != steps or any(not 0 <= g <= value + 1e-9 for g in goals):
            raise ValueError(f"iterative_pruning_ratio_scheduler returned {goals} for {steps} steps of {what} "
                             f"{value}; expected {steps} values in [0, {value}] after the initial 0")
    for layer in ignored_layers or ():
        if isinstance(layer, nn.Module):
            parsed.ignored_layers.extend(layer.modules())
        elif isinstance(layer, nn.Parameter):
            parsed.ignored_params.append(layer)
        else:
            raise ValueError(f"ignored_layers must hold nn.Module (or nn.Parameter) objects, got {layer!r} "
                             f"({type(layer).__name__}); pass the modules themselves, e.g. [model.fc]")
    return parsed

"""What ``StripePruner`` accepts, and what it refuses (with the reason), of torch-pruning's ``BasePruner`` options.

Every option ``StripePruner`` accepts has an effect; a ``BasePruner`` option that stripe pruning cannot honour is
refused with a ``TypeError`` (an option with no meaning here) or ``ValueError`` (a value it cannot honour), so a
torch-pruning pipeline never silently gets something else than it asked for.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
from torch_pruning.pruner.algorithms.scheduler import linear_scheduler

from .target import SCORES

#: Default exactness tolerance of step() (max|diff| / max|y|) by parameter dtype.
DEFAULT_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

#: torch-pruning options handed to its DependencyGraph (honoured there).
GRAPH_OPTIONS = ("forward_fn", "output_transform", "unwrapped_parameters", "customized_pruners")

#: BasePruner options stripe pruning cannot honour -> why (TypeError when given).
REFUSED: Dict[str, str] = {
    "pruning_ratio": "a channel ratio; StripePruner removes stripes to a macs_reduction / params_reduction target "
                     "(or by the skeleton's threshold)",
    "ch_sparsity": "the old name of pruning_ratio (a channel ratio); use macs_reduction / params_reduction",
    "pruning_ratio_dict": "per-layer channel ratios; StripePruner ranks stripes of all layers together, capped per "
                          "layer by max_pruning_ratio",
    "ch_sparsity_dict": "the old name of pruning_ratio_dict; use max_pruning_ratio",
    "round_to": "channel rounding; stripe pruning removes only channels that lost every stripe",
    "isomorphic": "isomorphic channel-group ranking; stripes are ranked individually",
    "in_channel_groups": "channel grouping of channel pruning; stripe layers keep their channel layout",
    "out_channel_groups": "channel grouping of channel pruning; stripe layers keep their channel layout",
    "channel_groups": "channel grouping of channel pruning; stripe layers keep their channel layout",
    "num_heads": "attention heads; StripePruner prunes convolutions only",
    "prune_num_heads": "attention heads; StripePruner prunes convolutions only",
    "prune_head_dims": "attention heads; StripePruner prunes convolutions only",
    "head_pruning_ratio": "attention heads; StripePruner prunes convolutions only",
    "head_pruning_ratio_dict": "attention heads; StripePruner prunes convolutions only",
    "root_module_types": "roots of channel groups; StripePruner's groups start at its skeleton convs "
                         "(give torch_pruning_kwargs() to torch-pruning's own pruners instead)",
}

#: BasePruner options StripePruner honours (besides GRAPH_OPTIONS and its own arguments).
HONOURED = ("iterative_steps", "iterative_pruning_ratio_scheduler", "max_pruning_ratio", "global_pruning")


def check_number(name: str, value, minimum: float = 0.0) -> float:
    """``value`` as a finite float ``>= minimum``, else ``ValueError`` naming the option."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be finite and >= {minimum}, got {value!r}")
    return float(value)


def check_fraction(name: str, value, maximum: float = 0.999) -> float:
    """``value`` in ``(0, maximum]``, else ``ValueError``."""
    value = check_number(name, value)
    if not 0.0 < value <= maximum:
        raise ValueError(f"{name} must be in (0, {maximum:g}], got {value!r}")
    return value


@dataclass
class PrunerOptions:
    """The validated configuration of a ``StripePruner`` (see its docstring for each option)."""

    sr: float
    threshold: float
    target: Tuple[str, float] | None
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


def parse_options(model: nn.Module, sr, threshold, macs_reduction, params_reduction, importance, verify, tolerance,
                  graph_timeout, ignored_layers: Sequence | None, options: Dict, score: str = "fs") -> PrunerOptions:
    """Validate ``StripePruner``'s arguments and torch-pruning options (see the module docstring)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("StripePruner got a DistributedDataParallel wrapper: build the pruner on the bare model, "
                         "then wrap it (DDP registers the parameters it all-reduces when it is built, and the Filter "
                         "Skeletons are new parameters): pruner = StripePruner(model, ...); "
                         "ddp_model = DistributedDataParallel(model)")
    refused = sorted(set(options) & set(REFUSED))
    if refused:
        raise TypeError("StripePruner cannot honour " + "; ".join(f"{k}: {REFUSED[k]}" for k in refused))
    unknown = sorted(set(options) - set(HONOURED) - set(GRAPH_OPTIONS))
    if unknown:
        raise TypeError(f"unknown StripePruner option(s) {unknown}; of torch-pruning's BasePruner options it "
                        f"honours {sorted(HONOURED + GRAPH_OPTIONS)} and refuses the others")
    if importance is not None:
        raise TypeError("importance: StripePruner ranks stripes by |FS| * ||W_stripe|| (a channel importance has no "
                        "stripe scores); use swp_plugin.StripeImportance with torch-pruning's channel pruners")
    if options.get("global_pruning", True) is not True:
        raise ValueError("global_pruning=False: StripePruner always ranks the stripes of all layers together "
                         "(layer-normalised scores); cap a layer with max_pruning_ratio")
    given = (("macs", macs_reduction), ("params", params_reduction))
    targets = [(m, check_fraction(f"{m}_reduction", r)) for m, r in given if r is not None]
    if len(targets) > 1:
        raise ValueError("give one target: macs_reduction or params_reduction, not both")
    if targets and threshold is not None:
        raise ValueError(f"threshold={threshold!r} and {targets[0][0]}_reduction={targets[0][1]!r} are mutually "
                         "exclusive: with a target, step() chooses which stripes die")
    steps = int(check_number("iterative_steps", options.get("iterative_steps", 1), 1))
    cap = check_fraction("max_pruning_ratio", options.get("max_pruning_ratio", 1.0), 1.0)
    if not targets and (steps != 1 or cap != 1.0 or "iterative_pruning_ratio_scheduler" in options):
        raise ValueError("iterative_steps, iterative_pruning_ratio_scheduler and max_pruning_ratio act on a target: "
                         "give macs_reduction or params_reduction (with a threshold, training decides what dies)")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    parsed = PrunerOptions(
        sr=check_number("sr", sr), target=targets[0] if targets else None,
        threshold=0.0 if targets else check_number("threshold", 0.05 if threshold is None else threshold),
        iterative_steps=steps, max_pruning_ratio=cap, verify=bool(verify),
        scheduler=options.get("iterative_pruning_ratio_scheduler", linear_scheduler),
        tolerance=check_number("tolerance", DEFAULT_TOLERANCE.get(dtype, 1e-4) if tolerance is None else tolerance),
        graph_timeout=graph_timeout, score=score,
        graph_options={k: options[k] for k in GRAPH_OPTIONS if k in options})
    if parsed.target:
        goals = parsed.step_goals()
        if len(goals) != steps or any(not 0 <= g <= parsed.target[1] + 1e-9 for g in goals):
            raise ValueError(f"iterative_pruning_ratio_scheduler returned {goals} for {steps} steps; expected "
                             f"{steps} reductions in [0, {parsed.target[1]}] after the initial 0")
    for layer in ignored_layers or ():
        if isinstance(layer, nn.Module):
            parsed.ignored_layers.extend(layer.modules())
        elif isinstance(layer, nn.Parameter):
            parsed.ignored_params.append(layer)
        else:
            raise ValueError(f"ignored_layers must hold nn.Module (or nn.Parameter) objects, got {layer!r} "
                             f"({type(layer).__name__}); pass the modules themselves, e.g. [model.fc]")
    return parsed

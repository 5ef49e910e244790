"""``StripePruner``: Stripe-Wise Pruning (Meng et al., NeurIPS 2020) as a torch-pruning pruner.

Usage (the user's own training loop)::

    pruner = StripePruner(model, example_inputs, sr=1e-5, threshold=0.05, ignored_layers=[model.fc])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)  # after!
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(); loss.backward()
        pruner.regularize(model)        # after backward (and scaler.unscale_ with AMP), before step
        optimizer.step()
    pruner.step()                       # prunes in place; rebuild the optimizer for fine-tuning
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import time
import warnings
from typing import Dict, Iterator, List, Mapping, Sequence, Tuple

import torch
import torch.nn as nn
import torch_pruning as tp
from torch.nn.utils import parametrize

from ..layers.replace import replace_module
from ..layers.stripe_conv import StripeConv2d
from ..measure.counting import count_ops_and_params
from ..skeleton import MASK_SAFE_CONVS, attach_channel_mask, attach_skeletons, detach_skeletons, filter_alive
from ..skeleton.attach import probe_input, skeleton_input, skeleton_of
from ..skeleton.parametrizations import FilterSkeleton
from ..skeleton.standardization import unfold_standardization
from .channels import fed_norms, plan_channel_removal, record_input_amax
from .functions import customized_pruners, torch_pruning_kwargs
from .graph import build_graph, flat_outputs, run_model, run_with_hooks, time_limit
from .importance import StripeImportance
from .target import (
    SCORES,
    batchnorm_gains,
    kill_masks,
    ranked_candidates,
    search_kill_count,
    stripe_scores,
    unit_scores,
)

#: torch-pruning options used to trace the graph; the others of BasePruner are kept in ``pruner.options``.
_GRAPH_OPTIONS = ("forward_fn", "output_transform", "unwrapped_parameters", "customized_pruners")
_BASE_PRUNER_OPTIONS = set(inspect.signature(tp.pruner.BasePruner.__init__).parameters) - {
    "self", "model", "example_inputs", "importance", "ignored_layers"
}
#: Default exactness tolerance of step() (max|diff| / max|y|) by parameter dtype.
DEFAULT_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
#: After this many channel groups fail their trial, channel cleanup is given up (stripes are still pruned).
MAX_GROUP_FAILURES = 8

NamedPlan = List[Tuple[str, object, List[int]]]


def _check_number(name: str, value, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be finite and >= {minimum}, got {value!r}")
    return float(value)


def _probe_inputs(example_inputs) -> List:
    """The example inputs and a seeded random batch of the same shapes (float tensors only)."""
    gen = torch.Generator().manual_seed(0)

    def randomize(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x)
        if isinstance(x, (tuple, list)):
            return type(x)(randomize(v) for v in x)
        if isinstance(x, dict):
            return {k: randomize(v) for k, v in x.items()}
        return x

    return [example_inputs, randomize(example_inputs)]


def _check_fraction(name: str, value, maximum: float = 0.999) -> float:
    value = _check_number(name, value)
    if not 0.0 < value <= maximum:
        raise ValueError(f"{name} must be in (0, {maximum:g}], got {value!r}")
    return value


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


class StripePruner(tp.pruner.BasePruner):
    """Learns a Filter Skeleton per conv during training and prunes stripes and dead channels.

    A ``tp.pruner.BasePruner`` (same constructor conventions, ``regularize`` / ``update_regularizer`` /
    ``step`` / ``step(interactive=True)``, ``DG``, ``ignored_layers``). Its constructor builds only the
    DependencyGraph: BasePruner's precomputation of channel-ratio state is not used by SWP and is slow or
    fails on some timm models. If the graph cannot be built (an error, or longer than ``graph_timeout``
    seconds), SWP still prunes stripes and skips the channel cleanup, with one warning.

    Args:
        model: the network; its convs get Filter Skeletons (parametrizations) at construction.
        example_inputs: inputs for DepGraph tracing and for the exactness checks of ``step()``.
        sr: L1 strength on the skeletons (the paper's alpha, default 1e-5).
        threshold: stripes with ``|FS| <= threshold`` die (the paper's delta, default 0.05).
        ignored_layers: modules (and their submodules) left untouched, e.g. the classifier.
        verify: ``step()`` checks that outputs do not change (``max|diff| <= tolerance * max|y|``;
            default tolerance by dtype: 1e-4 for fp32, 1e-2 fp16, 5e-2 bf16).
        graph_timeout: seconds allowed for each DependencyGraph build/analysis (main thread only).
        score: stripe ranking of a target (``macs_reduction`` / ``params_reduction``): ``'fs'`` =
            ``|FS| * ||W_stripe||``; ``'fs_bn'`` = that times the gain ``|gamma| / sqrt(running_var + eps)`` of
            the BatchNorm the filter feeds (measured better in ``docs/results.md``'s granularity ablation).
        **kwargs: other ``tp.pruner.BasePruner`` options (``forward_fn``, ``output_transform``,
            ``customized_pruners``, ``unwrapped_parameters``, ...), kept in ``pruner.options``.

    Attributes:
        skeletons: qualified conv name -> Filter Skeleton parameter, ``(out, kh, kw)`` for a conv.
        skipped: qualified conv name -> why it got no skeleton.
        notes: what ``step()`` left in place and why (filled by ``step()``).
        graph_error: why the DependencyGraph is unavailable (``None`` when it works).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs,
        sr: float = 1e-5,
        threshold: float | None = None,
        ignored_layers: Sequence[nn.Module] | None = None,
        macs_reduction: float | None = None,
        params_reduction: float | None = None,
        importance: tp.importance.Importance | None = None,
        verify: bool = True,
        tolerance: float | None = None,
        graph_timeout: float | None = 120.0,
        score: str = "fs",
        **kwargs,
    ) -> None:
        self.sr = _check_number("sr", sr)
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        self.score = score
        given = (("macs", macs_reduction), ("params", params_reduction))
        targets = [(m, _check_fraction(f"{m}_reduction", r)) for m, r in given if r is not None]
        if len(targets) > 1:
            raise ValueError("give one target: macs_reduction or params_reduction, not both")
        if targets and threshold is not None:
            raise ValueError(f"threshold={threshold!r} and {targets[0][0]}_reduction={targets[0][1]!r} are mutually "
                             "exclusive: with a target, step() chooses which stripes die")
        self.target: Tuple[str, float] | None = targets[0] if targets else None
        self.threshold = 0.0 if targets else _check_number("threshold", 0.05 if threshold is None else threshold)
        self.iterative_steps = int(_check_number("iterative_steps", kwargs.get("iterative_steps", 1), 1))
        self.max_pruning_ratio = _check_fraction("max_pruning_ratio", kwargs.get("max_pruning_ratio", 1.0), 1.0)
        self.target_history: List[Tuple[float, float]] = []
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        tolerance = DEFAULT_TOLERANCE.get(dtype, 1e-4) if tolerance is None else tolerance
        self.tolerance = _check_number("tolerance", tolerance)
        self.verify = verify
        self.graph_timeout = graph_timeout
        unknown = set(kwargs) - _BASE_PRUNER_OPTIONS
        if unknown:
            raise TypeError(f"unknown StripePruner option(s) {sorted(unknown)}; torch-pruning's BasePruner "
                            f"options are {sorted(_BASE_PRUNER_OPTIONS)}")
        self.model = model
        self.importance = importance if importance is not None else StripeImportance()
        self.ignored_layers: List[nn.Module] = []
        self.ignored_params: List[nn.Parameter] = []
        for layer in ignored_layers or ():
            if isinstance(layer, nn.Module):
                self.ignored_layers.extend(layer.modules())
            elif isinstance(layer, nn.Parameter):
                self.ignored_params.append(layer)
            else:
                raise ValueError(
                    f"ignored_layers must hold nn.Module (or nn.Parameter) objects, got {layer!r} "
                    f"({type(layer).__name__}); pass the modules themselves, e.g. [model.fc]"
                )
        self.notes: List[str] = [
            f"{name}: {cls} replaced by a plain conv with a WeightStandardization parametrization (same function)"
            for name, cls in unfold_standardization(model, self.ignored_layers)
        ]
        self._check_runs(model, example_inputs)
        self.example_inputs = example_inputs
        self.dense_counts = count_ops_and_params(model, example_inputs) if self.target else None
        self._graph_options = {k: kwargs.pop(k) for k in _GRAPH_OPTIONS if k in kwargs}
        self._graph_options["customized_pruners"] = {
            **customized_pruners(), **(self._graph_options.get("customized_pruners") or {})
        }
        self._graph_options["ignored_params"] = self.ignored_params
        self.options = {"root_module_types": torch_pruning_kwargs()["root_module_types"], **kwargs}
        self.current_step = 0
        self.DG: tp.DependencyGraph | None = None
        self.graph_error: str | None = None
        try:
            with time_limit(graph_timeout):
                self.DG = build_graph(model, example_inputs, self._graph_options)
        except Exception as err:  # noqa: BLE001 - any tracing failure means: no channel cleanup
            self.graph_error = _short(err)
            warnings.warn(
                f"StripePruner: torch-pruning's DependencyGraph is unavailable for this model ({self.graph_error}); "
                "stripes will be pruned, but no channel cleanup (dead filters stay as empty output channels).",
                stacklevel=2,
            )

        fs_modules, self.skipped = attach_skeletons(model, self.ignored_layers)
        if not fs_modules:
            raise ValueError(
                "StripePruner found no eligible conv in the model (every nn.Conv2d is ignored or excluded: "
                f"{self.skipped or 'the model has none'}); nothing to prune."
            )
        self._names: List[str] = list(fs_modules)
        self._modules_by_name: Dict[str, nn.Module] = dict(model.named_modules())
        module_names = {id(m): n for n, m in self._modules_by_name.items()}
        #: conv name -> [(module name, tensor name)] of the params masked when one of its filters dies
        self._mask_targets: Dict[str, List[Tuple[str, str]]] = {}
        for name in self._names:
            layer = self._modules_by_name[name]
            norms = fed_norms(self.DG, layer) if self.DG is not None else []
            targets = [(module_names[id(n)], t) for n in norms for t in ("weight", "bias")]
            if getattr(layer, "bias", None) is not None:
                targets.append((name, "bias"))
            for module_name, tensor_name in targets:
                attach_channel_mask(self._modules_by_name[module_name], tensor_name)
            self._mask_targets[name] = targets
        self._stepped = False

    # ------------------------------------------------------------------ public state
    def _skeleton(self, name: str, modules: Mapping[str, nn.Module] | None = None) -> FilterSkeleton:
        return skeleton_of((modules or self._modules_by_name)[name])

    def _check_attached(self) -> None:
        """Every skeleton conv is still in the model, with its Filter Skeleton."""
        for name in self._names:
            layer = self._modules_by_name[name]
            try:
                in_model = self.model.get_submodule(name) is layer
            except AttributeError:
                in_model = False
            if not in_model or not any(isinstance(p, FilterSkeleton) for p in getattr(
                    getattr(layer, "parametrizations", {}), "weight", [])):
                raise RuntimeError(
                    f"the Filter Skeleton of '{name}' is gone (the conv was replaced or its parametrization "
                    "removed after the StripePruner was built); build a new StripePruner for this model."
                )

    @property
    def skeletons(self) -> Mapping[str, nn.Parameter]:
        """Qualified conv name -> Filter Skeleton ``(out, kh, kw)`` (``(S,)`` for a StripeConv2d)."""
        if self._stepped:
            return dict(self._final_skeletons)
        return {name: self._skeleton(name).skeleton for name in self._names}

    def stripe_sparsity(self) -> float:
        """Fraction of stripes that are dead (over all skeleton layers); after ``step()``, its value then."""
        if self._stepped:
            return self._final_sparsity
        masks = [self._skeleton(name).alive for name in self._names]
        return sum(int((~m).sum()) for m in masks) / max(1, sum(m.numel() for m in masks))

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def regularize(self, model: nn.Module | None = None, reg: float | None = None) -> None:
        """The reference training step; call after ``loss.backward()``, before ``optimizer.step()``.

        Adds ``reg * sign(FS)`` (default ``sr``) to every skeleton's gradient, kills stripes with
        ``|FS| <= threshold`` for good (FS and its grad zeroed, masked in forward), and for a filter with
        no stripe left masks the affine params (and grads) of the BatchNorm it feeds and its own bias, so
        the channel outputs exactly zero. With AMP call ``scaler.unscale_(optimizer)`` first. ``model`` is
        accepted for torch-pruning compatibility (a DDP wrapper is fine); the pruner's own model is used.
        """
        reg = self.sr if reg is None else _check_number("reg", reg)
        self._require_not_stepped("regularize")
        self._check_attached()
        skeletons = [self._skeleton(name) for name in self._names]
        if all(fs.skeleton.grad is None for fs in skeletons):
            raise RuntimeError(
                "regularize() found no gradient on any Filter Skeleton: call it after loss.backward() "
                "and before optimizer.step(), and build the optimizer after the StripePruner."
            )
        for name, fs in zip(self._names, skeletons):
            if fs.skeleton.grad is not None:
                fs.skeleton.grad.add_(torch.sign(fs.skeleton) * reg)
            had_stripes = bool(fs.alive.any())
            self._kill_stripes(name, fs.alive & (fs.skeleton.abs() > self.threshold))
            if had_stripes and not fs.alive.any():
                warnings.warn(
                    f"StripePruner: every stripe of '{name}' is now dead (|FS| <= threshold={self.threshold:g}); "
                    "the layer outputs only its bias and step() keeps one empty channel for it. Lower sr or "
                    "threshold if this is not wanted.",
                    stacklevel=2,
                )

    def update_regularizer(self) -> None:
        """Re-synchronise the channel masks with the stripe masks (e.g. after loading a checkpoint)."""
        self._require_not_stepped("update_regularizer")
        for name in self._names:
            self._kill_stripes(name, self._skeleton(name).alive)

    @torch.no_grad()
    def _kill_stripes(self, name: str, alive: torch.Tensor, modules: Mapping[str, nn.Module] | None = None,
                      mask_channels: bool = True):
        """Mark the stripes of ``name`` outside ``alive`` dead; with ``mask_channels``, also zero the bias and
        norm channels of the filters left without a stripe."""
        modules = modules or self._modules_by_name
        fs = self._skeleton(name, modules)
        fs.alive.copy_(alive)
        fs.skeleton.mul_(alive)
        if fs.skeleton.grad is not None:
            fs.skeleton.grad.mul_(alive)
        if not mask_channels:
            return
        channels = filter_alive(modules[name], alive)
        for module_name, tensor_name in self._mask_targets[name]:
            parametrization = modules[module_name].parametrizations[tensor_name]
            parametrization[0].mask.copy_(channels)
            parametrization.original.mul_(channels)
            if parametrization.original.grad is not None:
                parametrization.original.grad.mul_(channels)

    def detach(self, merge: bool = True) -> None:
        """Take every skeleton and mask off the model without pruning (``merge``: bake them in)."""
        self._require_not_stepped("detach")
        self._final_skeletons = dict(self.skeletons)
        self._final_sparsity = self.stripe_sparsity()
        detach_skeletons(self.model, merge=merge)
        self._stepped = True

    # ------------------------------------------------------------------ pruning
    def step(self, interactive: bool = False) -> Iterator[tp.Group] | None:
        """Merge the skeletons into the weights, remove dead channels, convert convs to ``StripeConv2d``.

        Everything is first rehearsed on a copy of the model (channel groups that torch-pruning cannot
        prune exactly are dropped there); the model itself is changed only once the rehearsal reproduced
        its outputs. With ``interactive=True`` returns a generator of the channel-removal groups (call
        ``group.prune()`` on each, as with torch-pruning); conversion and the final check run when the
        generator is exhausted.
        """
        self._require_not_stepped("step")
        self._validate()
        self.current_step += 1
        if self.target is not None:
            steps = self.iterative_steps
            self._reach_target(self.target[1] * min(self.current_step, steps) / steps)
            if self.current_step < steps:  # an intermediate step of a gradual schedule: stripes killed only
                return iter(()) if interactive else None
        if interactive:
            return self._prune()
        for group in self._prune():
            group.prune()
        return None

    def _prune(self) -> Iterator[tp.Group]:
        model = self.model
        was_training = model.training
        model.eval()
        probes = _probe_inputs(self.example_inputs)
        with torch.no_grad():
            reference = [flat_outputs(run_model(model, p)) for p in probes]
        plan, notes = self._rehearse(probes, reference)
        self.notes += notes
        self._final_skeletons = dict(self.skeletons)
        self._final_sparsity = self.stripe_sparsity()
        self._merge(model)
        self._stepped = True
        self.DG = self._graph(model, required=False) if plan else self.DG
        if plan and self.DG is None:  # rehearsed fine, but the graph of the model itself did not build in time
            self.notes.append("channel cleanup skipped: DependencyGraph of the merged model unavailable")
            plan = []
        if plan:
            modules = dict(model.named_modules())
            for name, fn, idxs in plan:
                yield self.DG.get_pruning_group(modules[name], fn, idxs)
        self._convert(model)
        self.DG = self._graph(model, required=False)
        mismatch = self._mismatch(model, probes, reference) if self.verify else None
        model.train(was_training)
        if mismatch:
            raise RuntimeError(f"step() changed the model's outputs although its rehearsal did not: {mismatch}")
        self._warn_skipped_cleanup()

    def _warn_skipped_cleanup(self) -> None:
        """One warning naming the channel cleanup torch-pruning could not do (the details are in ``notes``)."""
        skipped = [n for n in self.notes if "torch-pruning" in n or "channel cleanup" in n]
        if skipped:
            warnings.warn(
                f"StripePruner.step(): channel cleanup skipped in {len(skipped)} place(s), stripes pruned anyway "
                f"(dead filters there stay as zero channels), e.g. {skipped[0]}. All of it: pruner.notes.",
                stacklevel=3,
            )

    def _rehearse(self, probes: List, reference) -> Tuple[NamedPlan, List[str]]:
        """Run merge, channel cleanup and conversion on copies; return the channel plan that keeps the
        function, and notes. Raises ``RuntimeError`` if even stripe-only pruning changes the outputs."""
        notes: List[str] = []
        plan: NamedPlan = []
        trial = self._merged_copy()
        plan, notes = self._plan_on(trial, probes)
        failure = self._try_plan(trial, plan, probes, reference)
        if failure is not None and plan:
            plan, group_notes = self._plan_group_by_group(plan, probes, reference)
            notes += group_notes
            failure = self._try_plan(self._merged_copy(), plan, probes, reference)
        if failure is not None:
            raise RuntimeError(
                f"step() would change the model's outputs ({failure}); the model was left as it was. "
                "This model has a layer the stripe conversion does not reproduce: please report it, or "
                "pass verify=False to prune anyway."
            )
        return plan, notes

    def _plan_on(self, trial: nn.Module, probes: List) -> Tuple[NamedPlan, List[str]]:
        """The channel-removal plan (by module names) for a merged copy; empty without a graph."""
        if self.DG is None:
            return [], []
        try:
            with time_limit(self.graph_timeout):
                graph = build_graph(trial, self.example_inputs, self._graph_options)
                amax = record_input_amax(trial, probes)
                modules = dict(trial.named_modules())
                module_plan, notes = plan_channel_removal(graph, [modules[n] for n in self._names], amax)
            return [(graph._module2name[m], fn, idxs) for m, fn, idxs in module_plan], notes
        except Exception as err:  # noqa: BLE001
            return [], [f"channel cleanup skipped: DependencyGraph analysis failed ({_short(err)})"]

    # ------------------------------------------------------------------ targets
    def _reach_target(self, goal: float) -> None:
        """Kill the least important alive stripes so that the pruned model's metric drops by ``goal``."""
        metric, _ = self.target
        modules = self._modules_by_name
        fs = [self._skeleton(n) for n in self._names]
        weights = [skeleton_input(modules[n]) for n in self._names]
        gains = None
        if self.score == "fs_bn":  # the BatchNorm each conv feeds (the one whose weight a dead filter masks)
            norms = [[modules[m] for m, t in self._mask_targets[n] if t == "weight"] for n in self._names]
            gains = batchnorm_gains([modules[n] for n in self._names], [b[0] if len(b) == 1 else None for b in norms])
        scores = stripe_scores([f.skeleton for f in fs], weights, [f.alive for f in fs], gains)
        costs = self._stripe_costs(metric)
        units = self._kill_units()
        if units is not None:  # coarser granularity: rank and kill groups of stripes
            scores, sizes = unit_scores(scores, units)
            costs = [size * cost for size, cost in zip(sizes, costs)]
        layers, flats, cost = ranked_candidates(scores, costs, self.max_pruning_ratio)
        dense = self.dense_counts[0 if metric == "macs" else 1]
        shapes = [s.shape for s in scores]

        def kills(k: int) -> List[torch.Tensor]:
            masks = kill_masks(shapes, layers, flats, k)
            return masks if units is None else [m[u.to(torch.long).cpu()] for m, u in zip(masks, units)]

        probes = _probe_inputs(self.example_inputs)

        def measure(k: int) -> float:
            counts = self._rehearsed_counts(kills(k), probes)
            return 1.0 - counts[0 if metric == "macs" else 1] / dense

        start = measure(0)
        cumulative = torch.cat([torch.zeros(1), torch.cumsum(cost, 0)]) / dense
        k, reached = search_kill_count(goal, lambda i: start + float(cumulative[i]), measure, len(layers))
        if reached < goal - 0.03 and (reachable := measure(len(layers))) < goal - 0.03:
            raise ValueError(
                f"{metric}_reduction target {goal:.3f} is unreachable: killing every stripe allowed by "
                f"max_pruning_ratio={self.max_pruning_ratio:g} gives {reachable:.3f} (ignored layers and "
                "non-conv layers keep the rest). Lower the target or raise max_pruning_ratio."
            )
        for name, kill in zip(self._names, kills(k)):
            self._kill_stripes(name, self._skeleton(name).alive & ~kill.to(self._skeleton(name).alive.device))
        self.target_history.append((goal, reached))
        if abs(reached - goal) > 0.03:
            warnings.warn(f"StripePruner: reached {metric}_reduction {reached:.3f} for a target of {goal:.3f} "
                          "(the closest the stripe granularity allows)", stacklevel=3)

    def _kill_units(self) -> List[torch.Tensor] | None:
        """Per skeleton layer, FS-shaped ids of the groups of stripes a target kills together; ``None``: each
        stripe on its own (SWP). A subclass sets a coarser granularity
        (``swp_plugin.recipes.baselines.ShapeWisePruner``: one kernel position across all filters of a layer)."""
        return None

    def _stripe_costs(self, metric: str) -> List[float]:
        """Per skeleton layer, what one stripe costs: ``C_in/groups`` params, times output positions for MACs."""
        if metric == "macs" and not hasattr(self, "_positions"):
            self._positions = _output_positions(self.model, [self._modules_by_name[n] for n in self._names],
                                                self.example_inputs)
        costs = []
        for i, name in enumerate(self._names):
            layer = self._modules_by_name[name]
            per_stripe = layer.in_channels // getattr(layer, "groups", 1)
            costs.append(per_stripe * (self._positions[i] if metric == "macs" else 1))
        return costs

    def _rehearsed_counts(self, kills: List[torch.Tensor], probes: List) -> Tuple[float, int]:
        """MACs and params the model would have after killing ``kills`` and a full step() (on a copy)."""
        trial = self._merged_copy(kills)
        plan, _ = self._plan_on(trial, probes)
        if self._try_plan(trial, plan, probes, None) is not None:  # cleanup failed there: stripes only
            trial = self._merged_copy(kills)
            self._convert(trial)
        counts = count_ops_and_params(trial, self.example_inputs)
        return counts[0], counts[1]

    def _plan_group_by_group(self, plan: NamedPlan, probes, reference) -> Tuple[NamedPlan, List[str]]:
        """Keep the channel groups that can be pruned exactly (after a failed full plan): halves of the plan
        are tried on fresh copies, recursively, so ``f`` failing groups among ``n`` cost about ``f log n``
        trials. Stops after :data:`MAX_GROUP_FAILURES` failures or ``graph_timeout`` seconds."""
        notes: List[str] = []
        deadline = time.monotonic() + (self.graph_timeout or float("inf"))

        def accept(accepted: NamedPlan, items: NamedPlan) -> NamedPlan:
            if not items or len(notes) >= MAX_GROUP_FAILURES or time.monotonic() > deadline:
                return accepted
            failure = self._try_plan(self._merged_copy(), accepted + items, probes, reference, convert=False)
            if failure is None:
                return accepted + items
            if len(items) == 1:
                notes.append(f"{items[0][0]}: channel group kept, its channel cleanup skipped ({failure})")
                return accepted
            half = len(items) // 2
            return accept(accept(accepted, items[:half]), items[half:])

        accepted = accept([], plan)
        if len(notes) >= MAX_GROUP_FAILURES or time.monotonic() > deadline:
            notes.append("channel cleanup stopped early (too many failing groups or graph_timeout reached)")
        return accepted, notes

    def _try_plan(self, trial: nn.Module, plan: NamedPlan, probes, reference, convert: bool = True) -> str | None:
        """Prune ``plan`` (and convert) on ``trial``; ``None`` if its outputs match, else what went wrong."""
        try:
            if plan:
                with time_limit(self.graph_timeout):
                    graph = build_graph(trial, self.example_inputs, self._graph_options)
                    modules = dict(trial.named_modules())
                    for name, fn, idxs in plan:
                        graph.get_pruning_group(modules[name], fn, idxs).prune()
            if convert:
                self._convert(trial)
            return None if reference is None else self._mismatch(trial, probes, reference)
        except Exception as err:  # noqa: BLE001
            return _short(err)

    def _merged_copy(self, kills: List[torch.Tensor] | None = None) -> nn.Module:
        """A copy of the model with ``kills`` (FS-shaped bool masks) killed and the skeletons merged."""
        trial = _copy_model(self.model)
        modules = dict(trial.named_modules())
        for name, kill in zip(self._names, kills or ()):
            alive = self._skeleton(name, modules).alive
            self._kill_stripes(name, alive & ~kill.to(alive.device), modules)
        self._merge(trial)
        return trial

    @torch.no_grad()
    def _merge(self, model: nn.Module) -> None:
        # Prune what regularize() killed (and stripes whose FS is exactly 0); a stripe that the very last
        # optimizer step pushed under the threshold still computes something and is kept, so the merge
        # never changes the function (regularize() would kill it at the next iteration). A filter whose FS
        # values are all exactly 0 but were never killed keeps its bias / norm channels: they still compute.
        modules = dict(model.named_modules())
        for name in self._names:
            fs = self._skeleton(name, modules)
            self._kill_stripes(name, fs.alive & fs.skeleton.ne(0), modules, mask_channels=False)
        detach_skeletons(model, merge=True)

    def _convert(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        for name in self._names:
            layer = modules[name]
            if isinstance(layer, StripeConv2d):
                layer.select_stripes(layer.weight.detach().ne(0).any(dim=1))
            elif layer.groups != 1:
                self._note(model, f"{name}: grouped conv (groups={layer.groups}) kept dense, dead stripes zeroed")
            else:
                stripe = StripeConv2d.from_dense(layer)
                if _same_function(layer, stripe):
                    replace_module(model, layer, stripe)
                else:
                    self._note(model, f"{name}: {type(layer).__name__} forward differs from a plain conv; kept dense")

    def _note(self, model: nn.Module, text: str) -> None:
        if model is self.model:
            self.notes.append(text)

    def _graph(self, model: nn.Module, required: bool = True) -> tp.DependencyGraph | None:
        try:
            with time_limit(self.graph_timeout):
                return build_graph(model, self.example_inputs, self._graph_options)
        except Exception:
            if required:
                raise
            return None

    @torch.no_grad()
    def _mismatch(self, model: nn.Module, probes: List, reference) -> str | None:
        model.eval()
        for ref, probe in zip(reference, probes):
            out = flat_outputs(run_model(model, probe))
            for r, o in zip(ref, out):
                if r.shape != o.shape:
                    return f"output shape {tuple(r.shape)} became {tuple(o.shape)}"
                err = float((r - o).abs().max()) / (float(r.abs().max()) or 1.0)
                if not err <= self.tolerance:
                    return f"max|diff|/max|y| = {err:.3g} > {self.tolerance:g}"
        return None

    # ------------------------------------------------------------------ checks
    def _require_not_stepped(self, what: str) -> None:
        if self._stepped:
            raise RuntimeError(
                f"{what}() after step()/detach(): the skeletons are already merged and pruned. "
                "Build a new StripePruner for another round."
            )

    def _validate(self) -> None:
        self._check_attached()
        for name in self._names:
            parametrized = self._modules_by_name[name].parametrizations["weight"]
            if not torch.isfinite(skeleton_of(self._modules_by_name[name]).skeleton).all():
                raise ValueError(f"Filter Skeleton of '{name}' holds NaN/Inf; fix training (lower lr/sr) first")
            if not torch.isfinite(parametrized.original).all():
                raise ValueError(f"weight of '{name}' holds NaN/Inf; the model cannot be pruned exactly")

    @staticmethod
    def _check_runs(model: nn.Module, example_inputs) -> None:
        was_training = model.training
        try:
            with torch.no_grad():
                run_model(model.eval(), example_inputs)
        except Exception as err:  # noqa: BLE001 - re-raised with context
            raise ValueError(
                f"example_inputs do not run through the model ({type(err).__name__}: {err}). "
                "Pass inputs of the shape, dtype and device the model expects."
            ) from err
        finally:
            model.train(was_training)


@torch.no_grad()
def _output_positions(model: nn.Module, layers: List[nn.Module], example_inputs) -> List[int]:
    """Output positions ``H_out * W_out`` of each layer for one forward of the example inputs."""
    sizes: Dict[int, int] = {}

    def record(module, inputs, output) -> None:
        sizes.setdefault(id(module), output.shape[-2] * output.shape[-1])

    run_with_hooks(model, layers, record, example_inputs)
    return [sizes.get(id(m), 0) for m in layers]


def _copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also gives each parametrized module of the copy its own class: deepcopy shares
    the class torch.nn.utils.parametrize creates, and removing a parametrization deletes the property from
    that class - i.e. from the original model too."""
    trial = copy.deepcopy(model)
    for module in trial.modules():
        if parametrize.is_parametrized(module):
            cls = type(module)
            namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
            module.__class__ = type(cls.__name__, cls.__bases__, namespace)
    return trial


@torch.no_grad()
def _same_function(conv: nn.Conv2d, stripe: StripeConv2d) -> bool:
    """True for the conv classes known to be plain convolutions, else checked on a probe input."""
    if type(conv) in MASK_SAFE_CONVS:
        return True
    x = probe_input(conv)
    return torch.allclose(stripe(x), conv(x), rtol=1e-4, atol=1e-5)

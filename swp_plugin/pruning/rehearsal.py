"""The rehearsal of ``StripePruner.step()``: merge, channel removal and conversion tried on copies of the model
first, checked against the model's outputs, so that the model itself changes only when the result is exact.

One :class:`Rehearsal` owns the probe inputs (the example inputs and a seeded random batch of the same shapes),
the reference outputs, and the copy -> merge -> plan -> trial -> mismatch steps. Channel groups that
torch-pruning cannot prune exactly (index errors on splits / concats, attention that mixes channels) are found by
trying halves of the plan on fresh copies, recursively, so ``f`` failing groups among ``n`` cost about
``f log n`` trials.
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Callable, Dict, List, Tuple

import torch
import torch.nn as nn

from ..layers.stripe_conv import StripeConv2d
from ..measure.counting import count_ops_and_params
from ..utils import copy_model, flat_outputs, probe_inputs, time_limit
from .channels import plan_channel_removal, record_input_amax
from .convert import convert_to_stripes
from .graph import build_graph
from .notes import CLEANUP_SKIPPED, Note

if TYPE_CHECKING:
    from .options import PrunerOptions
    from .skeletons import Skeletons

#: After this many channel groups fail their trial, channel cleanup is given up (stripes are still pruned).
MAX_GROUP_FAILURES = 8

#: ``(module name, torch-pruning pruning function, root channel indices)`` per channel group to remove
NamedPlan = List[Tuple[str, object, List[int]]]


def short(err: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters)."""
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


class Rehearsal:
    """Trials of one ``step()`` of ``model`` on copies (see the module docstring).

    Args:
        model: the model being pruned (never changed here).
        state: its skeletons (kill / merge on the copies go through it).
        example_inputs: the pruner's example inputs (the probes are them and a seeded random batch).
        forward: ``forward(model, inputs)`` (torch-pruning's ``forward_fn`` or a plain call).
        options: the pruner's options (tolerance, verify, graph_timeout, root_module_types).
        graph_options: what the DependencyGraph is built with (customized_pruners included).
        use_graph: plan a channel cleanup (False: stripes only).
    """

    def __init__(self, model: nn.Module, state: Skeletons, example_inputs, forward: Callable,
                 options: PrunerOptions, graph_options: Dict, use_graph: bool) -> None:
        self.model, self.state, self.example_inputs, self.forward = model, state, example_inputs, forward
        self.options, self.graph_options, self.use_graph = options, graph_options, use_graph
        self.custom_types = tuple(t for t in (graph_options.get("customized_pruners") or {})
                                  if isinstance(t, type) and t is not StripeConv2d)
        self.probes = probe_inputs(example_inputs)
        self.reference: List[List[torch.Tensor]] = []

    def record(self, model: nn.Module | None = None) -> None:
        """The outputs every later :meth:`mismatch` compares with: ``model``'s (default: the pruned model's) now,
        in eval mode. ``ValueError`` if they are not finite (nothing can be checked against NaN)."""
        model = model if model is not None else self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                self.reference = [flat_outputs(self.forward(model, p)) for p in self.probes]
        finally:
            model.train(was_training)
        for i, outputs in enumerate(self.reference):
            if not all(torch.isfinite(o).all() for o in outputs):
                where = "the example inputs" if i == 0 else "a random batch shaped like the example inputs"
                raise ValueError(f"the model's outputs on {where} hold NaN/Inf (weights, statistics and inputs are "
                                 "finite: an overflow, e.g. in float16?); step() cannot check exactness. Run it in "
                                 "float32, or pass inputs of the scale the model expects.")

    def run(self) -> Tuple[NamedPlan, List[Note]]:
        """Record the model's outputs now (eval mode), then find the channel plan that keeps them, and notes;
        ``RuntimeError`` if even stripe-only pruning changes the outputs (the model is untouched), unless
        ``verify=False``: then a warning says by how much, and the plan is returned."""
        self.record()
        trial = self.merged_copy()
        plan, notes = self.plan_on(trial)
        failure = self.try_plan(trial, plan)
        if failure is not None and plan:
            plan, group_notes = self.group_by_group(plan)
            notes += group_notes
            failure = self.try_plan(self.merged_copy(), plan)
        if failure is not None:
            if not self.options.verify:
                warnings.warn(f"StripePruner.step(verify=False): the pruned model's outputs differ ({failure}); "
                              "pruned anyway, as asked.", stacklevel=4)
                return plan, notes
            raise RuntimeError(
                f"step() would change the model's outputs ({failure}); the model was left as it was. "
                "This model has a layer the stripe conversion does not reproduce: please report it, or "
                "build the pruner with verify=False to prune anyway (the outputs will then differ that much)."
            )
        return plan, notes

    def merged_copy(self, kills: List[torch.Tensor] | None = None) -> nn.Module:
        """A copy of the model with ``kills`` (FS-shaped bool masks per skeleton layer) killed, merged."""
        trial = copy_model(self.model)
        if kills:
            self.state.kill_masks(kills, dict(trial.named_modules()))
        self.state.merge(trial)
        return trial

    def plan_on(self, trial: nn.Module) -> Tuple[NamedPlan, List[Note]]:
        """The channel-removal plan (by module names) for a merged copy; empty without a graph."""
        if not self.use_graph:
            return [], []
        timeout = self.options.graph_timeout
        roots_types = self.options.root_module_types
        try:
            with time_limit(timeout):
                graph = build_graph(trial, self.example_inputs, self.graph_options, timeout)
                amax = record_input_amax(trial, self.probes, self.forward)
                modules = dict(trial.named_modules())
                names = {m: n for n, m in modules.items()}
                roots = [modules[n] for n in self.state.names
                         if roots_types is None or isinstance(modules[n], roots_types)]
                plan, notes = plan_channel_removal(graph, roots, amax, names, custom_types=self.custom_types)
            return [(names[m], fn, idxs) for m, fn, idxs in plan], notes
        except Exception as err:  # any failure of the graph analysis: no channel cleanup, said in a note
            return [], [Note(CLEANUP_SKIPPED, "", f"channel cleanup skipped: DependencyGraph analysis failed "
                                                   f"({short(err)})")]

    def try_plan(self, trial: nn.Module, plan: NamedPlan, check: bool = True, convert: bool = True) -> str | None:
        """Prune ``plan`` (and convert) on ``trial``; ``None`` if its outputs match (or ``check=False`` and it
        ran), else what went wrong."""
        try:
            if plan:
                timeout = self.options.graph_timeout
                with time_limit(timeout):
                    graph = build_graph(trial, self.example_inputs, self.graph_options, timeout)
                    modules = dict(trial.named_modules())
                    for name, fn, idxs in plan:
                        graph.get_pruning_group(modules[name], fn, idxs).prune()
            if convert:
                convert_to_stripes(trial, self.state.names)
            return self.mismatch(trial) if check else None
        except Exception as err:  # a failing trial is an answer, not an error
            return short(err)

    def group_by_group(self, plan: NamedPlan) -> Tuple[NamedPlan, List[Note]]:
        """Keep the channel groups that can be pruned exactly (after a failed full plan); stops after
        :data:`MAX_GROUP_FAILURES` failures or ``graph_timeout`` seconds."""
        notes: List[Note] = []
        deadline = time.monotonic() + (self.options.graph_timeout or float("inf"))

        def accept(accepted: NamedPlan, items: NamedPlan) -> NamedPlan:
            if not items or len(notes) >= MAX_GROUP_FAILURES or time.monotonic() > deadline:
                return accepted
            failure = self.try_plan(self.merged_copy(), accepted + items, convert=False)
            if failure is None:
                return accepted + items
            if len(items) == 1:
                notes.append(Note(CLEANUP_SKIPPED, items[0][0], f"channel group kept, its channel cleanup skipped "
                                                                 f"({failure})"))
                return accepted
            half = len(items) // 2
            return accept(accept(accepted, items[:half]), items[half:])

        accepted = accept([], plan)
        if len(notes) >= MAX_GROUP_FAILURES or time.monotonic() > deadline:
            notes.append(Note(CLEANUP_SKIPPED, "", "channel cleanup stopped early (too many failing groups or "
                                                   "graph_timeout reached)"))
        return accepted, notes

    def counts(self, kills: List[torch.Tensor]) -> Tuple[float, int]:
        """MACs and params the model would have after killing ``kills`` and a full ``step()``."""
        trial = self.merged_copy(kills)
        plan, _ = self.plan_on(trial)
        if self.try_plan(trial, plan, check=False) is not None:  # cleanup failed there: stripes only
            trial = self.merged_copy(kills)
            convert_to_stripes(trial, self.state.names)
        counts = count_ops_and_params(trial, self.example_inputs)
        return counts[0], counts[1]

    @torch.no_grad()
    def mismatch(self, model: nn.Module) -> str | None:
        """What differs between ``model``'s outputs on the probes and the reference (recorded by :meth:`run`),
        or ``None``."""
        model.eval()
        tolerance = self.options.tolerance
        for ref, probe in zip(self.reference, self.probes):
            out = flat_outputs(self.forward(model, probe))
            if len(out) != len(ref):
                return f"{len(ref)} output tensors became {len(out)}"
            for r, o in zip(ref, out):
                if r.shape != o.shape:
                    return f"output shape {tuple(r.shape)} became {tuple(o.shape)}"
                err = float((r - o).abs().max()) / (float(r.abs().max()) or 1.0)
                if not err <= tolerance:
                    return f"max|diff|/max|y| = {err:.3g} > {tolerance:g}"
        return None

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
from typing import TYPE_CHECKING, List, Tuple

import torch
import torch.nn as nn

from ..measure.counting import count_ops_and_params
from ..utils import copy_model, flat_outputs, probe_inputs, time_limit
from .channels import plan_channel_removal, record_input_amax
from .convert import convert_to_stripes
from .graph import build_graph
from .notes import CLEANUP_SKIPPED, Note

if TYPE_CHECKING:
    from .pruner import StripePruner

#: After this many channel groups fail their trial, channel cleanup is given up (stripes are still pruned).
MAX_GROUP_FAILURES = 8

#: ``(module name, torch-pruning pruning function, root channel indices)`` per channel group to remove
NamedPlan = List[Tuple[str, object, List[int]]]


def short(err: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters)."""
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


class Rehearsal:
    """Trials of ``pruner``'s ``step()`` on copies of its model (see the module docstring)."""

    def __init__(self, pruner: StripePruner) -> None:
        self.pruner = pruner
        self.probes = probe_inputs(pruner.example_inputs)
        self.reference: List[List[torch.Tensor]] = []

    def run(self) -> Tuple[NamedPlan, List[Note]]:
        """Record the model's outputs now (eval mode), then find the channel plan that keeps them, and notes;
        ``RuntimeError`` if even stripe-only pruning changes the outputs (the model is untouched)."""
        model = self.pruner.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.reference = [flat_outputs(self.pruner.forward(model, p)) for p in self.probes]
        model.train(was_training)
        trial = self.merged_copy()
        plan, notes = self.plan_on(trial)
        failure = self.try_plan(trial, plan)
        if failure is not None and plan:
            plan, group_notes = self.group_by_group(plan)
            notes += group_notes
            failure = self.try_plan(self.merged_copy(), plan)
        if failure is not None:
            raise RuntimeError(
                f"step() would change the model's outputs ({failure}); the model was left as it was. "
                "This model has a layer the stripe conversion does not reproduce: please report it, or "
                "pass verify=False to prune anyway."
            )
        return plan, notes

    def merged_copy(self, kills: List[torch.Tensor] | None = None) -> nn.Module:
        """A copy of the model with ``kills`` (FS-shaped bool masks per skeleton layer) killed, merged."""
        trial = copy_model(self.pruner.model)
        modules = dict(trial.named_modules())
        for name, kill in zip(self.pruner.names, kills or ()):
            alive = self.pruner.skeleton(name, modules).alive
            self.pruner.kill_stripes(name, alive & ~kill.to(alive.device), modules)
        self.pruner.merge(trial)
        return trial

    def plan_on(self, trial: nn.Module) -> Tuple[NamedPlan, List[Note]]:
        """The channel-removal plan (by module names) for a merged copy; empty without a graph."""
        pruner = self.pruner
        if pruner.DG is None:
            return [], []
        timeout = pruner.options.graph_timeout
        try:
            with time_limit(timeout):
                graph = build_graph(trial, pruner.example_inputs, pruner.graph_options, timeout)
                amax = record_input_amax(trial, self.probes, pruner.forward)
                modules = dict(trial.named_modules())
                names = {m: n for n, m in modules.items()}
                plan, notes = plan_channel_removal(graph, [modules[n] for n in pruner.names], amax, names)
            return [(names[m], fn, idxs) for m, fn, idxs in plan], notes
        except Exception as err:  # any failure of the graph analysis: no channel cleanup, said in a note
            return [], [Note(CLEANUP_SKIPPED, "", f"channel cleanup skipped: DependencyGraph analysis failed "
                                                   f"({short(err)})")]

    def try_plan(self, trial: nn.Module, plan: NamedPlan, check: bool = True, convert: bool = True) -> str | None:
        """Prune ``plan`` (and convert) on ``trial``; ``None`` if its outputs match (or ``check=False`` and it
        ran), else what went wrong."""
        pruner = self.pruner
        try:
            if plan:
                timeout = pruner.options.graph_timeout
                with time_limit(timeout):
                    graph = build_graph(trial, pruner.example_inputs, pruner.graph_options, timeout)
                    modules = dict(trial.named_modules())
                    for name, fn, idxs in plan:
                        graph.get_pruning_group(modules[name], fn, idxs).prune()
            if convert:
                convert_to_stripes(trial, pruner.names)
            return self.mismatch(trial) if check else None
        except Exception as err:  # a failing trial is an answer, not an error
            return short(err)

    def group_by_group(self, plan: NamedPlan) -> Tuple[NamedPlan, List[Note]]:
        """Keep the channel groups that can be pruned exactly (after a failed full plan); stops after
        :data:`MAX_GROUP_FAILURES` failures or ``graph_timeout`` seconds."""
        notes: List[Note] = []
        deadline = time.monotonic() + (self.pruner.options.graph_timeout or float("inf"))

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
            convert_to_stripes(trial, self.pruner.names)
        counts = count_ops_and_params(trial, self.pruner.example_inputs)
        return counts[0], counts[1]

    @torch.no_grad()
    def mismatch(self, model: nn.Module) -> str | None:
        """What differs between ``model``'s outputs on the probes and the reference (recorded by :meth:`run`),
        or ``None``."""
        model.eval()
        tolerance = self.pruner.options.tolerance
        for ref, probe in zip(self.reference, self.probes):
            out = flat_outputs(self.pruner.forward(model, probe))
            if len(out) != len(ref):
                return f"{len(ref)} output tensors became {len(out)}"
            for r, o in zip(ref, out):
                if r.shape != o.shape:
                    return f"output shape {tuple(r.shape)} became {tuple(o.shape)}"
                err = float((r - o).abs().max()) / (float(r.abs().max()) or 1.0)
                if not err <= tolerance:
                    return f"max|diff|/max|y| = {err:.3g} > {tolerance:g}"
        return None

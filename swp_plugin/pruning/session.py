"""The prune phase of one ``step()`` on the model itself, after its rehearsal: merge, the planned channel groups
(pruned, or yielded to the user with ``step(interactive=True)``), conversion, check.

A :class:`PruneSession` is created merged (the model's convs are plain convs then) and finished once every planned
group was handled; an interactive loop left early (``break``) keeps the session open, and the pruner's next
``step()`` resumes it (the groups not handled yet, then conversion).

Interactive groups (:class:`InteractiveGroup`, a ``tp.Group``) do what torch-pruning's do:

* ``group.prune()``: the planned dead channels go (exact, rehearsed);
* ``group.prune(idxs=[...])``: the user's channels of this group's root go instead, whatever they are: the indexes
  are checked first (integers, in range, no duplicates, at least one channel left in every layer) and refused with
  ``ValueError`` before anything changes; live channels change the function, as asked;
* not calling ``prune()`` (soft pruning: zero the group's weights, or leave it): the channels stay.

The check after the loop then compares the converted model with the model as the loop left it (conversion must be
exact); the comparison with the outputs before ``step()`` is made only when no group was pruned with the user's own
indexes, and in interactive mode its failure is a warning (a change the user made inside the loop).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Iterator, List, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

from ..utils.heads import sync_feature_sizes
from .convert import convert_to_stripes
from .notes import CLEANUP_SKIPPED, Note

if TYPE_CHECKING:
    from .pruner import StripePruner
    from .rehearsal import NamedPlan, Rehearsal


class InteractiveGroup(tp.Group):
    """A torch-pruning group of a ``step(interactive=True)`` loop (see the module docstring)."""

    _session: PruneSession
    _index: int

    def prune(self, idxs: Sequence[int] | None = None, record_history: bool = True) -> None:
        session = self._session
        if self._index in session.done:
            raise RuntimeError("this group was pruned already; each group is pruned once")
        if idxs is None:
            super().prune(record_history=record_history)
        else:
            root, fn = self._group[0].dep.target.module, self._group[0].dep.handler
            group = session.user_group(root, fn, idxs)
            group.prune(record_history=record_history)
            session.deviated = True
        session.done.add(self._index)


class PruneSession:
    """The prune phase of ``pruner``'s current step (see the module docstring)."""

    def __init__(self, pruner: StripePruner, rehearsal: Rehearsal, plan: NamedPlan) -> None:
        self.pruner, self.rehearsal, self.plan = pruner, rehearsal, plan
        self.done: set = set()
        self.skipped: set = set()
        self.deviated = False
        self.interactive = False
        model = pruner.model
        pruner.state.merge(model)
        self.graph = pruner.graph_of(model) if plan else None
        if plan and self.graph is None:  # rehearsed fine, but the graph of the model itself did not build in time
            pruner.notes.append(Note(CLEANUP_SKIPPED, "", "channel cleanup skipped: DependencyGraph of the merged "
                                                          "model unavailable"))
            self.plan = []
        pruner.DG = self.graph

    @property
    def pending(self) -> List[int]:
        return [i for i in range(len(self.plan)) if i not in self.done and i not in self.skipped]

    def user_group(self, root: nn.Module, fn, idxs) -> tp.Group:
        """The group of ``root`` with the user's ``idxs``; ``ValueError`` (nothing changed) if they are not valid."""
        values = idxs.tolist() if isinstance(idxs, torch.Tensor) else list(idxs)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in values):
            raise ValueError(f"group.prune(idxs=...): indexes must be integers, got {idxs!r}")
        channels = self.graph.get_out_channels(root) if self.graph.is_out_channel_pruning_fn(fn) \
            else self.graph.get_in_channels(root)
        bad = [i for i in values if not 0 <= i < channels]
        if bad or len(set(values)) != len(values) or not values:
            raise ValueError(f"group.prune(idxs={values}): expected distinct channel indexes in [0, {channels}) of "
                             f"the group's root ({type(root).__name__}); nothing was pruned")
        group = self.graph.get_pruning_group(root, fn, sorted(values))
        if not self.graph.check_pruning_group(group):
            raise ValueError(f"group.prune(idxs={values}) would remove every channel of a layer of the group; nothing "
                             "was pruned")
        return group

    def groups(self) -> Iterator[tp.Group]:
        """The pending planned groups, each built right before it is handled; then :meth:`finish`."""
        self.interactive = True
        modules = dict(self.pruner.model.named_modules())
        finished = False
        try:
            for i in self.pending:
                name, fn, idxs = self.plan[i]
                group = self.graph.get_pruning_group(modules[name], fn, idxs)
                group.__class__ = InteractiveGroup
                group._session, group._index = self, i
                yield group
                if i not in self.done:
                    self.skipped.add(i)  # the user moved on without prune(): soft pruning, the channels stay
            finished = True
        finally:
            if not finished:
                left = len(self.pending)
                warnings.warn(f"StripePruner: the interactive step() loop stopped with {left} planned group(s) not "
                              "handled; the model is merged but not converted yet. Call pruner.step() to finish it "
                              "(it prunes the groups left and converts).", stacklevel=2)
        self.finish()

    def prune_all(self) -> None:
        modules = dict(self.pruner.model.named_modules())
        for i in self.pending:
            name, fn, idxs = self.plan[i]
            self.graph.get_pruning_group(modules[name], fn, idxs).prune()
            self.done.add(i)
        self.finish()

    def finish(self) -> None:
        """Record the channel history, convert, check (see the module docstring), hand back to the pruner."""
        pruner, model = self.pruner, self.pruner.model
        if self.graph is not None:
            pruner.record_channel_history(self.graph.pruning_history())
        was_training = model.training
        model.eval()
        try:
            mismatch = None
            if pruner.verify and not self.deviated:
                mismatch = self.rehearsal.mismatch(model)
            if mismatch and not self.interactive:
                raise RuntimeError(f"step() changed the model's outputs although its rehearsal did not: {mismatch}")
            if mismatch:
                warnings.warn(f"StripePruner: the model's outputs changed during the interactive step() loop "
                              f"({mismatch}) although its planned groups were rehearsed exact: a change made inside "
                              "the loop? Conversion goes on from the model as the loop left it.", stacklevel=3)
            if pruner.verify and (self.deviated or mismatch):
                self.rehearsal.record(model)  # the user's choice is the new reference of the conversion check
            convert_to_stripes(model, pruner.state.names, pruner.notes.append)
            sync_feature_sizes(model, pruner.example_inputs)  # timm's num_features after head-feeding channels went
            mismatch = self.rehearsal.mismatch(model) if pruner.verify else None
        finally:
            model.train(was_training)
        pruner.end_round()
        if mismatch:
            raise RuntimeError(f"step()'s conversion to StripeConv2d changed the model's outputs: {mismatch}")
        skipped = [n for n in pruner.notes if n.kind == CLEANUP_SKIPPED]
        if skipped:
            warnings.warn(f"StripePruner.step(): channel cleanup skipped in {len(skipped)} place(s), stripes pruned "
                          f"anyway (dead filters there stay as zero channels), e.g. {skipped[0]}. All of it: "
                          "pruner.notes.", stacklevel=3)

"""``StripePruner``: Stripe-Wise Pruning (Meng et al., NeurIPS 2020) as a torch-pruning pruner.

The lifecycle, phase by phase (and who owns it):

=================  ===============================================  ============================================
phase              call                                             module
=================  ===============================================  ============================================
attach             ``StripePruner(model, x, ...)``                  :mod:`swp_plugin.skeleton` (parametrizations)
train              ``pruner.regularize(model)`` after backward      this module
(ratio / target)   ``step()`` kills the lowest-ranked stripes       :mod:`.ratio` / :mod:`.target`
rehearse           every change below first on copies, checked      :mod:`.rehearsal`
merge              ``W <- W * FS * alive``, parametrizations off     :mod:`.skeletons` (the skeleton state's owner)
remove channels    dead filters with BN / next-layer channels       :mod:`.channels` + torch-pruning's DepGraph,
                   (``step(interactive=True)`` yields the groups)   :mod:`.session`
convert            convs -> ``StripeConv2d``, checked               :mod:`.convert`, :mod:`.session`
history            ``pruning_history()`` / ``load_pruning_history``  :mod:`.history`
deploy             ``swp_plugin.deploy(model, x)``                  :mod:`swp_plugin.deployment`
=================  ===============================================  ============================================

The pruner is a torch-pruning ``BasePruner`` facade over these phases: it validates (:mod:`.options`,
:mod:`.checks`), holds the round's :class:`~.skeletons.Skeletons` and the phase (``train``, ``pruning`` while an
interactive step is open, ``between`` ratio steps, ``done``), and hands each phase what it needs.

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

import warnings
from typing import Callable, Dict, Iterator, List, Mapping, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

from ..measure.counting import count_ops_and_params
from ..skeleton import detach_skeletons
from ..skeleton.parametrizations import FilterSkeleton
from ..skeleton.standardization import unfold_standardization
from ..utils import run_model
from . import checks
from .functions import customized_pruners
from .graph import build_graph, graph_guard
from .history import load_history, make_history, stripe_structure
from .importance import StripeImportance
from .notes import STANDARDIZED, Note
from .options import check_number, parse_options
from .ratio import filter_kills, ratio_kills
from .rehearsal import Rehearsal, short
from .session import PruneSession
from .skeletons import Skeletons
from .target import output_positions, reach_target

#: torch-pruning's default roots of channel groups (BasePruner's ``root_module_types``) plus StripeConv2d.
DEFAULT_ROOTS = [tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR, tp.ops.TORCH_LSTM]


class StripePruner(tp.pruner.BasePruner):
    """Learns a Filter Skeleton per conv during training and prunes stripes and dead channels.

    A ``tp.pruner.BasePruner`` (its constructor is called, as torch-pruning's own pruners do) whose options and
    methods have stripe meanings (:mod:`.options`; the table: docs/design.md, "torch-pruning's contract"); what it
    cannot honour is refused with the reason before anything is touched. If the graph cannot be built (an error,
    or longer than ``graph_timeout`` seconds), SWP still prunes stripes and skips the channel cleanup (one warning).

    Args:
        model: the network; its convs get Filter Skeletons (parametrizations) at construction.
        example_inputs: inputs for DepGraph tracing and for the exactness checks of ``step()``.
        sr: L1 strength on the skeletons (the paper's alpha, default 1e-5).
        threshold: stripes with ``|FS| <= threshold`` die (the paper's delta, default 0.05; threshold mode).
        ignored_layers: modules (and their submodules) left untouched, e.g. the classifier.
        macs_reduction / params_reduction: a target instead of a threshold (see :mod:`.target`).
        importance: an object scoring stripes (``stripe_scores(layer, skeleton, weight)``, :mod:`.importance`).
        verify: ``step()`` checks that outputs do not change (``max|diff| <= tolerance * max|y|``;
            default tolerance by dtype: 1e-4 for fp32, 1e-2 fp16, 5e-2 bf16); ``False`` prunes even where the
            rehearsal finds a difference (with a warning saying how much).
        graph_timeout: seconds allowed for each DependencyGraph build/analysis (main thread only; None: no limit).
        score: stripe ranking of a target or ratio: ``'fs'`` = ``|FS| * ||W_stripe||``; ``'fs_bn'`` = that times the
            gain ``|gamma| / sqrt(running_var + eps)`` of the BatchNorm the filter feeds (see :mod:`.target`).

    Attributes:
        state: the current round's :class:`~.skeletons.Skeletons` (the one owner of the skeleton state).
        skeletons: qualified conv name -> Filter Skeleton parameter, ``(out, kh, kw)`` for a conv.
        skipped: qualified conv name -> why it got no skeleton.
        notes: :class:`~.notes.Note` records of what was left in place and why.
        target_history: ``(goal, reached)`` per target step.
        graph_error: why the DependencyGraph is unavailable (``None`` when it works).
    """

    def __init__(self, model: nn.Module, example_inputs, sr: float = 1e-5, threshold: float | None = None,
                 ignored_layers: Sequence[nn.Module] | None = None, macs_reduction: float | None = None,
                 params_reduction: float | None = None, importance=None, verify: bool = True,
                 tolerance: float | None = None, graph_timeout: float | None = 120.0, score: str = "fs",
                 **kwargs) -> None:
        checks.check_not_meta(model, example_inputs)
        checks.check_inputs_finite(example_inputs)
        self.options = options = parse_options(model, sr, threshold, macs_reduction, params_reduction, importance,
                                               verify, tolerance, graph_timeout, ignored_layers, kwargs, score)
        checks.check_untied(model, options.ignored_layers)
        self.model, self.example_inputs = model, example_inputs
        self.graph_options = {**options.graph_options, "ignored_params": options.ignored_params,
                              "customized_pruners": {**customized_pruners(),
                                                     **(options.graph_options.get("customized_pruners") or {})}}
        self.notes: List[Note] = [
            Note(STANDARDIZED, name, f"{cls} replaced by a plain conv with a WeightStandardization parametrization "
                                     "(same function)")
            for name, cls in unfold_standardization(model, options.ignored_layers)]
        self._check_runs()
        self.dense_counts = count_ops_and_params(model, example_inputs) if options.target else None
        self.positions: List[int] | None = None  # output positions of the skeleton layers (MACs targets)
        self.graph_error: str | None = None
        self._init_base(model, example_inputs, ignored_layers)
        self.target_history: List = []
        self.state = Skeletons(model, options.ignored_layers, self.DG)
        #: conv name -> its stripes when the pruner was built (the base of pruning_ratio)
        self.initial_stripes: Dict[str, int] = {n: self.state.skeleton(n).alive.numel() for n in self.state.names}
        self._phase = "train"
        self._session: PruneSession | None = None
        self._channel_history: List = []
        self._final_skeletons: Dict[str, torch.Tensor] = {}
        self._final_sparsity = 0.0

    def _init_base(self, model: nn.Module, example_inputs, ignored_layers) -> None:
        """BasePruner's constructor (it builds the DependencyGraph) within ``graph_timeout``, its channel-count
        bookkeeping skipped (``root_module_types=[]`` while it runs; its group search does not end on some timm
        models); ``root_module_types`` is then the user's."""
        options, graph = self.options, self.options.graph_options
        roots = list(options.root_module_types) if options.root_module_types is not None else DEFAULT_ROOTS
        base = dict(importance=options.importance, global_pruning=options.global_pruning,
                    pruning_ratio=options.pruning_ratio, pruning_ratio_dict=options.ratio_dict or None,
                    max_pruning_ratio=options.max_pruning_ratio, iterative_steps=options.iterative_steps,
                    iterative_pruning_ratio_scheduler=options.scheduler, ignored_layers=ignored_layers,
                    round_to=options.round_to, isomorphic=options.isomorphic,
                    customized_pruners=self.graph_options["customized_pruners"],
                    unwrapped_parameters=graph.get("unwrapped_parameters"), forward_fn=graph.get("forward_fn"),
                    output_transform=graph.get("output_transform"))
        try:
            with graph_guard(model, options.graph_timeout):
                super().__init__(model, example_inputs, root_module_types=[], **base)
        except Exception as err:  # any tracing failure means: no channel cleanup, said once
            self.graph_error = short(err)
            warnings.warn(f"StripePruner: torch-pruning's DependencyGraph is unavailable for this model "
                          f"({self.graph_error}); stripes will be pruned, but no channel cleanup (dead filters stay "
                          "as empty output channels).", stacklevel=3)
            self._without_graph(model, base)
        self.root_module_types = roots

    def _without_graph(self, model: nn.Module, base: Dict) -> None:
        """BasePruner's attributes where its constructor could not build the graph."""
        self.model, self.DG, self.importance = model, None, base["importance"]
        for key in ("global_pruning", "pruning_ratio", "max_pruning_ratio", "iterative_steps",
                    "iterative_pruning_ratio_scheduler", "round_to", "isomorphic"):
            setattr(self, key, base[key])
        self.ignored_layers, self.ignored_params = self.options.ignored_layers, self.options.ignored_params
        self.current_step, self.pruning_ratio_dict, self.head_pruning_ratio_dict = 0, {}, {}
        self.num_heads, self.in_channel_groups, self.out_channel_groups = {}, {}, {}
        self.per_step_pruning_ratio = self.iterative_pruning_ratio_scheduler(self.pruning_ratio, self.iterative_steps)
        self.per_step_head_pruning_ratio = [0.0] * (self.iterative_steps + 1)

    sr = property(lambda self: self.options.sr)
    threshold = property(lambda self: self.options.threshold)
    target = property(lambda self: self.options.target)
    verify = property(lambda self: self.options.verify)
    names, skipped = property(lambda self: self.state.names), property(lambda self: self.state.skipped)

    #: ``step()``'s exactness tolerance (``max|diff| / max|y|``), settable, e.g. to 10x the model's float32 rounding
    tolerance = property(lambda self: self.options.tolerance,
                         lambda self, value: setattr(self.options, "tolerance", check_number("tolerance", value)))

    def forward(self, model: nn.Module, inputs):
        """Run ``model`` on example inputs: torch-pruning's ``forward_fn`` if given, else ``model(*inputs)``."""
        forward_fn: Callable | None = self.options.graph_options.get("forward_fn")
        return forward_fn(model, inputs) if forward_fn is not None else run_model(model, inputs)

    def module(self, name: str) -> nn.Module:
        return self.state.layer(name)

    def skeleton(self, name: str, modules: Mapping[str, nn.Module] | None = None) -> FilterSkeleton:
        """The Filter Skeleton parametrization of conv ``name`` (in ``modules``, a copy's, if given)."""
        return self.state.skeleton(name, modules)

    @property
    def skeletons(self) -> Mapping[str, nn.Parameter]:
        """Qualified conv name -> Filter Skeleton ``(out, kh, kw)`` (``(S,)`` for a StripeConv2d); after the last
        ``step()``, their values then."""
        return dict(self._final_skeletons) if self._phase != "train" else self.state.values()

    def stripe_sparsity(self) -> float:
        """Fraction of stripes that are dead (over all skeleton layers); after the last ``step()``, its value then."""
        return self._final_sparsity if self._phase != "train" else self.state.sparsity()

    def kill_units(self) -> List[torch.Tensor] | None:
        """Extension point of target-driven pruning: per skeleton layer, FS-shaped ids in ``[0, n)`` of the
        groups of stripes a target ranks and kills together (a group's score is the sum of its stripes'
        scores); ``None`` (the default): every stripe on its own. A subclass sets a coarser granularity, e.g.
        ``swp_plugin.recipes.baselines.ShapeWisePruner`` (one kernel position across all filters of a layer)."""
        return None

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
        reg = self.sr if reg is None else check_number("reg", reg)
        if self._phase == "between":
            raise RuntimeError("regularize() after a pruning step(): call pruner.update_regularizer() first (it "
                               "attaches the next step's Filter Skeletons), then build the optimizer, then train.")
        self._require_training("regularize")
        self.state.check_attached()
        skeletons = [self.state.skeleton(name) for name in self.state.names]
        if all(fs.skeleton.grad is None for fs in skeletons):
            raise RuntimeError("regularize() found no gradient on any Filter Skeleton: call it after loss.backward() "
                               "and before optimizer.step(), and build the optimizer after the StripePruner "
                               "(and again after each step() that pruned).")
        for name, fs in zip(self.state.names, skeletons):
            if fs.skeleton.grad is not None:
                fs.skeleton.grad.add_(torch.sign(fs.skeleton) * reg)
            had_stripes = bool(fs.alive.any())
            self.state.kill(name, fs.alive & (fs.skeleton.abs() > self.threshold))
            if had_stripes and not fs.alive.any():
                warnings.warn(f"StripePruner: every stripe of '{name}' is now dead (|FS| <= threshold="
                              f"{self.threshold:g}); the layer outputs only its bias and step() keeps one empty "
                              "channel for it. Lower sr or threshold if this is not wanted.", stacklevel=2)

    def update_regularizer(self) -> None:
        """After a ratio ``step()``: attach the next step's Filter Skeletons (call it before building the optimizer
        you fine-tune with, as torch-pruning's pruners refresh their regularizer); otherwise re-synchronise the
        channel masks with the stripe masks (e.g. after loading a checkpoint)."""
        self._require_training("update_regularizer")
        for name in self.state.names:
            self.state.kill(name, self.state.skeleton(name).alive)

    def detach(self, merge: bool = True) -> None:
        """Take every skeleton and mask off the model without pruning (``merge``: bake them in: the soft-pruned
        model, same layers, dead stripes and channels zero)."""
        self._require_training("detach")
        self._final_skeletons, self._final_sparsity = dict(self.skeletons), self.stripe_sparsity()
        detach_skeletons(self.model, merge=merge)
        self._phase = "done"

    # ------------------------------------------------------------------ pruning
    def step(self, interactive: bool = False) -> Iterator[tp.Group] | None:
        """One pruning step: choose what dies (ratio / target modes), rehearse, then merge the skeletons into the
        weights, remove dead channels, convert convs to ``StripeConv2d``, check.

        Everything is first rehearsed on a copy of the model (channel groups that torch-pruning cannot prune
        exactly are dropped there); the model itself is changed only once the rehearsal reproduced its outputs.
        Ratio mode: every step prunes, like torch-pruning's, and leaves a plain stripe-pruned model (count it, save it,
        stop there); the next step's skeletons are attached by that step, or by ``update_regularizer()`` (call it
        before building the optimizer of a fine-tuning with ``regularize``). Target
        mode with ``iterative_steps=k``: steps 1..k-1 only kill stripes (towards the scheduler's reductions) and
        training goes on. With ``interactive=True`` returns a generator of the channel-removal groups (see
        :mod:`.session`: ``group.prune()``, ``group.prune(idxs=...)``, or nothing for soft pruning); conversion and
        the final check run when it is exhausted. After an interrupted interactive loop, ``step()`` finishes it.
        """
        if self._phase == "pruning":  # an interactive loop stopped early: finish that step
            return self._session.groups() if interactive else self._session.prune_all()
        self._require_training("step")
        self._validate()
        self.current_step += 1
        rehearsal = Rehearsal(self.model, self.state, self.example_inputs, self.forward, self.options,
                              self.graph_options, use_graph=self.DG is not None)
        if self.options.mode == "target":
            goal = self.options.step_goals()[min(self.current_step, self.iterative_steps) - 1]
            if self.options.target[0] == "macs" and self.positions is None:
                self.positions = output_positions(self.model, [self.module(n) for n in self.names],
                                                  self.example_inputs)
            reached = reach_target(self.state, rehearsal, self.options, goal, self.dense_counts, self.positions,
                                   self.kill_units())
            self.target_history.append((goal, reached))
            if self.current_step < self.iterative_steps:  # an intermediate step: stripes killed only
                return iter(()) if interactive else None
        elif self.options.mode == "ratio":
            self.state.kill_masks(ratio_kills(self.state, self.options, self.current_step, self.initial_stripes))
        was_training = self.model.training
        self.model.eval()
        try:
            plan, notes = rehearsal.run()
            self.notes += notes
            self._final_skeletons, self._final_sparsity = dict(self.state.values()), self.state.sparsity()
            self._phase = "pruning"
            self._session = PruneSession(self, rehearsal, plan)
        finally:
            self.model.train(was_training)
        return self._session.groups() if interactive else self._session.prune_all()

    def graph_of_or_raise(self, model: nn.Module) -> tp.DependencyGraph:
        return build_graph(model, self.example_inputs, self.graph_options, self.options.graph_timeout)

    def graph_of(self, model: nn.Module) -> tp.DependencyGraph | None:
        """A fresh DependencyGraph of ``model`` (None if it cannot be built within ``graph_timeout``)."""
        try:
            return build_graph(model, self.example_inputs, self.graph_options, self.options.graph_timeout)
        except Exception:  # the graph is optional after step(): it only serves further torch-pruning use
            return None

    def record_channel_history(self, entries: List) -> None:
        """Called by the prune phase: the channel removals of this step (torch-pruning's history entries)."""
        self._channel_history += [list(e) for e in entries]

    def end_round(self) -> None:
        """Called by the prune phase once the model is converted: a fresh graph, then new skeletons for the next
        ratio step, or the end."""
        self._session = None
        self.DG = self.graph_of(self.model)
        more = self.options.mode == "ratio" and self.current_step < self.iterative_steps
        self._phase = "between" if more else "done"  # between: a clean pruned model; next skeletons on demand

    # ------------------------------------------------------------------ the rest of BasePruner's interface
    def pruning_history(self) -> Dict:
        """The channel removals and the stripe structure so far (plain data, see :mod:`.history`)."""
        return make_history(self._channel_history, stripe_structure(self.model, self.state.names))

    def load_pruning_history(self, pruning_history: Dict) -> None:
        """Give this pruner's (fresh) model the structure of ``pruning_history`` (see :mod:`.history`); then load
        the pruned ``state_dict``. The pruner is done afterwards (its skeletons are merged: FS = 1, nothing dies)."""
        if self.current_step or self._phase != "train" or self.state.sparsity():
            raise RuntimeError("load_pruning_history() needs a fresh pruner on a fresh model (no step(), no dead "
                               "stripe): build StripePruner(fresh_model, example_inputs) first")
        final = dict(self.state.values())
        self._channel_history = load_history(self.model, pruning_history, self.graph_of_or_raise,
                                             prepare=lambda m: detach_skeletons(m, merge=True))
        self._final_skeletons, self._final_sparsity = final, 0.0
        self.DG = self.graph_of(self.model)
        self._phase = "done"

    def estimate_importance(self, group) -> torch.Tensor | None:
        """Channel importance of a torch-pruning group from the Filter Skeletons (``importance`` if it scores
        groups, else :class:`StripeImportance`): per root channel, ``sum |FS| * ...`` (see its docstring)."""
        importance = self.importance if callable(self.importance) else StripeImportance(self.skeletons)
        return importance(group)

    @torch.no_grad()
    def manual_prune_width(self, layer: nn.Module, pruning_fn: Callable, pruning_ratios_or_idxs) -> None:
        """Kill every stripe of the given filters of skeleton conv ``layer`` now (output channels: ``pruning_fn``
        must be an out-channel pruning function); a float is the fraction of its filters, the lowest-ranked go.
        This changes the function, as asked; ``step()`` then removes the filters with their channels."""
        self._require_training("manual_prune_width")
        name = next((n for n in self.names if self.module(n) is layer), None)
        if name is None:
            raise ValueError(f"manual_prune_width: {type(layer).__name__} is not a conv with a Filter Skeleton of this "
                             f"pruner (those are {self.names[:5]}...)")
        if getattr(pruning_fn, "__name__", "") != "prune_out_channels":
            raise NotImplementedError("manual_prune_width: only output channels have a stripe meaning (a filter's "
                                      "stripes); prune the producer's out channels (e.g. tp.prune_conv_out_channels)")
        self.state.kill(name, filter_kills(self.state, self.options, name, pruning_ratios_or_idxs))

    def reset(self) -> None:
        """torch-pruning's ``reset``: the schedule starts again at step 0 (stripes killed so far stay dead)."""
        if self._phase in ("pruning", "done"):
            self._require_training("reset")
        self.current_step = 0

    def _prune(self):  # BasePruner's channel ranking
        raise NotImplementedError("BasePruner._prune ranks channel groups; StripePruner's step() prunes stripes")

    # ------------------------------------------------------------------ checks
    def _require_training(self, what: str) -> None:
        """Refuse ``what`` unless the skeletons are attached (attaching the next step's after a ratio step)."""
        if self._phase == "between":
            self.state = Skeletons(self.model, self.options.ignored_layers, self.DG)
            self._phase = "train"
        if self._phase == "pruning":
            raise RuntimeError(f"{what}(): an interactive step() is still open (its loop stopped early): call "
                               "pruner.step() to finish it first.")
        if self._phase == "done":
            raise RuntimeError(f"{what}() after the last step()/detach(): the skeletons are already merged and "
                               "pruned. Build a new StripePruner for another round.")

    def _validate(self) -> None:
        self.state.check_attached()
        self.state.check_finite()
        checks.check_model_finite(self.model)
        checks.check_inputs_finite(self.example_inputs)

    def _check_runs(self) -> None:
        was_training = self.model.training
        try:
            with torch.no_grad():
                self.forward(self.model.eval(), self.example_inputs)
        except Exception as err:  # re-raised with context
            raise ValueError(f"example_inputs do not run through the model ({type(err).__name__}: {err}). "
                             "Pass inputs of the shape, dtype and device the model expects.") from err
        finally:
            self.model.train(was_training)

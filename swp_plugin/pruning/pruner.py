"""``StripePruner``: Stripe-Wise Pruning (Meng et al., NeurIPS 2020) as a torch-pruning pruner.

The lifecycle, phase by phase (and who owns it):

=================  ===============================================  ============================================
phase              call                                             module
=================  ===============================================  ============================================
attach             ``StripePruner(model, x, ...)``                  :mod:`swp_plugin.skeleton` (parametrizations)
train              ``pruner.regularize(model)`` after backward      this module
(target)           ``step()`` kills the lowest-ranked stripes       :mod:`.target`
rehearse           every change below first on copies, checked      :mod:`.rehearsal`
merge              ``W <- W * FS * alive``, parametrizations off     :func:`swp_plugin.detach_skeletons`
remove channels    dead filters with BN / next-layer channels       :mod:`.channels` + torch-pruning's DepGraph
convert            convs -> ``StripeConv2d``                        :mod:`.convert`
deploy             ``swp_plugin.deploy(model, x)``                  :mod:`swp_plugin.deployment`
=================  ===============================================  ============================================

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
from typing import Callable, Dict, Iterator, List, Mapping, Sequence, Tuple

import torch
import torch.nn as nn
import torch_pruning as tp

from ..measure.counting import count_ops_and_params
from ..skeleton import attach_channel_mask, attach_skeletons, detach_skeletons, filter_alive
from ..skeleton.attach import skeleton_of
from ..skeleton.parametrizations import FilterSkeleton
from ..skeleton.standardization import unfold_standardization
from ..utils import run_model
from ..utils.heads import sync_feature_sizes
from .convert import convert_to_stripes
from .functions import customized_pruners
from .graph import build_graph, fed_norms
from .notes import CLEANUP_SKIPPED, STANDARDIZED, Note
from .options import check_number, parse_options
from .rehearsal import Rehearsal, short
from .target import reach_target


class StripePruner(tp.pruner.BasePruner):
    """Learns a Filter Skeleton per conv during training and prunes stripes and dead channels.

    A ``tp.pruner.BasePruner``: same constructor conventions, ``regularize`` / ``update_regularizer`` / ``step`` /
    ``step(interactive=True)``, ``DG``, ``ignored_layers``, ``current_step``. Its constructor builds only the
    DependencyGraph (BasePruner's channel-ratio bookkeeping has no stripe meaning and is slow or fails on some
    timm models); BasePruner methods that need that bookkeeping raise ``NotImplementedError``. Of BasePruner's
    options it honours ``forward_fn``, ``output_transform``, ``unwrapped_parameters``, ``customized_pruners``,
    ``iterative_steps``, ``iterative_pruning_ratio_scheduler``, ``max_pruning_ratio``, ``global_pruning=True``
    and refuses the others with the reason (:mod:`.options`). If the graph cannot be built (an error, or longer
    than ``graph_timeout`` seconds), SWP still prunes stripes and skips the channel cleanup, with one warning.

    Args:
        model: the network; its convs get Filter Skeletons (parametrizations) at construction.
        example_inputs: inputs for DepGraph tracing and for the exactness checks of ``step()``.
        sr: L1 strength on the skeletons (the paper's alpha, default 1e-5).
        threshold: stripes with ``|FS| <= threshold`` die (the paper's delta, default 0.05).
        ignored_layers: modules (and their submodules) left untouched, e.g. the classifier.
        macs_reduction / params_reduction: a target instead of a threshold (see :mod:`.target`).
        verify: ``step()`` checks that outputs do not change (``max|diff| <= tolerance * max|y|``;
            default tolerance by dtype: 1e-4 for fp32, 1e-2 fp16, 5e-2 bf16).
        graph_timeout: seconds allowed for each DependencyGraph build/analysis (main thread only).
        score: stripe ranking of a target: ``'fs'`` = ``|FS| * ||W_stripe||``; ``'fs_bn'`` = that times the gain
            ``|gamma| / sqrt(running_var + eps)`` of the BatchNorm the filter feeds (see :mod:`.target`).

    Attributes:
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
        self.options = parse_options(model, sr, threshold, macs_reduction, params_reduction, importance, verify,
                                     tolerance, graph_timeout, ignored_layers, kwargs, score)
        self.model, self.example_inputs = model, example_inputs
        self.ignored_layers, self.ignored_params = self.options.ignored_layers, self.options.ignored_params
        self.graph_options = {**self.options.graph_options, "ignored_params": self.ignored_params,
                              "customized_pruners": {**customized_pruners(),
                                                     **(self.options.graph_options.get("customized_pruners") or {})}}
        self.notes: List[Note] = [
            Note(STANDARDIZED, name, f"{cls} replaced by a plain conv with a WeightStandardization parametrization "
                                     "(same function)")
            for name, cls in unfold_standardization(model, self.ignored_layers)]
        self._check_runs()
        self.dense_counts = count_ops_and_params(model, example_inputs) if self.options.target else None
        self.positions: List[int] | None = None  # output positions of the skeleton layers (MACs targets)
        self.current_step, self.target_history = 0, []
        self.DG: tp.DependencyGraph | None = None
        self.graph_error: str | None = None
        try:
            self.DG = build_graph(model, example_inputs, self.graph_options, graph_timeout)
        except Exception as err:  # any tracing failure means: no channel cleanup, said once
            self.graph_error = short(err)
            warnings.warn(f"StripePruner: torch-pruning's DependencyGraph is unavailable for this model "
                          f"({self.graph_error}); stripes will be pruned, but no channel cleanup (dead filters stay "
                          "as empty output channels).", stacklevel=2)
        fs_modules, self.skipped = attach_skeletons(model, self.ignored_layers)
        if not fs_modules:
            raise ValueError("StripePruner found no eligible conv in the model (every nn.Conv2d is ignored or "
                             f"excluded: {self.skipped or 'the model has none'}); nothing to prune.")
        self.names: List[str] = list(fs_modules)
        self._modules: Dict[str, nn.Module] = dict(model.named_modules())
        names = {m: n for n, m in self._modules.items()}
        #: conv name -> [(module name, tensor name)] of the params masked when one of its filters dies
        self._mask_targets: Dict[str, List[Tuple[str, str]]] = {}
        for name in self.names:
            norms = fed_norms(self.DG, self._modules[name]) if self.DG is not None else []
            targets = [(names[n], t) for n in norms for t in ("weight", "bias")]
            if getattr(self._modules[name], "bias", None) is not None:
                targets.append((name, "bias"))
            for module_name, tensor_name in targets:
                attach_channel_mask(self._modules[module_name], tensor_name)
            self._mask_targets[name] = targets
        self._stepped = False

    # ------------------------------------------------------------------ options as attributes
    sr = property(lambda self: self.options.sr)
    threshold = property(lambda self: self.options.threshold)
    target = property(lambda self: self.options.target)
    iterative_steps = property(lambda self: self.options.iterative_steps)
    max_pruning_ratio = property(lambda self: self.options.max_pruning_ratio)
    verify = property(lambda self: self.options.verify)
    tolerance = property(lambda self: self.options.tolerance)

    def forward(self, model: nn.Module, inputs):
        """Run ``model`` on example inputs: torch-pruning's ``forward_fn`` if given, else ``model(*inputs)``."""
        forward_fn: Callable | None = self.options.graph_options.get("forward_fn")
        return forward_fn(model, inputs) if forward_fn is not None else run_model(model, inputs)

    # ------------------------------------------------------------------ state
    def module(self, name: str) -> nn.Module:
        return self._modules[name]

    def skeleton(self, name: str, modules: Mapping[str, nn.Module] | None = None) -> FilterSkeleton:
        """The Filter Skeleton parametrization of conv ``name`` (in ``modules``, a copy's, if given)."""
        return skeleton_of((modules or self._modules)[name])

    @property
    def skeletons(self) -> Mapping[str, nn.Parameter]:
        """Qualified conv name -> Filter Skeleton ``(out, kh, kw)`` (``(S,)`` for a StripeConv2d)."""
        if self._stepped:
            return dict(self._final_skeletons)
        return {name: self.skeleton(name).skeleton for name in self.names}

    def stripe_sparsity(self) -> float:
        """Fraction of stripes that are dead (over all skeleton layers); after ``step()``, its value then."""
        if self._stepped:
            return self._final_sparsity
        masks = [self.skeleton(name).alive for name in self.names]
        return sum(int((~m).sum()) for m in masks) / max(1, sum(m.numel() for m in masks))

    def fed_batchnorms(self) -> List[nn.Module | None]:
        """Per skeleton layer, the one BatchNorm its filters feed (the one a dead filter masks), else ``None``."""
        norms = [[self._modules[m] for m, t in self._mask_targets[n] if t == "weight"] for n in self.names]
        return [found[0] if len(found) == 1 else None for found in norms]

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
        self._require_not_stepped("regularize")
        self._check_attached()
        skeletons = [self.skeleton(name) for name in self.names]
        if all(fs.skeleton.grad is None for fs in skeletons):
            raise RuntimeError("regularize() found no gradient on any Filter Skeleton: call it after loss.backward() "
                               "and before optimizer.step(), and build the optimizer after the StripePruner.")
        for name, fs in zip(self.names, skeletons):
            if fs.skeleton.grad is not None:
                fs.skeleton.grad.add_(torch.sign(fs.skeleton) * reg)
            had_stripes = bool(fs.alive.any())
            self.kill_stripes(name, fs.alive & (fs.skeleton.abs() > self.threshold))
            if had_stripes and not fs.alive.any():
                warnings.warn(f"StripePruner: every stripe of '{name}' is now dead (|FS| <= threshold="
                              f"{self.threshold:g}); the layer outputs only its bias and step() keeps one empty "
                              "channel for it. Lower sr or threshold if this is not wanted.", stacklevel=2)

    def update_regularizer(self) -> None:
        """Re-synchronise the channel masks with the stripe masks (e.g. after loading a checkpoint)."""
        self._require_not_stepped("update_regularizer")
        for name in self.names:
            self.kill_stripes(name, self.skeleton(name).alive)

    @torch.no_grad()
    def kill_stripes(self, name: str, alive: torch.Tensor, modules: Mapping[str, nn.Module] | None = None,
                     mask_channels: bool = True) -> None:
        """Mark the stripes of ``name`` outside ``alive`` dead (in ``modules``, a copy's, if given); with
        ``mask_channels``, also zero the bias and norm channels of the filters left without a stripe."""
        modules = modules or self._modules
        fs = self.skeleton(name, modules)
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

    @torch.no_grad()
    def merge(self, model: nn.Module) -> None:
        """The merge phase on ``model`` (the pruner's model or a copy of it): prune what ``regularize()`` killed
        (and stripes whose FS is exactly 0), bake the skeletons into the weights, remove the parametrizations.

        A stripe that the very last optimizer step pushed under the threshold still computes something and is
        kept (``regularize()`` would kill it at the next iteration); a filter whose FS values are all exactly 0
        but were never killed keeps its bias / norm channels: they still compute. So merging never changes the
        function."""
        modules = dict(model.named_modules())
        for name in self.names:
            fs = self.skeleton(name, modules)
            self.kill_stripes(name, fs.alive & fs.skeleton.ne(0), modules, mask_channels=False)
        detach_skeletons(model, merge=True)

    def detach(self, merge: bool = True) -> None:
        """Take every skeleton and mask off the model without pruning (``merge``: bake them in)."""
        self._require_not_stepped("detach")
        self._final_skeletons, self._final_sparsity = dict(self.skeletons), self.stripe_sparsity()
        detach_skeletons(self.model, merge=merge)
        self._stepped = True

    # ------------------------------------------------------------------ pruning
    def step(self, interactive: bool = False) -> Iterator[tp.Group] | None:
        """Merge the skeletons into the weights, remove dead channels, convert convs to ``StripeConv2d``.

        Everything is first rehearsed on a copy of the model (channel groups that torch-pruning cannot
        prune exactly are dropped there); the model itself is changed only once the rehearsal reproduced
        its outputs. With a target and ``iterative_steps=k``, steps 1..k-1 only kill stripes (towards the
        scheduler's reductions) and training goes on. With ``interactive=True`` returns a generator of the
        channel-removal groups (call ``group.prune()`` on each, as with torch-pruning); conversion and the
        final check run when the generator is exhausted.
        """
        self._require_not_stepped("step")
        self._validate()
        self.current_step += 1
        rehearsal = Rehearsal(self)
        if self.target is not None:
            goal = self.options.step_goals()[min(self.current_step, self.iterative_steps) - 1]
            self.target_history.append((goal, reach_target(self, rehearsal, goal)))
            if self.current_step < self.iterative_steps:  # an intermediate step: stripes killed only
                return iter(()) if interactive else None
        groups = self._prune(rehearsal)
        if interactive:
            return groups
        for group in groups:
            group.prune()
        return None

    def _prune(self, rehearsal: Rehearsal) -> Iterator[tp.Group]:
        model = self.model
        was_training = model.training
        model.eval()
        plan, notes = rehearsal.run()
        self.notes += notes
        self._final_skeletons, self._final_sparsity = dict(self.skeletons), self.stripe_sparsity()
        self.merge(model)
        self._stepped = True
        if plan:
            self.DG = self._graph(model)
            if self.DG is None:  # rehearsed fine, but the graph of the model itself did not build in time
                self.notes.append(Note(CLEANUP_SKIPPED, "", "channel cleanup skipped: DependencyGraph of the "
                                                            "merged model unavailable"))
                plan = []
        modules = dict(model.named_modules())
        for name, fn, idxs in plan:
            yield self.DG.get_pruning_group(modules[name], fn, idxs)
        convert_to_stripes(model, self.names, self.notes.append)
        sync_feature_sizes(model, self.example_inputs)  # timm's num_features after head-feeding channels went
        self.DG = self._graph(model)
        mismatch = rehearsal.mismatch(model) if self.verify else None
        model.train(was_training)
        if mismatch:
            raise RuntimeError(f"step() changed the model's outputs although its rehearsal did not: {mismatch}")
        skipped = [n for n in self.notes if n.kind == CLEANUP_SKIPPED]
        if skipped:
            warnings.warn(f"StripePruner.step(): channel cleanup skipped in {len(skipped)} place(s), stripes pruned "
                          f"anyway (dead filters there stay as zero channels), e.g. {skipped[0]}. All of it: "
                          "pruner.notes.", stacklevel=3)

    def _graph(self, model: nn.Module) -> tp.DependencyGraph | None:
        try:
            return build_graph(model, self.example_inputs, self.graph_options, self.options.graph_timeout)
        except Exception:  # the graph is optional after step(): it only serves further torch-pruning use
            return None

    # ------------------------------------------------------------------ BasePruner methods without a stripe meaning
    def _refused(self, *args, **kwargs):
        raise NotImplementedError("this torch-pruning BasePruner method works on channel-ratio bookkeeping that "
                                  "StripePruner does not keep (it prunes stripes): use step(), or a torch-pruning "
                                  "pruner with swp_plugin.StripeImportance for channel pruning")

    manual_prune_width = estimate_importance = pruning_history = load_pruning_history = _refused
    get_target_pruning_ratio = get_target_head_pruning_ratio = reset = _refused

    # ------------------------------------------------------------------ checks
    def _require_not_stepped(self, what: str) -> None:
        if self._stepped:
            raise RuntimeError(f"{what}() after step()/detach(): the skeletons are already merged and pruned. "
                               "Build a new StripePruner for another round.")

    def _check_attached(self) -> None:
        """Every skeleton conv is still in the model, with its Filter Skeleton."""
        for name in self.names:
            layer = self._modules[name]
            try:
                in_model = self.model.get_submodule(name) is layer
            except AttributeError:
                in_model = False
            if not in_model or not any(isinstance(p, FilterSkeleton) for p in getattr(
                    getattr(layer, "parametrizations", {}), "weight", [])):
                raise RuntimeError(f"the Filter Skeleton of '{name}' is gone (the conv was replaced or its "
                                   "parametrization removed after the StripePruner was built); build a new "
                                   "StripePruner for this model.")

    def _validate(self) -> None:
        self._check_attached()
        for name in self.names:
            if not torch.isfinite(self.skeleton(name).skeleton).all():
                raise ValueError(f"Filter Skeleton of '{name}' holds NaN/Inf; fix training (lower lr/sr) first")
            if not torch.isfinite(self._modules[name].parametrizations["weight"].original).all():
                raise ValueError(f"weight of '{name}' holds NaN/Inf; the model cannot be pruned exactly")

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

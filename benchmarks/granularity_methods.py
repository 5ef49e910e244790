"""The pruning methods of the granularity benchmark (``benchmarks/granularity.py``) and their variants.

A method is named by a spec, ``base[:key=value]...``, e.g. ``swp``, ``swp:push=8``, ``swp:gradual=4:score=fs_bn``;
the options override the benchmark's settings for that method only (the ablation of the doc is a list of such
specs). Every method is a generator: from the shared baseline it trains (sparse training, or plain training for
L1 filter pruning) and yields one pruned model per point, a MACs target (``{"target": t}``) or, for the paper's
threshold mode, an L1 push (``{"push": p}``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Tuple

import torch
import torch.nn as nn

from swp_plugin import StripePruner
from swp_plugin.pruning.target import SCORES
from swp_plugin.recipes.baselines import (
    ShapeWisePruner,
    StripeGroupLasso,
    l1_filter_pruner,
    pointwise_convs,
    prune_channels_to_macs,
    slimming_pruner,
)
from swp_plugin.recipes.continual import (
    classifier_of,
    feeding_batchnorms,
    renormalize_skeletons,
    sr_for_push,
)

BASES = ("swp", "swp_paper", "shape", "group_lasso", "l1_filter", "slimming")
LABELS = {"swp": "SWP (stripes, FS)", "swp_paper": "SWP paper (threshold)", "shape": "shape-wise (FS shared)",
          "group_lasso": "group lasso (stripes)", "l1_filter": "L1 filter", "slimming": "Network Slimming",
          "baseline": "baseline"}
#: option -> (meaning, type); which bases read it is in :data:`READS`
OPTIONS: Dict[str, Tuple[str, Callable]] = {
    "push": ("L1 push of the sparse training (FS for swp/shape, BN scales for slimming, stripe norms for group "
             "lasso)", float),
    "renorm": ("per-filter FS renormalisation during the sparse training (1/0)", int),
    "gradual": ("stripes killed in this many steps during the sparse training (one training per target); "
                "0: one shot after it", int),
    "score": ("stripe ranking of a target (StripePruner's score): fs = |FS| * ||W||, fs_bn = that times the "
              "BatchNorm gain |gamma| / sqrt(var + eps) of the filter's channel", str),
    "epochs": ("sparse-training epochs", int),
    "cap": ("at most this fraction of a layer's stripes / channels pruned", float),
    "thr": ("threshold of the paper mode", float),
    "at": ("only this MACs target (an ablation at the strongest target)", float),
}
READS = {"swp": {"push", "renorm", "gradual", "score", "epochs", "cap", "at"},
         "shape": {"push", "renorm", "score", "epochs", "cap", "at"},
         "swp_paper": {"renorm", "epochs", "thr"},
         "group_lasso": {"push", "epochs", "cap", "score", "at"}, "l1_filter": {"epochs", "at"},
         "slimming": {"push", "epochs", "cap", "at"}}


@dataclass(frozen=True)
class Spec:
    """A method and its option overrides."""

    base: str
    options: Dict[str, object] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return ":".join([self.base] + [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in sorted(self.options.items())])

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(self.options.items()))
        return LABELS[self.base] + (f" [{extra}]" if extra else "")


def parse_spec(text: str) -> Spec:
    """``base[:key=value]...`` -> :class:`Spec`; raises ``ValueError`` on an unknown base or option."""
    base, *items = text.strip().split(":")
    if base not in BASES:
        raise ValueError(f"unknown method {base!r}; choose from {', '.join(BASES)}")
    options: Dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in READS[base]:
            raise ValueError(f"{text!r}: {key!r} is not an option of {base} (options: {sorted(READS[base])})")
        options[key] = OPTIONS[key][1](value)
        if key == "score" and value not in SCORES:
            raise ValueError(f"{text!r}: score must be one of {SCORES}")
    return Spec(base, options)


def label(method: str) -> str:
    return LABELS.get(method) or parse_spec(method).label


# --------------------------------------------------------------------------------------------- helpers
Point = Dict[str, float]
#: what a method yields per point: (point, pruned model, information about the sparse training)
Yield = Tuple[Point, nn.Module, dict]


def stripe_ignored(bench, model: nn.Module) -> List[nn.Module]:
    """What the stripe methods leave alone: the classifier, and 1x1 convs unless ``--prune-pointwise 1``."""
    return [classifier_of(model)] + ([] if bench.args.prune_pointwise else pointwise_convs(model))


def _get(bench, spec: Spec, key: str):
    defaults = {"push": {"swp": "push_swp", "shape": "push_swp", "group_lasso": "push_gl", "slimming": "push_slim"},
                "renorm": "renorm", "gradual": "gradual", "score": "score", "epochs": "epochs_sparse",
                "cap": "max_layer_ratio", "thr": "paper_threshold"}[key]
    if key == "renorm" and spec.base == "swp_paper":
        defaults = "paper_renorm"
    attr = defaults[spec.base] if isinstance(defaults, dict) else defaults
    return spec.options.get(key, getattr(bench.args, attr))


def _sparse_train(bench, model: nn.Module, pruner, spec: Spec, epochs: int, lr: float,
                  after_epoch: Callable | None = None) -> None:
    """Sparse training with a skeleton pruner (L1 on FS), with per-filter renormalisation if asked."""
    norms = feeding_batchnorms(model, bench.example) if _get(bench, spec, "renorm") else {}
    bench.train(model, epochs, lr, f"{spec.name} sparse", after_backward=lambda: pruner.regularize(model),
                after_step=(lambda opt: renormalize_skeletons(pruner, norms, opt)) if norms else None,
                after_epoch=after_epoch)


# --------------------------------------------------------------------------------------------- methods
def skeleton_method(bench, baseline: nn.Module, spec: Spec, targets: List[float]) -> Iterator[Yield]:
    """SWP (``StripePruner``) or shape-wise (``ShapeWisePruner``) with a MACs target."""
    cls = ShapeWisePruner if spec.base == "shape" else StripePruner
    lr, epochs, cap = bench.args.lr, _get(bench, spec, "epochs"), _get(bench, spec, "cap")
    sr = sr_for_push(_get(bench, spec, "push"), lr, bench.steps(epochs))
    steps, score = (_get(bench, spec, "gradual") if spec.base == "swp" else 0), _get(bench, spec, "score")
    if steps and steps > 1:  # one sparse training per target, stripes killed in `steps` steps along it
        for target in targets:
            model = copy.deepcopy(baseline)
            pruner = cls(model, bench.example, sr=sr, macs_reduction=target, iterative_steps=steps, score=score,
                         max_pruning_ratio=cap, ignored_layers=stripe_ignored(bench, model))
            at = [math.ceil(epochs * i / steps) - 1 for i in range(1, steps)]  # epochs ending with a step

            def after_epoch(epoch: int, loss: float, pruner=pruner, at=at) -> None:
                for _ in range(at.count(epoch)):  # intermediate steps: stripes killed toward target * step / steps
                    pruner.step()

            _sparse_train(bench, model, pruner, spec, epochs, lr, after_epoch)
            accuracy = bench.accuracy(model)
            pruner.step()  # the last step: the full target, then the exact merge / cleanup / conversion
            yield {"target": target}, model, {"sr": sr, "accuracy_after_sparse": accuracy}
        return
    model = copy.deepcopy(baseline)
    pruner = cls(model, bench.example, sr=sr, macs_reduction=targets[0], max_pruning_ratio=cap, score=score,
                 ignored_layers=stripe_ignored(bench, model))
    _sparse_train(bench, model, pruner, spec, epochs, lr)
    accuracy = bench.accuracy(model)
    state = copy.deepcopy(model.state_dict())
    for target in targets:
        pruned = copy.deepcopy(baseline)
        fresh = cls(pruned, bench.example, sr=sr, macs_reduction=target, max_pruning_ratio=cap, score=score,
                    ignored_layers=stripe_ignored(bench, pruned))
        pruned.load_state_dict(state)
        fresh.update_regularizer()
        fresh.step()  # exact: checked inside
        yield {"target": target}, pruned, {"sr": sr, "accuracy_after_sparse": accuracy}


def swp_paper(bench, baseline: nn.Module, spec: Spec, pushes: List[float]) -> Iterator[Yield]:
    """The paper's SWP: L1 on the Filter Skeleton with a threshold during training, ``step()`` without a
    target; one sparse training per push (``sr``)."""
    lr, epochs = bench.args.lr, _get(bench, spec, "epochs")
    for push in pushes:
        model = copy.deepcopy(baseline)
        sr = sr_for_push(push, lr, bench.steps(epochs))
        pruner = StripePruner(model, bench.example, sr=sr, threshold=_get(bench, spec, "thr"),
                              ignored_layers=stripe_ignored(bench, model))
        _sparse_train(bench, model, pruner, spec, epochs, lr)
        accuracy, dead = bench.accuracy(model), pruner.stripe_sparsity()
        pruner.step()
        yield {"push": push}, model, {"sr": sr, "accuracy_after_sparse": accuracy, "dead_stripes": round(dead, 4)}


def group_lasso(bench, baseline: nn.Module, spec: Spec, targets: List[float]) -> Iterator[Yield]:
    """Group lasso on the weights' stripes, then target-driven stripe pruning by weight norm."""
    lr, epochs = bench.args.lr, _get(bench, spec, "epochs")
    model = copy.deepcopy(baseline)
    lasso = StripeGroupLasso(model, 0.0, ignored_layers=stripe_ignored(bench, model))
    lasso.strength = sr_for_push(_get(bench, spec, "push"), lr, bench.steps(epochs)) * lasso.mean_stripe_norm()
    bench.train(model, epochs, lr, "group lasso sparse", after_backward=lasso.regularize)
    accuracy = bench.accuracy(model)
    for target in targets:
        pruned = copy.deepcopy(model)
        StripePruner(pruned, bench.example, macs_reduction=target, max_pruning_ratio=_get(bench, spec, "cap"),
                     score=_get(bench, spec, "score"), ignored_layers=stripe_ignored(bench, pruned)).step()
        yield {"target": target}, pruned, {"strength": lasso.strength, "accuracy_after_sparse": accuracy}


def l1_filter(bench, baseline: nn.Module, spec: Spec, targets: List[float]) -> Iterator[Yield]:
    """Plain training, then L1-norm filter pruning, the same ratio in every layer, bisected to the target."""
    model = copy.deepcopy(baseline)
    bench.train(model, _get(bench, spec, "epochs"), bench.args.lr, "l1 filter (plain training)")
    accuracy = bench.accuracy(model)
    for target in targets:
        pruned = copy.deepcopy(model)
        ratio, _ = prune_channels_to_macs(
            pruned, bench.example, lambda m, r: l1_filter_pruner(m, bench.example, r, [classifier_of(m)]), target)
        yield {"target": target}, pruned, {"ratio": round(ratio, 4), "accuracy_after_sparse": accuracy}


def slimming(bench, baseline: nn.Module, spec: Spec, targets: List[float]) -> Iterator[Yield]:
    """Network Slimming: L1 on BatchNorm scales, global ranking, ratio bisected to the target."""
    lr, epochs, cap = bench.args.lr, _get(bench, spec, "epochs"), _get(bench, spec, "cap")
    model = copy.deepcopy(baseline)
    reg = sr_for_push(_get(bench, spec, "push"), lr, bench.steps(epochs))
    pruner = slimming_pruner(model, bench.example, reg=reg, ignored_layers=[classifier_of(model)],
                             max_pruning_ratio=cap)
    bench.train(model, epochs, lr, "slimming sparse", after_backward=lambda: pruner.regularize(model))
    accuracy = bench.accuracy(model)
    for target in targets:
        pruned = copy.deepcopy(model)
        ratio, _ = prune_channels_to_macs(
            pruned, bench.example, lambda m, r: slimming_pruner(m, bench.example, r, reg, [classifier_of(m)], cap),
            target)
        yield {"target": target}, pruned, {"reg": reg, "ratio": round(ratio, 4), "accuracy_after_sparse": accuracy}


FUNCTIONS = {"swp": skeleton_method, "shape": skeleton_method, "swp_paper": swp_paper, "group_lasso": group_lasso,
             "l1_filter": l1_filter, "slimming": slimming}


def points_of(args, spec: Spec) -> List[float]:
    """The points of ``spec``: the paper mode's pushes, else the MACs targets (only ``at`` if given)."""
    if spec.base == "swp_paper":
        return list(args.paper_pushes)
    return [spec.options["at"]] if "at" in spec.options else list(args.targets)


def run_method(bench, baseline: nn.Module, spec: Spec, points: List[float]) -> Iterator[Yield]:
    """The pruned models of ``spec`` from ``baseline`` at ``points`` (targets, or pushes for the paper mode)."""
    torch.manual_seed(bench.seed)  # each method sees the same randomness, whatever ran before it (or --resume)
    bench.train_loader.generator.manual_seed(bench.seed)
    return FUNCTIONS[spec.base](bench, baseline, spec, list(points))

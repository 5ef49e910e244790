"""Does stripe granularity pay? SWP against shape-wise, group-lasso and filter-level pruners at matched MACs (issue 8).

    python benchmarks/granularity.py --quick --threads 1 --doc        # CPU, about 15 min on 2 cores
    python benchmarks/granularity.py --device cuda --doc              # full: ResNet56 and VGG16-BN, all data

For each net (the paper's ResNet56 / VGG16-BN with ``in_chans=1``, or smaller: ``--nets resnet20 --width 0.5``)
on Fashion-MNIST (Debian's ``dataset-fashion-mnist``):

1. one baseline, trained ``--epochs-baseline`` epochs, shared by every method;
2. per method, **one** sparse training of ``--epochs-sparse`` epochs from the baseline (lr ``--lr`` cosine):
   * ``swp``: ``StripePruner`` (Filter Skeleton, L1 ``sr`` from ``--push-swp``), with the per-filter
     renormalisation aid of the continual example (``--renorm 1``; not in the paper);
   * ``shape``: ``swp_plugin.recipes.baselines.ShapeWisePruner``: the same, one skeleton shared by the filters of
     a layer;
   * ``group_lasso``: ``StripeGroupLasso`` on the weights' stripes, strength from ``--push-gl`` (in units of the
     model's mean stripe norm), no skeleton;
   * ``l1_filter``: plain training (no regulariser), so every method trains the same number of epochs;
   * ``slimming``: ``tp.pruner.BNScalePruner.regularize`` (L1 on BatchNorm scales, from ``--push-slim``);
3. from copies of that trained model, one pruned model per MACs target (``--targets``, fractions of the
   baseline's MACs removed): ``swp`` / ``shape`` / ``group_lasso`` with ``StripePruner``'s target mode
   (``macs_reduction``; stripes ranked by ``|FS| * ||W_stripe||``, layer-normalised; shape: whole kernel positions;
   group lasso: FS = 1, i.e. stripe norms), ``l1_filter`` with ``tp.pruner.BasePruner`` +
   ``MagnitudeImportance(p=1)`` (same ratio in every layer), ``slimming`` with ``BNScalePruner`` (global
   ranking), the channel ratio found by bisection to hit the MACs target; the global rankings (all but
   ``l1_filter``) prune at most ``--max-layer-ratio`` (0.9) of a layer, and the stripe methods leave 1x1 convs
   (ResNet shortcuts) dense, as the reference code does (``--prune-pointwise 1`` to change it);
4. every pruned model: filters scaled back to the baseline's norms (``restore_filter_norms``, exact), then
   ``--epochs-finetune`` epochs of fine-tuning (lr ``--lr-finetune`` cosine), test accuracy.

MACs and params (stripe indexes included) are ``swp_plugin.count_ops_and_params`` of the pruned model on one
image. Writes ``--json`` (``{"results": [{"method", "net", "macs", "params", "accuracy", ...}]}``), ``--png``
(accuracy vs MACs per net) and, with ``--doc``, its section of ``docs/results.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn as nn

from swp_plugin import StripeConv2d, StripePruner
from swp_plugin.models import create_model
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
    filter_norm_rms,
    renormalize_skeletons,
    restore_filter_norms,
    sr_for_push,
)
from swp_plugin.recipes.runner import StageRunner

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "granularity.json"
DEFAULT_PNG = ROOT / "docs" / "granularity.png"
DEFAULT_DOC = ROOT / "docs" / "results.md"
SECTION_TITLE = "## Granularity: stripes vs filters (issue 8)"
BEGIN, END = "<!-- granularity:begin -->", "<!-- granularity:end -->"

METHODS = ("swp", "shape", "group_lasso", "l1_filter", "slimming")
LABELS = {"swp": "SWP (stripes, FS)", "shape": "shape-wise (FS shared)", "group_lasso": "group lasso (stripes)",
          "l1_filter": "L1 filter", "slimming": "Network Slimming", "baseline": "baseline"}

PRESETS = {
    # CPU, about 15 minutes on 2 cores (1 torch thread): one small ResNet, 8 000 images
    "quick": dict(nets="resnet20", width=0.5, subset=8000, test_subset=0, batch_size=64, epochs_baseline=6,
                  epochs_sparse=4, epochs_finetune=2, targets="0.3,0.5,0.7"),
    # GPU: the paper's nets at full width, all 60 000 images
    "full": dict(nets="resnet56,vgg16_bn", width=1.0, subset=0, test_subset=0, batch_size=64, epochs_baseline=60,
                 epochs_sparse=30, epochs_finetune=30, targets="0.3,0.4,0.5,0.6,0.7,0.8"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the CPU preset (default: the full preset, for a GPU)")
    p.add_argument("--nets", help="comma-separated: resnet56, vgg16_bn, resnet20 (smaller depth) [preset]")
    p.add_argument("--width", type=float, help="channel width multiplier of the nets [preset]")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of %(default)s")
    p.add_argument("--targets", help="MACs reductions, comma-separated fractions of the baseline's MACs [preset]")
    p.add_argument("--data-path", default=None, help="Fashion-MNIST folder (default: Debian's package)")
    p.add_argument("--subset", type=int, help="training images; 0 = all 60 000 [preset]")
    p.add_argument("--test-subset", type=int, help="test images; 0 = all 10 000 [preset]")
    p.add_argument("--batch-size", type=int, help="[preset]")
    p.add_argument("--epochs-baseline", type=int, help="[preset]")
    p.add_argument("--epochs-sparse", type=int, help="sparse training (plain training for l1_filter) [preset]")
    p.add_argument("--epochs-finetune", type=int, help="fine-tuning of every pruned model [preset]")
    p.add_argument("--lr", type=float, default=0.05, help="baseline and sparse training (cosine)")
    p.add_argument("--lr-finetune", type=float, default=0.01, help="fine-tuning (cosine)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--push-swp", type=float, default=4.0,
                   help="swp and shape: L1 push on the Filter Skeleton over the sparse training "
                        "(sr = push * (1 - momentum) / sum(lr))")
    p.add_argument("--renorm", type=int, choices=(0, 1), default=1,
                   help="swp and shape: keep each filter's largest FS at 1 (renormalize_skeletons; not in the paper)")
    p.add_argument("--push-gl", type=float, default=0.5,
                   help="group lasso: push in units of the model's mean stripe norm at the start")
    p.add_argument("--push-slim", type=float, default=0.25, help="slimming: L1 push on the BatchNorm scales")
    p.add_argument("--max-layer-ratio", type=float, default=0.9,
                   help="swp, shape, group_lasso, slimming (global rankings): at most this fraction of a layer's "
                        "stripes / channels is pruned")
    p.add_argument("--prune-pointwise", type=int, choices=(0, 1), default=0,
                   help="1: the stripe methods prune 1x1 convs too (default 0: left dense, as the reference code "
                        "does with ResNet shortcuts)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(DEFAULT_JSON), help="results JSON (default %(default)s)")
    p.add_argument("--png", default=str(DEFAULT_PNG), help="accuracy vs MACs picture (default %(default)s)")
    p.add_argument("--doc", nargs="?", const=str(DEFAULT_DOC), default=None, metavar="MD",
                   help=f"rewrite the section '{SECTION_TITLE[3:]}' of this file (default {DEFAULT_DOC.name})")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--render", action="store_true",
                   help="no training: redraw --png and rewrite --doc from the results in --json")
    args = p.parse_args(argv)
    args.preset = "quick" if args.quick else "full"
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.nets = [n for n in str(args.nets).split(",") if n]
    args.methods = [m for m in str(args.methods).split(",") if m]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    args.targets = [float(t) for t in str(args.targets).split(",") if t]
    if not args.targets or not all(0 < t < 1 for t in args.targets):
        p.error("--targets must be fractions in (0, 1)")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


class Bench(StageRunner):
    """The stage runner on Fashion-MNIST with the benchmark's options (``args``)."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__("fashion_mnist", args.data_path, subset=args.subset, test_subset=args.test_subset,
                         batch_size=args.batch_size, test_batch=500, weight_decay=args.weight_decay,
                         device=args.device, seed=args.seed, progress=not args.no_progress)
        self.args = args
        print(self.describe("fashion_mnist"), flush=True)


def dense_backend(model: nn.Module) -> nn.Module:
    """Every StripeConv2d computes through a dense kernel (same function, faster to train and evaluate on CPU)."""
    for m in model.modules():
        if isinstance(m, StripeConv2d):
            m.backend = "dense"
    return model


# ---------------------------------------------------------------------------------------------- methods
def stripe_ignored(args: argparse.Namespace, model: nn.Module) -> List[nn.Module]:
    """What the stripe methods leave alone: the classifier, and 1x1 convs unless ``--prune-pointwise 1``."""
    return [classifier_of(model)] + ([] if args.prune_pointwise else pointwise_convs(model))


# Each method: (bench, baseline) -> (trained model, prune(model copy, target) -> pruned model, details).


def _skeleton_method(cls):
    def method(bench: Bench, baseline: nn.Module):
        args = bench.args
        sr = sr_for_push(args.push_swp, args.lr, bench.steps(args.epochs_sparse))
        model = copy.deepcopy(baseline)
        norms = feeding_batchnorms(model, bench.example) if args.renorm else {}
        pruner = cls(model, bench.example, sr=sr, macs_reduction=args.targets[0],
                     max_pruning_ratio=args.max_layer_ratio, ignored_layers=stripe_ignored(args, model))
        bench.train(model, args.epochs_sparse, args.lr, f"{cls.__name__} sparse",
                    after_backward=lambda: pruner.regularize(model),
                    after_step=(lambda opt: renormalize_skeletons(pruner, norms, opt)) if norms else None)
        state = copy.deepcopy(model.state_dict())

        def prune(target: float) -> nn.Module:
            pruned = copy.deepcopy(baseline)
            fresh = cls(pruned, bench.example, sr=sr, macs_reduction=target, max_pruning_ratio=args.max_layer_ratio,
                        ignored_layers=stripe_ignored(args, pruned))
            pruned.load_state_dict(state)
            fresh.update_regularizer()
            fresh.step()  # exact: checked inside
            return pruned

        return model, prune, {"sr": sr, "renorm": bool(args.renorm), "skeleton_layers": len(pruner.skeletons)}

    return method


def group_lasso(bench: Bench, baseline: nn.Module):
    args = bench.args
    model = copy.deepcopy(baseline)
    lasso = StripeGroupLasso(model, 0.0, ignored_layers=stripe_ignored(args, model))
    lasso.strength = sr_for_push(args.push_gl, args.lr, bench.steps(args.epochs_sparse)) * lasso.mean_stripe_norm()
    bench.train(model, args.epochs_sparse, args.lr, "group lasso sparse", after_backward=lasso.regularize)

    def prune(target: float) -> nn.Module:
        pruned = copy.deepcopy(model)
        StripePruner(pruned, bench.example, macs_reduction=target, max_pruning_ratio=args.max_layer_ratio,
                     ignored_layers=stripe_ignored(args, pruned)).step()
        return pruned

    return model, prune, {"strength": lasso.strength}


def l1_filter(bench: Bench, baseline: nn.Module):
    args = bench.args
    model = copy.deepcopy(baseline)
    bench.train(model, args.epochs_sparse, args.lr, "l1 filter (plain training)")

    def prune(target: float) -> nn.Module:
        pruned = copy.deepcopy(model)
        ratio, _ = prune_channels_to_macs(
            pruned, bench.example, lambda m, r: l1_filter_pruner(m, bench.example, r, [classifier_of(m)]), target)
        details["ratios"].append(round(ratio, 4))
        return pruned

    details = {"ratios": []}
    return model, prune, details


def slimming(bench: Bench, baseline: nn.Module):
    args = bench.args
    model = copy.deepcopy(baseline)
    reg = sr_for_push(args.push_slim, args.lr, bench.steps(args.epochs_sparse))
    pruner = slimming_pruner(model, bench.example, reg=reg, ignored_layers=[classifier_of(model)],
                             max_pruning_ratio=args.max_layer_ratio)
    bench.train(model, args.epochs_sparse, args.lr, "slimming sparse", after_backward=lambda: pruner.regularize(model))

    def prune(target: float) -> nn.Module:
        pruned = copy.deepcopy(model)
        ratio, _ = prune_channels_to_macs(
            pruned, bench.example,
            lambda m, r: slimming_pruner(m, bench.example, r, reg, [classifier_of(m)], args.max_layer_ratio), target)
        details["ratios"].append(round(ratio, 4))
        return pruned

    details = {"reg": reg, "ratios": []}
    return model, prune, details


METHOD_FUNCTIONS: Dict[str, Callable] = {
    "swp": _skeleton_method(StripePruner),
    "shape": _skeleton_method(ShapeWisePruner),
    "group_lasso": group_lasso,
    "l1_filter": l1_filter,
    "slimming": slimming,
}


# ---------------------------------------------------------------------------------------------- the run
def run_net(bench: Bench, net: str) -> List[dict]:
    args = bench.args
    torch.manual_seed(args.seed)
    baseline = create_model(net, num_classes=bench.num_classes, in_chans=bench.in_chans, width=args.width)
    baseline = baseline.to(args.device)
    start = time.time()
    bench.train(baseline, args.epochs_baseline, args.lr, f"{net} baseline")
    dense_macs, dense_params = bench.counts(baseline)
    acc = bench.accuracy(baseline)
    results = [{"method": "baseline", "net": net, "macs": dense_macs, "params": dense_params, "accuracy": acc,
                "target": 0.0, "macs_reduction": 0.0, "epochs": args.epochs_baseline,
                "seconds": round(time.time() - start, 1)}]
    print(f"[{net}] baseline: {acc:.2f}%, {dense_macs / 1e6:.2f}M MACs, {dense_params / 1e6:.4f}M params", flush=True)
    norms = filter_norm_rms(baseline)
    for name in args.methods:
        start = time.time()
        torch.manual_seed(args.seed)
        trained, prune, details = METHOD_FUNCTIONS[name](bench, baseline)
        acc_sparse = bench.accuracy(trained)
        print(f"[{net}] {name}: after sparse training {acc_sparse:.2f}% ({time.time() - start:.0f}s) {details}",
              flush=True)
        for target in args.targets:
            t0 = time.time()
            torch.manual_seed(args.seed)
            pruned = dense_backend(prune(target))
            macs, params = bench.counts(pruned)
            acc_pruned = bench.accuracy(pruned)
            restore_filter_norms(pruned, bench.example, norms)
            bench.train(pruned, args.epochs_finetune, args.lr_finetune, f"{name} {target:g} finetune")
            acc = bench.accuracy(pruned)
            record = {"method": name, "net": net, "macs": macs, "params": params, "accuracy": acc,
                      "target": target, "macs_reduction": round(1 - macs / dense_macs, 4),
                      "accuracy_before_finetune": acc_pruned, "accuracy_after_sparse": acc_sparse,
                      "epochs": args.epochs_baseline + args.epochs_sparse + args.epochs_finetune,
                      "seconds": round(time.time() - t0, 1), "details": details}
            results.append(record)
            print(f"[{net}] {name} @ {target:g}: {macs / 1e6:.2f}M MACs ({100 * record['macs_reduction']:.1f}% "
                  f"fewer), {params / 1e6:.4f}M params, {acc_pruned:.2f}% -> {acc:.2f}% after fine-tuning "
                  f"({record['seconds']:.0f}s)", flush=True)
    return results


# ---------------------------------------------------------------------------------------------- reporting
def _points(results: Sequence[dict], net: str, method: str) -> List[dict]:
    return sorted((r for r in results if r["net"] == net and r["method"] == method), key=lambda r: r["macs"])


def plot(results: Sequence[dict], path: str | os.PathLike, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = list(dict.fromkeys(r["net"] for r in results))
    fig, axes = plt.subplots(1, len(nets), figsize=(6 * len(nets), 4.5), squeeze=False)
    markers = dict(zip(METHODS, "os^Dv"))
    for ax, net in zip(axes[0], nets):
        base = _points(results, net, "baseline")
        for method in METHODS:
            points = _points(results, net, method)
            if points:
                ax.plot([p["macs"] / 1e6 for p in points], [p["accuracy"] for p in points],
                        marker=markers[method], label=LABELS[method])
        if base:
            ax.axhline(base[0]["accuracy"], color="gray", ls="--", lw=1)
            ax.plot([base[0]["macs"] / 1e6], [base[0]["accuracy"]], "k*", ms=10, label="baseline")
        ax.set_xlabel("MACs (M) per 28x28 image")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(net)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: Sequence[dict], net: str) -> str:
    """Markdown: one row per MACs target, accuracy (and MACs) of each method."""
    methods = [m for m in METHODS if _points(results, net, m)]
    base = _points(results, net, "baseline")
    lines = ["| MACs target | " + " | ".join(LABELS[m] for m in methods) + " |",
             "| --- |" + " --- |" * len(methods)]
    targets = sorted({r["target"] for r in results if r["net"] == net and r["method"] != "baseline"})
    for target in targets:
        cells = []
        for m in methods:
            row = [r for r in results if r["net"] == net and r["method"] == m and r["target"] == target]
            cells.append(f"{row[0]['accuracy']:.2f} ({row[0]['macs'] / 1e6:.2f}M, {row[0]['params'] / 1e6:.3f}M p)"
                         if row else "-")
        lines.append(f"| -{100 * target:.0f}% | " + " | ".join(cells) + " |")
    if base:
        b = base[0]
        lines.append(f"\nBaseline: {b['accuracy']:.2f}%, {b['macs'] / 1e6:.2f}M MACs, {b['params'] / 1e6:.3f}M params. "
                     "Cells: accuracy after fine-tuning (%), MACs, params (with stripe indexes) of the pruned model.")
    before = []
    for m in methods:
        points = _points(results, net, m)
        before.append(f"{LABELS[m]}: " + " / ".join(f"{p['accuracy_before_finetune']:.1f}" for p in
                                                    sorted(points, key=lambda p: p["target"])))
    lines.append("Accuracy right after pruning, before fine-tuning (targets in order): " + "; ".join(before) + ".")
    return "\n".join(lines)


def verdicts(results: Sequence[dict], net: str, tie: float) -> List[str]:
    """Per other method: at which MACs SWP is better, worse, or within ``tie`` points."""
    swp = {r["target"]: r for r in results if r["net"] == net and r["method"] == "swp"}
    lines = []
    for method in METHODS[1:]:
        other = {r["target"]: r for r in results if r["net"] == net and r["method"] == method}
        common = sorted(set(swp) & set(other))
        if not common:
            continue
        parts = {"beats": [], "loses to": [], "ties": []}
        for t in common:
            d = swp[t]["accuracy"] - other[t]["accuracy"]
            where = f"{swp[t]['macs'] / 1e6:.2f}M"
            if abs(swp[t]["macs_reduction"] - other[t]["macs_reduction"]) > 0.02:
                where += f" vs {other[t]['macs'] / 1e6:.2f}M"
            key = "ties" if abs(d) < tie else ("beats" if d > 0 else "loses to")
            parts[key].append(f"-{100 * t:.0f}% MACs ({where}: {d:+.2f})")
        said = [f"{k} it at {', '.join(v)}" for k, v in parts.items() if v and k != "ties"]
        if parts["ties"]:
            said.append(f"is within {tie:g} points of it at {', '.join(parts['ties'])}")
        lines.append(f"- vs {LABELS[method]}: SWP " + "; ".join(said) + ".")
    return lines


def _target_misses(results: Sequence[dict]) -> str:
    off = [r for r in results if r["method"] != "baseline" and abs(r["macs_reduction"] - r["target"]) > 0.015]
    if not off:
        return "every point within 1.5 points of its target"
    said = ", ".join(f"{LABELS[r['method']]} on {r['net']} at -{100 * r['target']:.0f}% reached "
                     f"-{100 * r['macs_reduction']:.1f}%" for r in off)
    return f"every point within 1.5 points of its target except: {said} (the closest the ratio bisection found)"


def section(result: dict, png: str | os.PathLike, doc: str | os.PathLike, tie: float = 0.5) -> str:
    results, args = result["results"], result["args"]
    nets = list(dict.fromkeys(r["net"] for r in results))
    png_rel = os.path.relpath(png, os.path.dirname(os.path.abspath(doc)))
    parts = [SECTION_TITLE, BEGIN, "",
             "Generated by `benchmarks/granularity.py` (do not edit between the markers; rerun with `--doc`).", "",
             "```bash", result["command"], "```", "",
             f"Preset `{args['preset']}`: nets {', '.join(nets)} (width {args['width']:g}, `in_chans=1`), "
             f"Fashion-MNIST {args['subset'] or 60000} training / {args['test_subset'] or 10000} test images, batch "
             f"{args['batch_size']}, SGD momentum 0.9, wd {args['weight_decay']:g}. Every method starts from the same "
             f"baseline ({args['epochs_baseline']} epochs, lr {args['lr']:g} cosine), gets one sparse training of "
             f"{args['epochs_sparse']} epochs (lr {args['lr']:g} cosine; plain training for L1 filter), is pruned "
             f"from copies of it at each MACs target, and each pruned model is fine-tuned {args['epochs_finetune']} "
             f"epoch(s) (lr {args['lr_finetune']:g} cosine). Strengths: SWP/shape-wise push {args['push_swp']:g} "
             f"{'with' if args['renorm'] else 'without'} per-filter renormalisation, group lasso push "
             f"{args['push_gl']:g} (x mean stripe norm), slimming push {args['push_slim']:g}; one seed "
             f"({args['seed']}). Wall time {result['total_seconds'] / 60:.1f} min"
             f" ({result['threads']} thread(s), {args['device']}).", "",
             f"Methods (pruning strengths are MACs targets; {_target_misses(results)}):", "",
             "- SWP: `StripePruner` Filter Skeleton with L1 `sr`; at each target, stripes ranked by "
             "`|FS| * ||W_stripe||` (layer-normalised) and the weakest killed until the MACs target is met, then "
             "the exact `step()` (dead filters removed with their channels).",
             "- shape-wise: `swp_plugin.recipes.baselines.ShapeWisePruner`, the same with one skeleton per layer "
             "shared by its filters (gradients summed over filters), whole kernel positions ranked and killed; 1x1 "
             "convs dense.",
             "- group lasso: `StripeGroupLasso`, penalty `sum ||W[o,:,i,j]||_2` on the weights' stripes; then "
             "`StripePruner` target mode with untrained skeletons, i.e. stripes ranked by weight norm.",
             "- L1 filter: plain training, then `tp.pruner.BasePruner` + `MagnitudeImportance(p=1)`, the same "
             "channel ratio in every layer (coupled residual channels pruned together), ratio bisected to the target.",
             "- Network Slimming: `tp.pruner.BNScalePruner` L1 on BatchNorm scales while training, then global "
             "`|gamma|` ranking (at most 90% of a layer), ratio bisected to the target.",
             f"- SWP, shape-wise and group lasso leave 1x1 convs (ResNet shortcuts) dense"
             f"{' (here: pruned, --prune-pointwise 1)' if args.get('prune_pointwise') else ''}, as the reference "
             f"code does; the global rankings (SWP, shape-wise, group lasso, slimming) prune at most "
             f"{100 * args.get('max_layer_ratio', 0.9):.0f}% of a layer.",
             "- every pruned model: filters scaled back to the baseline's RMS norm (`restore_filter_norms`, exact), "
             "same fine-tuning. MACs and params (stripe indexes included) from `swp_plugin.count_ops_and_params`.",
             "",
             f"The pruned models have trained {args['epochs_sparse'] + args['epochs_finetune']} epochs more than the "
             "baseline, so some of them are more accurate than it: compare the methods with each other (same budget), "
             "not with the baseline.", "",
             f"![accuracy vs MACs]({png_rel})", ""]
    for net in nets:
        parts += [f"**{net}**", "", table(results, net), "",
                  f"Where SWP stands ({net}; accuracy difference SWP minus the other, in points, at the same MACs "
                  f"target; differences under {tie:g} points count as ties, single seed):", ""]
        parts += verdicts(results, net, tie) + [""]
    parts += [END]
    return "\n".join(parts) + "\n"


def write_section(doc: str | os.PathLike, text: str) -> None:
    """Replace this benchmark's section of ``doc`` (between its markers), or append it."""
    path = Path(doc)
    old = path.read_text() if path.exists() else "# Results\n"
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        if head.rstrip().endswith(SECTION_TITLE):
            head = head.rstrip()[: -len(SECTION_TITLE)]
        new = head + text.rstrip("\n") + tail
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def render(args: argparse.Namespace, result: dict) -> None:
    """Write the PNG and the doc section of ``result``, print the tables."""
    results = result["results"]
    if args.png:
        os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
        a = result["args"]
        plot(results, args.png, title=f"Fashion-MNIST ({a['subset'] or 60000} training images), preset {a['preset']},\n"
             f"width {a['width']:g}; epochs: baseline {a['epochs_baseline']}, sparse {a['epochs_sparse']}, "
             f"fine-tune {a['epochs_finetune']}")
        print(f"png -> {args.png}")
    if args.doc:
        write_section(args.doc, section(result, args.png or DEFAULT_PNG, args.doc))
        print(f"section -> {args.doc}")
    for net in dict.fromkeys(r["net"] for r in results):
        print(f"\n{net}\n{table(results, net)}")
        print("\n".join(verdicts(results, net, 0.5)))
    print(f"total {result['total_seconds']:.0f}s")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.render:
        result = json.loads(Path(args.json).read_text())
        render(args, result)
        return result
    previous_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        begin = time.time()
        bench = Bench(args)
        results: List[dict] = []
        for net in args.nets:
            results += run_net(bench, net)
        command = "python benchmarks/granularity.py " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        result = {"results": results, "total_seconds": round(time.time() - begin, 1),
                  "threads": torch.get_num_threads(), "command": command.strip(), "args": vars(args)}
    finally:
        torch.set_num_threads(previous_threads)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"json -> {args.json}")
    render(args, result)
    return result


if __name__ == "__main__":
    main()

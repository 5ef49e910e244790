"""Continual pruning: channel pruning with torch-pruning (Network Slimming, Gate Decorator, DCP or any pruned
checkpoint), then Stripe-Wise Pruning on the result.

    python examples/continual_prune.py                        # default: about 5 min on 2 CPU cores
    python examples/continual_prune.py --first gbn            # Gate-Decorator-style first stage
    python examples/continual_prune.py --first dcp --model vgg19_bn   # discrimination-aware channel pruning
    python examples/continual_prune.py --first checkpoint:runs/continual_prune/slimming.pt
    python examples/continual_prune.py --first none           # SWP on the baseline
    python examples/continual_prune.py --preset paper --dataset cifar10 --data-path data --device cuda

Stages (each trains from the previous one; ``--epochs-*`` set their cost):
  1. baseline: the paper's VGG16-BN / ResNet56 (``--model``, ``--width``) or any timm model, trained on
     ``--subset`` images of Fashion-MNIST (or CIFAR-10 with ``--dataset cifar10 --data-path DIR``), or loaded
     with ``--baseline PATH`` (a stage file of this example, e.g. ``runs/continual_prune/baseline.pt``);
  2. first stage (``--first``): ``slimming`` = ``tp.pruner.BNScalePruner`` sparse training with its
     ``regularize``, global pruning of ``--prune-ratio`` of the channels by BN scale, fine-tune;
     ``gbn`` = Taylor importance of the BN gates accumulated while training, global and iterative
     (``--gbn-steps``) with ``tp.pruner.BasePruner``, fine-tune; ``dcp`` = discrimination-aware channel pruning
     (``swp_plugin.recipes.dcp.DCPPruner``: per stage, fine-tune with an auxiliary loss, greedy channel selection
     per layer, removal through torch-pruning groups; ``--dcp-*``), fine-tune; ``checkpoint:PATH`` = a pruned
     model (a stage file of this example, or a whole model pickled by other code, e.g. DCP's or GBN's),
     evaluated and pruned further; ``none`` = SWP on the baseline;
  3. swp: ``StripePruner`` training with ``regularize`` (``--sr``, or ``auto``: the L1 push ``--push`` over
     the schedule; ``--renorm 1``, the cpu preset, keeps each filter's largest FS value at 1 during training,
     see ``swp_plugin.recipes.continual.renormalize_skeletons``), ``step()`` (exact), fine-tune (``--epochs-finetune``,
     filters first scaled back up exactly, a new optimizer after ``step()``).

Prints one table (accuracy on the test set, params with stripe indexes, MACs, CPU latency of every stage
deployed the same way (``swp_plugin.deploy``) and timed side by side at each ``--latency-batches`` size, training
epochs and seconds). Writes to ``--out``: each stage's model in the ``swp_plugin.save`` format (``<stage>.pt``,
rebuilt with ``swp_plugin.load(path, fresh_model)``; ``swp report <stage>.pt`` reads it), the deployed SWP model
(``swp_deployed.pt``, deployed for batch 1), ``outputs.pt`` (a batch of test images and every saved model's
outputs on it, to check a reload), a filter-shape picture; with ``--json PATH`` the stages as JSON.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

import swp_plugin
from swp_plugin import StripeConv2d, StripePruner, count_ops_and_params
from swp_plugin.measure import measure_latency, plot_stripe_ratios
from swp_plugin.models import MODELS, create_model
from swp_plugin.recipes.continual import (
    BNTaylorImportance,
    classifier_of,
    feeding_batchnorms,
    filter_norm_rms,
    load_pruned_checkpoint,
    renormalize_skeletons,
    restore_filter_norms,
    saved_model,
    sr_for_push,
)
from swp_plugin.recipes.dcp import DCPPruner, aux_criterion
from swp_plugin.recipes.runner import StageRunner

#: Defaults of the schedule options, per preset. ``cpu``: the README's main job, about 5 minutes on
#: 2 CPU cores with Fashion-MNIST; ``paper``: the paper's schedule (160 epochs, batch 64, lr 0.1 divided by
#: 10 at 50% and 75%, sr 1e-5, threshold 0.05, CIFAR-style augmentation) for a GPU.
PRESETS = {
    "cpu": dict(
        model="vgg16_bn", width=0.25, subset=20000, batch_size=64, lr=0.05, lr_finetune=0.01,
        schedule="cosine", weight_decay=1e-4, augment=False, epochs_baseline=8, epochs_sparse=3,
        slim_reg="auto", slim_push=0.25, gbn_steps=3, epochs_gbn_step=1, prune_ratio=0.4,
        epochs_first_finetune=3, sr="auto", renorm=1, push=None, threshold=0.05, epochs_swp=4, epochs_finetune=5,
        dcp_ratio=0.3, dcp_aux=2, epochs_dcp_stage=1, dcp_batches=4,
    ),
    "paper": dict(
        model="vgg16_bn", width=1.0, subset=None, batch_size=64, lr=0.1, lr_finetune=0.1,
        schedule="step", weight_decay=1e-4, augment=True, epochs_baseline=160, epochs_sparse=160,
        slim_reg="1e-4", slim_push=None, gbn_steps=10, epochs_gbn_step=10, prune_ratio=0.5,
        epochs_first_finetune=160, sr="1e-5", renorm=0, push=None, threshold=0.05, epochs_swp=160, epochs_finetune=0,
        dcp_ratio=0.3, dcp_aux=2, epochs_dcp_stage=20, dcp_batches=10,
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="defaults of the options marked [preset]: cpu (default; Fashion-MNIST on 2 CPU cores) or "
                        "paper (160 epochs, batch 64, lr 0.1 /10 at 50%% and 75%%, sr 1e-5, augmentation)")
    a = p.add_argument_group("data and model")
    a.add_argument("--dataset", default="fashion_mnist", help="fashion_mnist, mnist, cifar10, cifar100")
    a.add_argument("--data-path", default=None, help="dataset folder (Fashion-MNIST: Debian's package if absent)")
    a.add_argument("--download", action="store_true", help="let torchvision download into --data-path")
    a.add_argument("--subset", type=int, help="training images used; 0 = all [preset]")
    a.add_argument("--test-subset", type=int, default=0, help="test images used; 0 = all (default)")
    a.add_argument("--augment", type=int, choices=(0, 1), help="random crop + flip [preset]")
    a.add_argument("--model", help=f"{', '.join(MODELS)} or a timm model name [preset]")
    a.add_argument("--width", type=float, help="channel width multiplier of the paper's nets [preset]")
    a.add_argument("--baseline", default=None, metavar="PATH",
                   help="load the baseline (a stage file of this example: swp_plugin.save) instead of training it")
    a.add_argument("--trust-pickle", action="store_true",
                   help="allow --baseline / --first checkpoint:PATH to be a pickled whole model (torch.save(model)); "
                        "unpickling runs code from the file: only for files you trust")
    t = p.add_argument_group("training (SGD, momentum 0.9)")
    t.add_argument("--batch-size", type=int, help="[preset]")
    t.add_argument("--lr", type=float, help="baseline, sparse and SWP training [preset]")
    t.add_argument("--lr-finetune", type=float, help="fine-tuning after each pruning [preset]")
    t.add_argument("--schedule", choices=("cosine", "step", "constant"),
                   help="per stage; step = /10 at 50%% and 75%% [preset]")
    t.add_argument("--weight-decay", type=float, help="[preset]")
    t.add_argument("--epochs-baseline", type=int, help="[preset]")
    f = p.add_argument_group("first stage (torch-pruning)")
    f.add_argument("--first", default="slimming", help="slimming, gbn, dcp, checkpoint:PATH or none (%(default)s)")
    f.add_argument("--prune-ratio", type=float, help="fraction of channels removed, global ranking [preset]")
    f.add_argument("--max-layer-ratio", type=float, default=0.9, help="at most this fraction of a layer")
    f.add_argument("--epochs-sparse", type=int, help="slimming: sparse training epochs [preset]")
    f.add_argument("--slim-reg", help="slimming: L1 on BN scales, a number or auto (from --slim-push) [preset]")
    f.add_argument("--slim-push", type=float, help="slimming: total L1 push on BN scales when auto [preset]")
    f.add_argument("--gbn-steps", type=int, help="gbn: iterative pruning steps [preset]")
    f.add_argument("--epochs-gbn-step", type=int, help="gbn: epochs of training (scoring) per step [preset]")
    f.add_argument("--dcp-ratio", type=float, help="dcp: fraction of each prunable layer's input channels removed "
                                                   "[preset]")
    f.add_argument("--dcp-aux", type=int, help="dcp: auxiliary losses (P; P + 1 stages) [preset]")
    f.add_argument("--dcp-lambda", type=float, default=1.0, help="dcp: weight of the auxiliary loss in channel "
                                                                 "selection (%(default)s)")
    f.add_argument("--epochs-dcp-stage", type=int, help="dcp: fine-tuning with the auxiliary loss per stage [preset]")
    f.add_argument("--dcp-batches", type=int, help="dcp: training batches for each layer's channel selection [preset]")
    f.add_argument("--epochs-first-finetune", type=int, help="fine-tuning after the first stage [preset]")
    s = p.add_argument_group("stripe-wise pruning")
    s.add_argument("--sr", help="L1 strength on the Filter Skeleton, a number or auto (from --push) [preset]")
    s.add_argument("--renorm", type=int, choices=(0, 1),
                   help="1: keep each filter's largest FS at 1 during training, BatchNorm compensating "
                        "(swp_plugin.recipes.continual.renormalize_skeletons; not in the paper) [preset]")
    s.add_argument("--push", type=float,
                   help="auto sr: total L1 push over the SWP schedule (assumes hundreds of steps); default 4 with "
                        "--renorm 1 (a stripe's gap to its filter's strongest grows about exp(push)), else 0.95 "
                        "(stripes start at 1; a cliff: 0.9 kills ~0%%, 1.0 kills ~90%%)")
    s.add_argument("--threshold", type=float, help="stripes with |FS| <= threshold die [preset]")
    s.add_argument("--epochs-swp", type=int, help="training with Filter Skeletons [preset]")
    s.add_argument("--epochs-finetune", type=int, help="fine-tuning after step() [preset]")
    r = p.add_argument_group("run and report")
    r.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    r.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    r.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--latency-batches", default="1,64", help="batch sizes of the deployed latency (%(default)s)")
    r.add_argument("--latency-repeats", type=int, default=50, help="rounds per batch size")
    r.add_argument("--out", default="runs/continual_prune", help="folder for the models and the picture")
    r.add_argument("--json", default=None, metavar="PATH", help="write the stages as JSON")
    r.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = p.parse_args(argv)
    if args.model is not None and args.model not in MODELS:
        if args.width not in (None, 1.0):
            p.error(f"--width is the channel multiplier of {', '.join(MODELS)}; timm model {args.model!r} has none")
        args.width = 1.0
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.augment = bool(args.augment)
    args.latency_batches = [int(b) for b in str(args.latency_batches).split(",") if b]
    if args.push is None:
        args.push = 4.0 if args.renorm else 0.95
    if args.first not in ("slimming", "gbn", "dcp", "none") and not args.first.startswith("checkpoint:"):
        p.error(f"--first must be slimming, gbn, dcp, checkpoint:PATH or none, got {args.first!r}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def _strength(run: Run, name: str, value: str, push: float, steps: int) -> float:
    """``value`` (a number), or with ``auto`` the L1 strength of ``push`` (``sr_for_push``) over ``steps``."""
    if str(value).lower() != "auto":
        try:
            return float(value)
        except ValueError:
            raise SystemExit(f"{name} must be a number or auto, got {value!r}") from None
    return sr_for_push(push, run.args.lr, steps, run.args.schedule) if steps else 0.0


class Run(StageRunner):
    """The stage runner plus the recorded stages, their models and the output folder."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args.dataset, args.data_path, subset=args.subset, test_subset=args.test_subset,
                         batch_size=args.batch_size, augment=args.augment, download=args.download,
                         schedule=args.schedule, weight_decay=args.weight_decay, device=args.device,
                         workers=args.workers, example_batch=max(args.latency_batches), seed=args.seed,
                         progress=not args.no_progress)
        self.args = args
        self.stages: list[dict] = []
        self.models: dict[str, nn.Module] = {}
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        #: how swp_plugin.load / `swp report` rebuild a fresh model for the saved files (cleared for a checkpoint
        #: of unknown architecture)
        self.metadata = {"architecture": args.model, "num_classes": self.num_classes,
                         "input_size": list(self.example.shape[1:]),
                         "model_kwargs": {"width": args.width} if args.model in MODELS else {}}
        print(self.describe(args.dataset))

    def train(self, model: nn.Module, epochs: int, lr: float, desc: str, **hooks):
        return super().train(model, epochs, lr, desc, log=True, **hooks)

    def record(self, name: str, model: nn.Module, epochs: float, accuracy: float | None = None):
        seconds, cpu = self.elapsed()
        acc = self.accuracy(model) if accuracy is None else accuracy
        macs, params = self.counts(model)
        stage = {"name": name, "accuracy": acc, "params": int(params), "macs": int(macs),
                 "epochs": epochs, "train_seconds": round(seconds, 1), "train_cpu_seconds": round(cpu, 1)}
        self.stages.append(stage)
        snapshot = copy.deepcopy(model).cpu().eval()
        self.models[name] = snapshot
        swp_plugin.save(snapshot, self.out / f"{name}.pt", **self.metadata)
        print(f"[{name}] accuracy {acc:.2f}%, {macs / 1e6:.2f}M MACs, {params / 1e6:.4f}M params "
              f"({epochs:g} epochs, {seconds:.0f}s) -> {self.out / (name + '.pt')}", flush=True)
        return stage


def build_baseline(run: Run) -> nn.Module:
    args = run.args
    if args.baseline:
        run.start()
        model = load_checkpoint(run, args.baseline)
        run.record("baseline", model, 0)
        return model
    model = create_model(args.model, num_classes=run.num_classes, in_chans=run.in_chans, width=args.width)
    model = model.to(args.device)
    run.start()
    run.train(model, args.epochs_baseline, args.lr, "baseline")
    run.record("baseline", model, args.epochs_baseline)
    return model


def tp_options(model: nn.Module) -> dict:
    """ignored_layers (the classifier) and what torch-pruning needs for StripeConv2d layers."""
    head = classifier_of(model)
    return {"ignored_layers": [head] if head is not None else [], **swp_plugin.torch_pruning_kwargs()}


def slimming(run: Run, model: nn.Module) -> nn.Module:
    """Network Slimming with torch-pruning: L1 on BN scales while training, global pruning, fine-tune."""
    args = run.args
    steps = run.steps(args.epochs_sparse)
    reg = _strength(run, "--slim-reg", args.slim_reg, args.slim_push, steps)
    pruner = tp.pruner.BNScalePruner(
        model, run.example, importance=tp.importance.BNScaleImportance(normalizer=None), reg=reg,
        global_pruning=True, pruning_ratio=args.prune_ratio, max_pruning_ratio=args.max_layer_ratio,
        **tp_options(model),
    )
    print(f"slimming: reg {reg:.3g} on BN scales for {args.epochs_sparse} epochs, then prune "
          f"{100 * args.prune_ratio:.0f}% of the channels (global), fine-tune {args.epochs_first_finetune} epochs")
    run.start()
    run.train(model, args.epochs_sparse, args.lr, "slimming sparse", after_backward=lambda: pruner.regularize(model))
    pruner.step()
    print(f"  after pruning: {run.accuracy(model):.2f}% (before fine-tuning)")
    run.train(model, args.epochs_first_finetune, args.lr_finetune, "slimming finetune")
    run.record("slimming", model, args.epochs_sparse + args.epochs_first_finetune)
    return model


def gbn(run: Run, model: nn.Module) -> nn.Module:
    """Gate-Decorator-style: Taylor score of BN gates while training, global, iterative pruning."""
    args = run.args
    importance = BNTaylorImportance()
    pruner = tp.pruner.BasePruner(
        model, run.example, importance=importance, global_pruning=True, pruning_ratio=args.prune_ratio,
        max_pruning_ratio=args.max_layer_ratio, iterative_steps=args.gbn_steps, **tp_options(model),
    )
    print(f"gbn: {args.gbn_steps} steps of {args.epochs_gbn_step} epoch(s) scoring |gamma * dL/dgamma|, "
          f"pruning to {100 * args.prune_ratio:.0f}% of the channels (global), fine-tune "
          f"{args.epochs_first_finetune} epochs")
    run.start()
    for k in range(args.gbn_steps):
        importance.reset()
        if args.epochs_gbn_step:
            run.train(model, args.epochs_gbn_step, args.lr_finetune, f"gbn step {k + 1}",
                      after_backward=lambda: importance.accumulate(model))
        else:  # score on one pass without updates
            _score_only(run, model, importance)
        pruner.step()
        macs, _ = count_ops_and_params(model, run.example)
        print(f"  gbn step {k + 1}/{args.gbn_steps}: {macs / 1e6:.2f}M MACs")
    importance.reset()
    run.train(model, args.epochs_first_finetune, args.lr_finetune, "gbn finetune")
    epochs = args.gbn_steps * args.epochs_gbn_step + args.epochs_first_finetune
    run.record("gbn", model, epochs)
    return model


def _score_only(run: Run, model: nn.Module, importance: BNTaylorImportance) -> None:
    model.train()
    for x, y in run.train_loader:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x.to(run.args.device)), y.to(run.args.device)).backward()
        importance.accumulate(model)
    model.zero_grad(set_to_none=True)


def load_checkpoint(run: Run, path: str) -> nn.Module:
    """A ``swp_plugin.save`` file of this example (its architecture in the metadata), or a whole pickled model; the
    saved stages then record the architecture only when it is known."""
    saved = saved_model(path)
    if saved is not None:
        model, meta = saved
        run.metadata = {k: meta[k] for k in ("architecture", "num_classes", "input_size", "model_kwargs")}
        return model.to(run.args.device)
    if not run.args.trust_pickle:
        raise SystemExit(f"{path}: a pickled model (torch.save(model)), not a swp_plugin.save file; unpickling runs "
                         "code from the file: pass --trust-pickle only for a file you trust")
    run.metadata = {}
    print(f"{path}: a pickled model of unknown architecture; the stage files are written with swp_plugin.save "
          "without an architecture (load them with swp_plugin.load(path, <a fresh instance of it>))")
    return load_pruned_checkpoint(path, run.args.device, trust_pickle=run.args.trust_pickle)


def dcp(run: Run, model: nn.Module) -> nn.Module:
    """Discrimination-aware channel pruning: per stage, fine-tune with the stage's auxiliary loss, select each
    layer's input channels greedily and remove the others (torch-pruning groups); fine-tune."""
    args = run.args
    pruner = DCPPruner(model, run.example, pruning_ratio=args.dcp_ratio, num_aux=args.dcp_aux, lam=args.dcp_lambda,
                       **tp_options(model))
    print(f"dcp: {len(pruner.units)} layers in {pruner.num_stages} stages, {args.epochs_dcp_stage} epoch(s) of "
          f"final + auxiliary loss per stage, {100 * args.dcp_ratio:.0f}% of each layer's input channels removed "
          f"(selection on {args.dcp_batches} batches), fine-tune {args.epochs_first_finetune} epochs")
    for name, reason in pruner.skipped.items():
        print(f"  not pruned: {name} ({reason})")
    run.start()
    selection = 0.0
    for p in range(pruner.num_stages):
        run.train(pruner.aux_model(p), args.epochs_dcp_stage, args.lr_finetune, f"dcp stage {p + 1}",
                  criterion=aux_criterion)
        batches = [(x.to(args.device), y.to(args.device)) for x, y in itertools.islice(run.train_loader,
                                                                                      args.dcp_batches)]
        begin = time.time()
        kept = pruner.prune_stage(p, batches)
        selection += time.time() - begin
        macs, _ = count_ops_and_params(model, run.example)
        print(f"  dcp stage {p + 1}/{pruner.num_stages}: " + ", ".join(f"{n} {k}/{c}" for n, k, c in kept)
              + f" input channels; {macs / 1e6:.2f}M MACs ({time.time() - begin:.0f}s selection)")
    acc_pruned = run.accuracy(model)
    print(f"  after pruning: {acc_pruned:.2f}% (before fine-tuning)")
    run.train(model, args.epochs_first_finetune, args.lr_finetune, "dcp finetune")
    stage = run.record("dcp", model, pruner.num_stages * args.epochs_dcp_stage + args.epochs_first_finetune)
    stage.update({"accuracy_before_finetune": acc_pruned, "selection_seconds": round(selection, 1)})
    return model


def from_checkpoint(run: Run, path: str) -> nn.Module:
    run.start()
    model = load_checkpoint(run, path)
    try:
        with torch.no_grad():
            out = model.eval()(run.example)
    except Exception as err:
        raise SystemExit(f"{path}: the model does not run on {run.args.dataset} inputs "
                         f"{tuple(run.example.shape)}: {err}") from err
    if out.shape[-1] != run.num_classes:
        raise SystemExit(f"{path}: the model has {out.shape[-1]} outputs, {run.args.dataset} has {run.num_classes}")
    run.record("checkpoint", model, 0)
    return model


def swp(run: Run, model: nn.Module) -> nn.Module:
    args = run.args
    steps = run.steps(args.epochs_swp)
    sr = _strength(run, "--sr", args.sr, args.push, steps)
    filters_before = {n: m.out_channels for n, m in model.named_modules()
                      if isinstance(m, (nn.Conv2d, StripeConv2d))}
    norms_before = filter_norm_rms(model)
    batchnorms = feeding_batchnorms(model, run.example) if args.renorm else {}
    head = classifier_of(model)
    pruner = StripePruner(model, run.example, sr=sr, threshold=args.threshold,
                          ignored_layers=[head] if head is not None else [])
    print(f"swp: sr {sr:.3g}, threshold {args.threshold} for {args.epochs_swp} epochs "
          f"({len(pruner.skeletons)} convs with a Filter Skeleton"
          f"{f', {len(batchnorms)} renormalised' if args.renorm else ''}), fine-tune {args.epochs_finetune} epochs")
    run.start()
    run.train(model, args.epochs_swp, args.lr, "swp", after_backward=lambda: pruner.regularize(model),
              after_step=(lambda opt: renormalize_skeletons(pruner, batchnorms, opt)) if batchnorms else None,
              after_epoch=lambda e, loss: print(f"    dead stripes {100 * pruner.stripe_sparsity():.1f}%"))
    acc_trained = run.accuracy(model)
    dead = pruner.stripe_sparsity()  # (only readable before step())
    pruner.step()  # exact: checked inside (raises if the outputs changed)
    acc_pruned = run.accuracy(model)
    macs, params = count_ops_and_params(model, run.example)
    print(f"  after step(): {acc_pruned:.2f}% (with skeletons: {acc_trained:.2f}%), {macs / 1e6:.2f}M MACs, "
          f"{params / 1e6:.4f}M params; dead stripes {100 * dead:.1f}%")
    for note in pruner.notes:
        print(f"  note: {note}")
    if args.epochs_finetune:
        # The L1 push shrank the filters (FS merged into the weights); scale them back up, exactly, so that
        # fine-tuning at an ordinary learning rate does not take huge effective steps. A new optimizer: the
        # parameters were replaced by step().
        restore_filter_norms(model, run.example, norms_before)
        run.train(model, args.epochs_finetune, args.lr_finetune, "swp finetune")
    stage = run.record("swp", model, args.epochs_swp + args.epochs_finetune)
    stage.update({"sr": sr, "dead_stripes": dead, "accuracy_before_finetune": acc_pruned})
    picture = run.out / "filter_shapes.png"
    try:
        plot_stripe_ratios(model, picture, original_filters=filters_before,
                           title=f"{args.model}: kept stripes per kernel position after SWP")
        print(f"filter shapes -> {picture}")
    except ImportError:
        print("matplotlib is not installed: no filter-shape picture")
    except ValueError as error:  # no KxK stripe layer left
        print(f"no filter-shape picture: {error}")
    return model


def deployed_latency(run: Run) -> None:
    """Every stage deployed the same way (``swp_plugin.deploy`` at this thread count, for each batch size) and
    timed side by side; also the SWP stage as it is (eager ``StripeConv2d``). Writes ``latency_ms_batch<B>`` into
    the stages, saves the deployed SWP model and the reload check ``outputs.pt``."""
    args = run.args
    probe = run.latency_input[:8]
    outputs = {"x": probe}
    for batch in args.latency_batches:
        x = run.latency_input[:batch]
        deployed = {name: swp_plugin.deploy(model, x) for name, model in run.models.items()}
        timed = {**deployed, "swp (eager)": run.models["swp"]}
        print(f"latency: batch {batch}, {args.latency_repeats} rounds, {torch.get_num_threads()} threads, "
              "deployed models")
        latency = measure_latency(timed, x, repeats=args.latency_repeats, threads=args.threads or None,
                                  progress=run.progress)
        for stage in run.stages:
            stage[f"latency_ms_batch{batch}"] = round(latency[stage["name"]], 4)
        run.stages[-1][f"latency_ms_batch{batch}_eager"] = round(latency["swp (eager)"], 4)
        run.stages[-1]["deploy"] = deployed["swp"].deploy_report.summary()
        if batch == args.latency_batches[0]:
            swp_plugin.save(deployed["swp"], run.out / "swp_deployed.pt", **run.metadata)
            with torch.no_grad():
                outputs.update({name: model(probe) for name, model in run.models.items()},
                               swp_deployed=deployed["swp"](probe))
    torch.save(outputs, run.out / "outputs.pt")


def format_table(stages: Sequence[Mapping], batches: Sequence[int], title: str | None = None) -> str:
    """The stage table: accuracy, params (M, with stripe indexes), MACs (M), deployed latency per batch size,
    training cost."""
    lines = [title] if title else []
    lines.append(f"{'stage':<12}{'acc (%)':>9}{'params (M)':>12}{'MACs (M)':>10}"
                 + "".join(f"{f'b{b} (ms)':>11}" for b in batches) + f"{'epochs':>8}{'train (s)':>11}")
    for s in stages:
        cells = "".join(f"{s[f'latency_ms_batch{b}']:>11.3f}" if f"latency_ms_batch{b}" in s else f"{'-':>11}"
                        for b in batches)
        lines.append(f"{s['name']:<12}{s['accuracy']:>9.2f}{s['params'] / 1e6:>12.4f}{s['macs'] / 1e6:>10.2f}"
                     f"{cells}{s.get('epochs', 0):>8g}{s.get('train_seconds', 0):>11.0f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _main(args, argv)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace, argv) -> dict:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    begin = time.time()
    run = Run(args)

    if args.first.startswith("checkpoint:"):
        if args.baseline:
            build_baseline(run)
        model = from_checkpoint(run, args.first.split(":", 1)[1])
    else:
        model = build_baseline(run)
        if args.first == "slimming":
            model = slimming(run, model)
        elif args.first == "gbn":
            model = gbn(run, model)
        elif args.first == "dcp":
            model = dcp(run, model)
    model = swp(run, model)

    deployed_latency(run)
    total = time.time() - begin
    print()
    print(format_table(run.stages, args.latency_batches,
                       f"{args.model} on {args.dataset}, --first {args.first}, total {total:.0f}s; latency: deployed, "
                       f"{torch.get_num_threads()} threads"))
    swp_stage = run.stages[-1]
    print(f"deployed: {swp_stage['deploy']}; swp not deployed (eager StripeConv2d, backend auto): "
          + ", ".join(f"batch {b} {swp_stage[f'latency_ms_batch{b}_eager']:.3f} ms" for b in args.latency_batches))
    result = {"stages": run.stages, "total_seconds": round(total, 1), "command": " ".join(sys.argv[1:])
              if argv is None else " ".join(argv), "args": vars(args)}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"json -> {args.json}")
    return result


if __name__ == "__main__":
    main()

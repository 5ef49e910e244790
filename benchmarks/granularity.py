"""Does stripe granularity pay? SWP against shape-wise, group-lasso and filter-level pruners, several seeds.

    python benchmarks/granularity.py --preset quick --jobs 2 --threads 1 --doc        # CPU, 3 seeds, ablation
    python benchmarks/granularity.py --preset medium --threads 1 --doc                # CPU, hours
    flock /tmp/cpu.lock python benchmarks/granularity.py --preset quick --latency-only --doc

Per seed (``--seeds``; ``--jobs 2`` runs two seeds as parallel processes), per net (the paper's ResNet56 /
VGG16-BN or the smaller ResNet20, ``in_chans=1``) on Fashion-MNIST (Debian's ``dataset-fashion-mnist``):

1. one baseline (``--epochs-baseline``), shared by every method of that seed;
2. per method (``--methods``, specs of ``benchmarks/granularity_methods.py``, e.g. ``swp:push=8``), its sparse
   training (``--epochs-sparse``; plain training for L1 filter pruning), then one pruned model per MACs target
   (``--targets``) or, for the paper's threshold mode ``swp_paper``, one sparse training and ``step()`` per L1 push
   (``--paper-pushes``);
3. every pruned model: filters scaled back to the baseline's norms (``restore_filter_norms``, exact), then
   ``--epochs-finetune`` epochs (lr ``--lr-finetune`` cosine), test accuracy; the model is saved
   (``swp_plugin.save``) in ``--models-dir`` for ``--latency-only``.

``--latency-only`` loads every saved model of ``--json`` and times them side by side (batch 1 and 64,
``--latency-threads``), through ``swp_plugin.deploy`` when the package has it. Each seed's rows are written to
``<models-dir>/seed<S>.json`` after every model (``--resume`` keeps them); the merged ``--json`` has rows
``{"method", "seed", "net", "target" | "push", "macs", "params", "accuracy", "latency_b1_ms", ...}``. ``--doc``
rewrites the section of ``docs/results.md`` from the quick, medium (and full) JSONs (reporting:
``benchmarks/granularity_report.py``).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import granularity_report as report  # noqa: E402
from granularity_methods import parse_spec, points_of, run_method  # noqa: E402

import swp_plugin  # noqa: E402
from swp_plugin import StripeConv2d  # noqa: E402
from swp_plugin.measure import measure_latency  # noqa: E402
from swp_plugin.models import create_model  # noqa: E402
from swp_plugin.recipes.continual import filter_norm_rms, restore_filter_norms  # noqa: E402
from swp_plugin.recipes.runner import StageRunner  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MAIN_METHODS = "swp,swp_paper,shape,group_lasso,l1_filter,slimming"
#: the ablation: SWP variants (options over the defaults) run beside the main methods, same baselines;
#: the first is the configuration of issue 8 (one shot, score fs)
VARIANTS = ("swp:score=fs:gradual=0,swp:score=fs:at=0.7,swp:gradual=0:at=0.7,swp:score=fs:gradual=0:push=8:at=0.7,"
            "swp:score=fs:gradual=0:epochs=8:at=0.7,swp:score=fs:gradual=0:renorm=0:push=0.9:at=0.7")

PRESETS = {
    # CPU, ~15 min per seed on one core: one small ResNet, 8 000 images
    "quick": dict(nets="resnet20", width=0.5, subset=8000, test_subset=0, batch_size=64, epochs_baseline=6,
                  epochs_sparse=4, epochs_finetune=2, targets="0.3,0.5,0.7", seeds="0,1,2", gradual=4,
                  paper_pushes="0.95,0.975,1.0", methods=f"{MAIN_METHODS},{VARIANTS}"),
    # CPU, a few hours on one shared core at low priority: all 60 000 images, 2-3x the quick schedule, one seed
    "medium": dict(nets="resnet20", width=0.5, subset=0, test_subset=0, batch_size=128, epochs_baseline=6,
                   epochs_sparse=3, epochs_finetune=2, targets="0.5,0.7", seeds="0", gradual=3,
                   paper_pushes="0.95,1.0", methods="swp,swp_paper,l1_filter,slimming"),
    # GPU: the paper's nets at full width, all 60 000 images
    "full": dict(nets="resnet56,vgg16_bn", width=1.0, subset=0, test_subset=0, batch_size=64, epochs_baseline=60,
                 epochs_sparse=30, epochs_finetune=30, targets="0.3,0.4,0.5,0.6,0.7,0.8", seeds="0", gradual=5,
                 paper_pushes="0.9,0.95,1.0"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="full", help="[preset] marks its defaults")
    p.add_argument("--quick", action="store_true", help="--preset quick")
    p.add_argument("--nets", help="comma-separated: resnet56, vgg16_bn, resnet20 [preset]")
    p.add_argument("--width", type=float, help="channel width multiplier of the nets [preset]")
    p.add_argument("--methods", help=f"comma-separated method specs ({MAIN_METHODS} and, quick, SWP variants)")
    p.add_argument("--targets", help="MACs reductions, fractions of the baseline's MACs [preset]")
    p.add_argument("--seeds", help="comma-separated seeds [preset]")
    p.add_argument("--jobs", type=int, default=1, help="seeds run as this many parallel processes (at most 2)")
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
    p.add_argument("--push-swp", type=float, default=4.0, help="swp, shape: L1 push on the Filter Skeleton "
                   "(sr = push * (1 - momentum) / sum(lr))")
    p.add_argument("--renorm", type=int, choices=(0, 1), default=1,
                   help="swp, shape: keep each filter's largest FS at 1 (renormalize_skeletons; not in the paper)")
    p.add_argument("--gradual", type=int, help="swp, shape: kill stripes in this many steps during the sparse "
                   "training (one training per target); 0: one shot after it [preset]")
    p.add_argument("--score", choices=("fs", "fs_bn"), default="fs_bn",
                   help="swp, shape, group_lasso: stripe ranking of the target (StripePruner's score)")
    p.add_argument("--paper-pushes", help="swp_paper: L1 pushes, one sparse training each [preset]")
    p.add_argument("--paper-threshold", type=float, default=0.05, help="swp_paper: the paper's delta")
    p.add_argument("--paper-renorm", type=int, choices=(0, 1), default=0, help="swp_paper: renormalisation aid")
    p.add_argument("--push-gl", type=float, default=0.5, help="group lasso: push in mean stripe norms")
    p.add_argument("--push-slim", type=float, default=0.25, help="slimming: L1 push on the BatchNorm scales")
    p.add_argument("--max-layer-ratio", type=float, default=0.9,
                   help="global rankings: at most this fraction of a layer's stripes / channels is pruned")
    p.add_argument("--prune-pointwise", type=int, choices=(0, 1), default=0,
                   help="1: the stripe methods prune 1x1 convs too (default: dense, as the reference code)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--json", help="merged results (default benchmarks/results/granularity_<preset>.json)")
    p.add_argument("--models-dir", help="saved models and per-seed rows (default: <json stem>_models beside --json, "
                   "under runs/granularity/ for the default JSONs)")
    p.add_argument("--resume", action="store_true", help="keep the rows (and models) a previous run saved")
    p.add_argument("--latency-only", action="store_true", help="(re)time the saved models of --json, render")
    p.add_argument("--latency-threads", type=int, default=2)
    p.add_argument("--latency-repeats", type=int, default=30, help="rounds at batch 64 (x3 at batch 1)")
    p.add_argument("--doc", nargs="?", const=str(report.DEFAULT_DOC), default=None, metavar="MD",
                   help="rewrite the granularity section of this file (default docs/results.md)")
    p.add_argument("--render", action="store_true", help="no training: redraw the pictures and --doc from JSONs")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.preset = "quick" if args.quick else args.preset
    preset = dict(PRESETS[args.preset])
    preset.setdefault("methods", MAIN_METHODS)
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.nets = [n for n in str(args.nets).split(",") if n]
    try:
        args.methods = [parse_spec(m).name for m in str(args.methods).split(",") if m]
    except ValueError as err:
        p.error(str(err))
    args.targets = [float(t) for t in str(args.targets).split(",") if t]
    args.paper_pushes = [float(t) for t in str(args.paper_pushes).split(",") if t]
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s]
    if not args.targets or not all(0 < t < 1 for t in args.targets):
        p.error("--targets must be fractions in (0, 1)")
    if not 1 <= args.jobs <= 2:
        p.error("--jobs: 1 or 2 (a 2-core machine)")
    args.json = args.json or str(RESULTS / f"granularity_{args.preset}.json")
    default_dir = ROOT / "runs" / "granularity" if Path(args.json).parent == RESULTS else Path(args.json).parent
    args.models_dir = args.models_dir or str(default_dir / f"{Path(args.json).stem}_models")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


class Bench(StageRunner):
    """The stage runner on Fashion-MNIST with the benchmark's options (``args``), for one seed."""

    def __init__(self, args: argparse.Namespace, seed: int) -> None:
        super().__init__("fashion_mnist", args.data_path, subset=args.subset, test_subset=args.test_subset,
                         batch_size=args.batch_size, test_batch=500, weight_decay=args.weight_decay,
                         device=args.device, seed=seed, progress=not args.no_progress)
        self.args, self.seed = args, seed


def dense_backend(model: nn.Module) -> nn.Module:
    """Every StripeConv2d computes through a dense kernel (same function, faster to train on CPU)."""
    for m in model.modules():
        if isinstance(m, StripeConv2d):
            m.backend = "dense"
    return model


def kept_fractions(model: nn.Module, dense: Dict[str, int]) -> Dict[str, float]:
    """Per conv: weights (= MACs, same positions) kept, as a fraction of the baseline's layer."""
    return {n: round(m.weight.numel() / dense[n], 4) for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, StripeConv2d)) and n in dense}


def _file(seed: int, method: str, point: Dict[str, float]) -> str:
    key = "_".join(f"{k}{v:g}" for k, v in point.items())
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"seed{seed}_{method}_{key}.pt")


def _fresh(args, net: str) -> nn.Module:
    return create_model(net, num_classes=10, in_chans=1, width=args.width)


def _key(row: dict) -> tuple:
    """A row's point: (net, method, MACs target, push); the baseline's target is 0."""
    return row["net"], row["method"], row.get("target"), row.get("push")


def run_seed(args: argparse.Namespace, seed: int) -> List[dict]:
    """Every net and method for one seed; rows written to ``<models-dir>/seed<S>.json`` after each model."""
    out = Path(args.models_dir)
    out.mkdir(parents=True, exist_ok=True)
    part = out / f"seed{seed}.json"
    rows: List[dict] = json.loads(part.read_text())["results"] if args.resume and part.exists() else []
    rows = list({_key(r): r for r in rows if (out / r["model"]).exists()}.values())  # the last row of a point
    done = {_key(r) for r in rows}

    def save_rows() -> None:
        part.write_text(json.dumps({"seed": seed, "results": rows}, indent=1) + "\n")

    torch.manual_seed(seed)
    random.seed(seed)
    bench = Bench(args, seed)
    print(f"[seed {seed}] {bench.describe('fashion_mnist')}", flush=True)
    for net in args.nets:
        start = time.time()
        torch.manual_seed(seed)
        baseline = _fresh(args, net).to(args.device)
        base_file = f"seed{seed}_{net}_baseline.pt"
        if (net, "baseline", 0.0, None) in done:
            swp_plugin.load(out / base_file, baseline)
        else:
            bench.train(baseline, args.epochs_baseline, args.lr, f"{net} baseline")
            swp_plugin.save(baseline, out / base_file)
        dense_macs, _ = bench.counts(baseline)
        dense = {n: m.weight.numel() for n, m in baseline.named_modules() if isinstance(m, nn.Conv2d)}
        norms = filter_norm_rms(baseline)
        if (net, "baseline", 0.0, None) not in done:
            macs, params = bench.counts(baseline)
            rows.append({"method": "baseline", "seed": seed, "net": net, "macs": macs, "params": params,
                         "accuracy": bench.accuracy(baseline), "target": 0.0, "macs_reduction": 0.0,
                         "model": base_file, "seconds": round(time.time() - start, 1)})
            save_rows()
            print(f"[seed {seed}] {net} baseline: {rows[-1]['accuracy']:.2f}%, {macs / 1e6:.2f}M MACs", flush=True)
        for method in args.methods:
            spec = parse_spec(method)
            key = "push" if spec.base == "swp_paper" else "target"
            todo = [p for p in points_of(args, spec) if (net, method, *((None, p) if key == "push" else (p, None)))
                    not in done]
            if not todo:
                continue
            start = time.time()
            for point, pruned, info in run_method(bench, baseline, spec, todo):
                pruned = dense_backend(pruned)
                macs, params = bench.counts(pruned)
                acc_pruned = bench.accuracy(pruned)
                restore_filter_norms(pruned, bench.example, norms)
                torch.manual_seed(seed)
                bench.train_loader.generator.manual_seed(seed)
                bench.train(pruned, args.epochs_finetune, args.lr_finetune, f"{method} {point} finetune")
                record = {"method": method, "seed": seed, "net": net, "target": point.get("target"),
                          "macs": macs, "params": params, "accuracy": bench.accuracy(pruned),
                          "macs_reduction": round(1 - macs / dense_macs, 4), "accuracy_before_finetune": acc_pruned,
                          "accuracy_after_sparse": info.pop("accuracy_after_sparse"),
                          "layers": kept_fractions(pruned, dense), "model": _file(seed, method, point),
                          "seconds": round(time.time() - start, 1), "details": info}
                if "push" in point:
                    record["push"] = point["push"]
                swp_plugin.save(pruned, out / record["model"])
                rows.append(record)
                save_rows()
                start = time.time()
                print(f"[seed {seed}] {net} {method} {point}: {macs / 1e6:.2f}M MACs "
                      f"(-{100 * record['macs_reduction']:.1f}%), {acc_pruned:.2f}% -> {record['accuracy']:.2f}% "
                      f"({record['seconds']:.0f}s)", flush=True)
    return rows


def run(args: argparse.Namespace, argv: List[str]) -> dict:
    """All seeds (``--jobs 2``: two worker processes), merged into one result."""
    begin = time.time()
    if args.jobs > 1 and len(args.seeds) > 1:  # workers: the same options, one seed each (last one wins)
        pending = list(args.seeds)
        running: List[subprocess.Popen] = []
        while pending or running:
            while pending and len(running) < args.jobs:
                seed = pending.pop(0)
                cmd = [sys.executable, __file__, *argv, "--seeds", str(seed), "--jobs", "1", "--worker",
                       "--json", args.json, "--models-dir", args.models_dir]
                running.append(subprocess.Popen(cmd))
            time.sleep(2)
            for proc in [p for p in running if p.poll() is not None]:
                running.remove(proc)
                if proc.returncode:
                    raise RuntimeError(f"worker {shlex.join(proc.args[-8:])} failed ({proc.returncode})")
        rows = [r for s in args.seeds for r in json.loads((Path(args.models_dir) / f"seed{s}.json").read_text())
                ["results"]]
    else:
        rows = [r for seed in args.seeds for r in run_seed(args, seed)]
    wanted = {(m, p) for m in args.methods for p in points_of(args, parse_spec(m))}
    rows = [r for r in rows if r["method"] == "baseline"  # only this run's methods and points (not older ones)
            or (r["method"], r["push"] if r.get("push") is not None else r["target"]) in wanted]
    command = "python benchmarks/granularity.py " + " ".join(shlex.quote(a) for a in argv if a != "--resume")
    return {"results": rows, "total_seconds": round(time.time() - begin, 1), "threads": torch.get_num_threads(),
            "command": command.strip(), "args": {k: v for k, v in vars(args).items() if k not in (
                "json", "models_dir", "worker", "resume", "render", "latency_only", "doc")}}


def _deployed(model: nn.Module, example: torch.Tensor) -> nn.Module:
    model.eval()
    for m in model.modules():
        if isinstance(m, StripeConv2d):
            m.backend = "auto"
    return swp_plugin.deploy(model, example) if hasattr(swp_plugin, "deploy") else model


def latency(args: argparse.Namespace, result: dict) -> None:
    """Time the saved models of ``result`` (baselines and main methods, not the ablation's variants) side by side,
    batch 1 and 64; fields ``latency_b1_ms`` / ``latency_b64_ms`` in their rows."""
    a, out = result["args"], Path(args.models_dir)
    for net in dict.fromkeys(r["net"] for r in result["results"]):
        rows = [r for r in result["results"] if r["net"] == net and (out / r["model"]).exists()
                and (r["method"] == "baseline" or not parse_spec(r["method"]).options)]  # not the ablation's
        for batch, repeats in ((1, 3 * args.latency_repeats), (64, args.latency_repeats)):
            example = torch.randn(batch, 1, 28, 28)
            with torch.no_grad():
                models = {r["model"]: _deployed(swp_plugin.load(out / r["model"], create_model(
                    net, num_classes=10, in_chans=1, width=a["width"])), example) for r in rows}
                times = measure_latency(models, example, repeats=repeats, warmup=3, threads=args.latency_threads,
                                        progress=not args.no_progress)
            for r in rows:
                r[f"latency_b{batch}_ms"] = round(times[r["model"]], 4)
            print(f"{net}: batch {batch}, {len(models)} models timed", flush=True)
    result["latency"] = {"threads": args.latency_threads, "repeats": args.latency_repeats,
                         "form": "swp_plugin.deploy" if hasattr(swp_plugin, "deploy") else "swp_plugin.load",
                         "command": "python benchmarks/granularity.py "
                                    f"--preset {a['preset']} "
                                    "--latency-only --doc"}


def main(argv=None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.render:
        report.render(args.doc, args.json)
        return None
    if args.latency_only:
        result = json.loads(Path(args.json).read_text())
        latency(args, result)
    else:
        previous = torch.get_num_threads()
        if args.threads:
            torch.set_num_threads(args.threads)
        try:
            if args.worker:
                run_seed(args, args.seeds[0])
                return None
            result = run(args, argv)
        finally:
            torch.set_num_threads(previous)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"json -> {args.json}")
    report.render(args.doc, args.json)
    return result


if __name__ == "__main__":
    main()

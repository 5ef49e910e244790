"""CPU latency of the deployed stripe model against ONNX Runtime's dense model and against the channel-pruned
model at equal MACs in ONNX Runtime, side by side in one run.

For each net (the paper's CIFAR VGG16-BN / ResNet56 at 32x32; timm resnet18 / resnet50 / regnetx_004 at
224x224; random init, BatchNorm statistics calibrated), fraction of stripes kept (random skeletons,
``swp_plugin.testing.random_stripe_model``), batch and thread count, the models timed together:

* ``ort_dense``: the dense net exported to ONNX, in **ONNX Runtime** (it folds BatchNorm, fuses Conv+ReLU);
* ``ort_channel``: the rival, the dense net channel-pruned by torch-pruning's magnitude pruner with one uniform
  ratio, bisected so that its MACs equal the stripe model's (``latency_rivals.channel_pruned``), in ONNX Runtime;
* ``deployed``: the model ``swp_plugin.deploy`` returns (BatchNorm folded, per layer the faster of the stripe
  kernel and PyTorch's dense conv, epilogues fused, plain calls on its TorchScript twin);
* ``deployed_eager``: the same with ``deploy(..., torchscript=False)`` (Python between layers).

Ratios: ``vs dense`` = ORT dense / deployed, ``vs channel`` = ORT channel-pruned / deployed, ``of ideal`` =
(ORT dense x stripe MACs / dense MACs) / deployed. Per layer of resnet18 / resnet50 at the smallest keep
(``--layers``): the deployed layer's GMAC/s (kept MACs) against ONNX Runtime's for the same conv dense
(``latency_rivals.layer_rates``). Models on different runtimes are timed in blocks with a pause before each block
(thread pools spin after a call: ``swp_plugin.utils.timing.side_by_side``), order rotated round to round.

Usage (from the repository root; it takes the CPU: run it alone, not under ``nice``)::

    python benchmarks/latency.py --quick   # resnet56 @32 and resnet18 @224, 20% kept, batch 1 (a few minutes)
    python benchmarks/latency.py           # every net, ImageNet nets at 50% / 20% kept, batch 1 / 8; CIFAR 20%, 1 / 64

Writes ``benchmarks/results/latency.json`` (``latency_quick.json`` with ``--quick``), the ``latency`` section of
``docs/performance.md`` and the README's latency table (not with ``--no-docs``; ``--from-json`` re-renders them).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn as nn
from gpu_latency import main as gpu_main
from gpu_latency import wants_cuda
from latency_report import render, target_rows
from latency_rivals import channel_pruned, layer_rates, macs

import swp_plugin
from swp_plugin.deployment.onnx import ort_runner, ort_session
from swp_plugin.layers.kernels import cpu as cpu_kernel
from swp_plugin.measure.latency import measure_latency
from swp_plugin.testing import calibrate_bn, random_stripe_model

ROOT = Path(__file__).resolve().parent.parent
CIFAR = ("vgg16", "resnet56")
IMAGENET = ("resnet18", "resnet50", "regnetx_004")
#: nets with per-layer tables (at their smallest keep)
LAYER_NETS = ("resnet18", "resnet50")
#: per net family: (keep fractions, batches) when not given
DEFAULTS = {"cifar": ((0.2,), (1, 64)), "imagenet": ((0.5, 0.2), (1, 8))}
#: consecutive calls per model and round, pause before each block (thread pools spin after a call)
BLOCK, SETTLE_S = 5, 0.05


def build(name: str, size: int | None = None) -> tuple[nn.Module, int]:
    """Dense net (random init, BatchNorm calibrated, eval) and its input size."""
    torch.manual_seed(0)
    if name in CIFAR:
        from swp_plugin.models import resnet56, vgg16_bn

        model, default = (vgg16_bn() if name == "vgg16" else resnet56()), 32
    else:
        import timm

        model, default = timm.create_model(name, pretrained=False, num_classes=1000), 224
    size = size or default
    calibrate_bn(model, torch.randn(4, 3, size, size))
    return model.eval(), size


def _ort(model: nn.Module, x: torch.Tensor, threads: int, tmp: Path, name: str):
    path = tmp / f"{name}.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=18, input_names=["x"])
    run = ort_runner(ort_session(path, threads), [x])
    return lambda example: run()


def _rounds(models: Dict, x: torch.Tensor, budget_s: float) -> int:
    """Rounds so that the slowest model gets about ``budget_s`` seconds of timed calls (at least 3)."""
    slowest = 0.0
    with torch.inference_mode():
        for model in models.values():
            model(x)
            start = time.perf_counter()
            model(x)
            slowest = max(slowest, time.perf_counter() - start)
    return max(3, min(40, int(budget_s / max(slowest * BLOCK, 1e-6))))


def configuration(dense: nn.Module, stripe: nn.Module, channel: nn.Module, x: torch.Tensor, threads: int,
                  budget_s: float, layers: bool) -> dict:
    """Every model of one (net, keep, batch, threads), timed side by side: ms, deploy's report, per-layer rates."""
    torch.set_num_threads(threads)
    deployed = swp_plugin.deploy(stripe, x, threads=threads)
    eager = swp_plugin.deploy(stripe, x, threads=threads, choices=deployed.deploy_source["choices"],
                              torchscript=False)
    row: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = {"ort_dense": _ort(dense, x, threads, Path(tmp), "dense"),
                  "ort_channel": _ort(channel, x, threads, Path(tmp), "channel"),
                  "deployed": deployed, "deployed_eager": eager}
        rounds = _rounds(models, x, budget_s)
        times = measure_latency(models, x, repeats=rounds, warmup=2, threads=threads, progress=False, block=BLOCK,
                                settle_s=SETTLE_S)
    row.update({f"{k}_ms": round(v, 4) for k, v in times.items()})
    row["rounds"] = rounds
    row["load_avg_1min"] = round(os.getloadavg()[0], 2)  # other processes on the machine while it timed
    row["deploy"] = deployed.deploy_report.summary()
    row["forward"] = deployed.deploy_report.forward
    row["choices"] = deployed.deploy_report.choices
    if layers:
        names = [c["layer"] for c in deployed.deploy_report.choices]
        row["layers"] = layer_rates(deployed, x, names, threads, budget_s=max(0.3, budget_s / 20))
    return row


def plan(args) -> List[tuple]:
    """(net, keep, batch) in run order."""
    out = []
    for net in args.nets:
        keeps, batches = DEFAULTS["cifar" if net in CIFAR else "imagenet"]
        for keep in args.keep or keeps:
            for batch in args.batches or batches:
                out.append((net, keep, batch))
    return out


def run(args) -> dict:
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": _cores(),
                           "torch": torch.__version__, "onnxruntime": _ort_version(),
                           "cpp_kernel": cpu_kernel.available(), "cpp_error": cpu_kernel.build_error()},
               "rows": [], "command": getattr(args, "command", "")}
    built: Dict[str, tuple] = {}
    for net, keep, batch in plan(args):
        if net not in built:
            built = {net: build(net, args.size)}
        dense, size = built[net]
        key = ("stripe", keep)
        if key not in built:  # one skeleton and one channel-pruned rival per (net, keep), MACs matched at batch 1
            torch.manual_seed(1)
            stripe = random_stripe_model(copy.deepcopy(dense), keep).eval()
            x1 = torch.randn(1, 3, size, size)
            dense_macs, stripe_macs = macs(dense, x1), macs(stripe, x1)
            channel, ratio, channel_macs = channel_pruned(dense, x1, stripe_macs)
            built[key] = (stripe, channel, {"dense_gmacs": round(dense_macs / 1e9, 4),
                                            "stripe_gmacs": round(stripe_macs / 1e9, 4),
                                            "channel_gmacs": round(channel_macs / 1e9, 4),
                                            "channel_ratio": round(ratio, 4)})
        stripe, channel, counts = built[key]
        x = torch.randn(batch, 3, size, size)
        layers = args.layers and net in LAYER_NETS and keep == min(args.keep or DEFAULTS["imagenet"][0])
        for threads in args.threads:
            row = {"net": net, "size": size, "keep": keep, "batch": batch, "threads": threads, **counts,
                   **configuration(dense, stripe, channel, x, threads, args.budget, layers)}
            results["rows"].append(row)
            if args.partial:  # each row as it comes: a run stopped early still leaves its rows
                Path(args.partial).write_text(json.dumps(results, indent=1) + "\n")
            print(f"{net}@{size} keep {keep:.0%} batch {batch} threads {threads} (ms): "
                  f"ORT dense {row['ort_dense_ms']:.3f}, ORT channel {row['ort_channel_ms']:.3f}, deployed "
                  f"{row['deployed_ms']:.3f} ({row['forward']}), eager {row['deployed_eager_ms']:.3f}; "
                  f"{row['deploy']}", flush=True)
    return results


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def main(argv: List[str] | None = None) -> None:
    if wants_cuda(argv):  # --device cuda: cuDNN vs torch.compile vs the Triton stripe kernel (gpu_latency.py)
        gpu_main(sys.argv[1:] if argv is None else list(argv))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default=",".join(CIFAR + IMAGENET))
    parser.add_argument("--keep", default="", help="fractions of stripes kept (default per net family)")
    parser.add_argument("--batches", default="", help="batch sizes (default per net family)")
    parser.add_argument("--threads", default="2")
    parser.add_argument("--device", default="cpu", help="cpu (this benchmark) or cuda (benchmarks/gpu_latency.py)")
    parser.add_argument("--size", type=int, default=None, help="input size instead of 32 / 224 (smoke tests)")
    parser.add_argument("--budget", type=float, default=6.0, help="seconds of timed calls of the slowest model")
    parser.add_argument("--no-layers", dest="layers", action="store_false", help="no per-layer GMAC/s tables")
    parser.add_argument("--quick", action="store_true",
                        help="resnet56 and resnet18, 20%% kept, batch 1, 2 threads, shorter budget")
    parser.add_argument("--json", default=None, help="results file (default benchmarks/results/latency[_quick].json)")
    parser.add_argument("--md", default=str(ROOT / "docs" / "performance.md"))
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    parser.add_argument("--no-docs", action="store_true", help="write the JSON, not the docs")
    parser.add_argument("--from-json", help="re-render the docs from a results JSON written by an earlier run")
    args = parser.parse_args(argv)
    argv_used = ["python", "benchmarks/latency.py"] + (sys.argv[1:] if argv is None else list(argv))
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        render(saved, args.md, args.readme)
        print(f"wrote the latency sections of {args.md} and {args.readme}")
        return
    if args.quick:
        args.nets, args.keep, args.batches, args.threads = "resnet56,resnet18", "0.2", "1", "2"
        args.budget = min(args.budget, 3.0)
    args.nets = [n for n in args.nets.split(",") if n]
    unknown = sorted(set(args.nets) - set(CIFAR + IMAGENET))
    if unknown:
        parser.error(f"unknown nets {unknown}: choose from {', '.join(CIFAR + IMAGENET)}")
    args.keep = [float(k) for k in args.keep.split(",") if k]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.threads = [int(t) for t in args.threads.split(",") if t]
    json_path = Path(args.json or ROOT / "benchmarks" / "results" / f"latency{'_quick' if args.quick else ''}.json")
    args.partial = str(json_path.with_suffix(".partial.json"))
    args.command = " ".join(argv_used)
    results: Dict = run(args)
    Path(args.partial).unlink(missing_ok=True)
    results["command"] = " ".join(argv_used)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(target_rows(results["rows"], text=True)))
    print(f"wrote {json_path}")
    if not args.no_docs:
        render(results, args.md, args.readme)
        print(f"wrote the latency sections of {args.md} and {args.readme}")


if __name__ == "__main__":
    main()

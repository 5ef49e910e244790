"""CPU latency of stripe-pruned networks against the dense network in ONNX Runtime and in PyTorch, side by side.

For each net (the paper's CIFAR VGG16-BN / ResNet56 at 32x32, timm resnet18 / resnet50 at 224x224; random init,
BatchNorm statistics calibrated), keep fraction, batch and thread count:

* the dense net in **ONNX Runtime** (exported with ``torch.onnx.export``; ORT folds BatchNorm and fuses
  Conv+ReLU itself) — the anchor — and in PyTorch eager;
* the stripe-pruned net (every ``groups=1`` conv keeps a random fraction of its stripes,
  ``swp_plugin.testing.random_stripe_model``): as it is (eager ``StripeConv2d``, ``backend='auto'``), deployed
  (``swp_plugin.deploy``: BatchNorm folded, per-layer implementation measured, ReLU/residual fused), the deployed
  net scripted (``torch.jit.script`` + ``torch.jit.freeze``: no Python between layers), and exported to ONNX
  (``swp_plugin.deployment.onnx.export_onnx``: per layer the form ORT runs faster, never slower than dense).

Every model of one configuration is timed interleaved (``swp_plugin.measure.measure_latency``: median of
rounds, order rotated), so ratios are side by side. "best deployed" = the faster of deployed eager and
scripted. Also: the deployed layers' choices (dense / kernel) and per-layer times.

Usage (from the repository root; it takes the CPU: run it alone)::

    python benchmarks/latency.py --quick          # VGG16 + ResNet56, 20%, batch 1 and 64, 2 threads (~5 min)
    python benchmarks/latency.py --nets vgg16,resnet56,resnet18 --keep 0.2 --batches 1,64 --threads 1,2

Writes ``benchmarks/results/latency.json`` and ``docs/performance.md`` (not with ``--no-docs``; ``--from-json``
re-renders the doc from a saved run).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn as nn
from latency_report import markdown

import swp_plugin
from swp_plugin.deployment.onnx import export_onnx, ort_runner, ort_session
from swp_plugin.layers.kernels import cpu as cpu_kernel
from swp_plugin.measure.counting import STRIPE_LAYERS, stripe_macs
from swp_plugin.measure.latency import measure_latency
from swp_plugin.testing import calibrate_bn, random_stripe_model

ROOT = Path(__file__).resolve().parent.parent
NETS = ("vgg16", "resnet56", "resnet18", "resnet50")
#: consecutive calls per model and round: PyTorch's and onnxruntime's thread pools spin after a call and slow the
#: other's next calls; the median of a block is past that (swp_plugin.utils.timing.side_by_side)
BLOCK = 10


def build(name: str) -> tuple[nn.Module, int]:
    """Dense net (random init, BatchNorm calibrated, eval) and its input size."""
    torch.manual_seed(0)
    if name in ("vgg16", "resnet56"):
        from swp_plugin.models import resnet56, vgg16_bn

        model, size = (vgg16_bn() if name == "vgg16" else resnet56()), 32
    else:
        import timm

        model, size = timm.create_model(name, pretrained=False, num_classes=1000), 224
    calibrate_bn(model, torch.randn(4, 3, size, size))
    return model.eval(), size


def conv_macs(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(MACs of the stripe layers as dense convs, MACs of their kept stripes) on input ``x``."""
    totals = [0.0, 0.0]

    def hook(module, inputs, output):
        kh, kw = module.kernel_size
        totals[0] += module.out_channels * module.in_channels * kh * kw * output.shape[0] * output.shape[2] \
            * output.shape[3]
        totals[1] += stripe_macs(module, output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, STRIPE_LAYERS)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return totals[0], totals[1]


def repeats_for(model: nn.Module, x: torch.Tensor, wanted: int) -> int:
    """Fewer rounds for slow configurations: about 15 s per model at most, at least 5 rounds."""
    import time

    with torch.inference_mode():
        model(x)
        start = time.perf_counter()
        model(x)
        per_run = time.perf_counter() - start
    return max(5, min(wanted, int(15.0 / max(per_run, 1e-6))))


def configuration(dense: nn.Module, stripe: nn.Module, x: torch.Tensor, threads: int, repeats: int,
                  onnx: bool) -> dict:
    """Every runtime of one (net, keep, batch, threads), timed side by side; ms and the deployed report."""
    torch.set_num_threads(threads)
    deployed = swp_plugin.deploy(stripe, x, threads=threads)
    with torch.no_grad():
        scripted = torch.jit.freeze(torch.jit.script(copy.deepcopy(deployed).eval()))
    models = {"torch_dense": dense, "stripe_eager": stripe, "deployed": deployed, "scripted": scripted}
    row: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if onnx:
            path = Path(tmp) / "dense.onnx"
            torch.onnx.export(dense, (x,), str(path), dynamo=False, opset_version=18, input_names=["x"])
            models["ort_dense"] = _callable(ort_runner(ort_session(path, threads), [x]))
            report = export_onnx(copy.deepcopy(deployed), x, Path(tmp) / "stripe.onnx", threads=threads,
                                 rounds=max(5, repeats // 2))
            models["ort_stripe"] = _callable(ort_runner(ort_session(Path(tmp) / "stripe.onnx", threads), [x]))
            row["ort_export"] = {k: v for k, v in report.items() if k != "layers"}
        rounds = repeats_for(dense, x, repeats)
        times = measure_latency(models, x, repeats=max(3, rounds // BLOCK), warmup=2, threads=threads,
                                progress=False, block=BLOCK, settle_s=0.05)
    row.update({f"{k}_ms": round(v, 4) for k, v in times.items()})
    row["best_deployed_ms"] = min(row["deployed_ms"], row["scripted_ms"])
    row["deploy"] = deployed.deploy_report.summary()
    row["choices"] = deployed.deploy_report.choices
    return row


def _callable(run):
    return lambda example: run()


def run(args) -> dict:
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                           "cpp_kernel": cpu_kernel.available(), "cpp_error": cpu_kernel.build_error()},
               "rows": []}
    for net in args.nets:
        dense, size = build(net)
        for keep in args.keep:
            stripe = random_stripe_model(copy.deepcopy(dense), keep).eval()
            for batch in args.batches:
                x = torch.randn(batch, 3, size, size)
                macs_dense, macs_stripe = conv_macs(stripe, x)
                for threads in args.threads:
                    row = {"net": net, "keep": keep, "batch": batch, "threads": threads,
                           "conv_macs_ratio": round(macs_dense / macs_stripe, 3),
                           **configuration(dense, stripe, x, threads, args.repeats, args.onnx)}
                    anchor = row.get("ort_dense_ms", row["torch_dense_ms"])
                    row["speedup_vs_ort_dense"] = round(anchor / row["best_deployed_ms"], 3)
                    results["rows"].append(row)
                    times = ", ".join(f"{k[:-3]} {v:.3f}" for k, v in row.items() if k.endswith("_ms"))
                    print(f"{net} keep {keep:.2f} batch {batch} threads {threads} (ms): {times} -> "
                          f"x{row['speedup_vs_ort_dense']:.2f} vs ORT dense ({row['deploy']})", flush=True)
    return results


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default=",".join(NETS))
    parser.add_argument("--keep", default="0.1,0.2,0.4")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--no-onnx", dest="onnx", action="store_false", help="no onnxruntime columns")
    parser.add_argument("--quick", action="store_true", help="vgg16,resnet56; keep 0.2; batch 1,64; 2 threads")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "latency.json"))
    parser.add_argument("--md", default=str(ROOT / "docs" / "performance.md"))
    parser.add_argument("--no-docs", action="store_true", help="print only, write nothing")
    parser.add_argument("--from-json", help="re-render --md from a results JSON written by an earlier run")
    args = parser.parse_args(argv)
    argv_used = ["python", "benchmarks/latency.py"] + (sys.argv[1:] if argv is None else list(argv))
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        Path(args.md).write_text(markdown(saved) + "\n")
        print(f"wrote {args.md}")
        return
    if args.quick:
        args.nets, args.keep, args.threads = "vgg16,resnet56", "0.2", "2"
    args.nets = [n for n in args.nets.split(",") if n]
    args.keep = [float(k) for k in args.keep.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.threads = [int(t) for t in args.threads.split(",")]
    results: Dict = run(args)
    results["command"] = " ".join(argv_used)
    if args.no_docs:
        return
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    Path(args.md).write_text(markdown(results) + "\n")
    print(f"wrote {args.json} and {args.md}")


if __name__ == "__main__":
    main()

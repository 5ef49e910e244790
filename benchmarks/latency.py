"""CPU latency of stripe-pruned networks against their dense originals (issue 4), side by side.

For each net (the paper's CIFAR VGG16 / ResNet56 at 32x32, timm resnet18 / resnet50 at 224x224, all random
init), keep fraction, batch and thread count: a copy of the dense net with every ``groups=1`` conv replaced
by a ``StripeConv2d`` keeping a random fraction of its stripes (``swp_plugin.testing.random_stripe_model``,
every filter keeps one stripe, so no channel is removed), ``backend='auto'`` (each layer picks the stripe
kernel or the dense conv by a one-time micro-benchmark, done before timing). Dense and stripe nets are
timed interleaved (``swp_plugin.measure.latency.measure_latency``: median of rounds, order rotated).

Extras: the per-layer breakdown (each conv timed alone on its captured input: dense, the compiled kernel,
and what ``auto`` picked; layers of the same shape aggregated), the anchor table of issue 4 (pure-PyTorch
``'stripe'`` loop, compiled kernel, auto), and onnxruntime latency of the exported dense and pruned nets.

Usage (from the repository root; takes the CPU: run it alone, e.g. under ``flock /work/cpu.lock``)::

    python benchmarks/latency.py                  # everything (about 15-25 min on 2 cores)
    python benchmarks/latency.py --quick          # VGG16 + ResNet56, 20%, 2 threads (about 1 min)
    python benchmarks/latency.py --nets vgg16 --keep 0.2 --batches 1 --threads 2 --repeats 30 --no-docs

Writes ``benchmarks/results/latency.json`` and ``docs/performance.md`` (not with ``--no-docs``).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn as nn

from swp_plugin import StripeConv2d
from swp_plugin.layers.kernels import cpu as cpu_kernel
from swp_plugin.measure.latency import measure_latency
from swp_plugin.testing import random_stripe_model

ROOT = Path(__file__).resolve().parent.parent
NETS = ("vgg16", "resnet56", "resnet18", "resnet50")


def build(name: str) -> tuple[nn.Module, int]:
    """Dense net (random init, eval) and its input size."""
    torch.manual_seed(0)
    if name == "vgg16":
        from swp_plugin.models import vgg16_bn

        return vgg16_bn().eval(), 32
    if name == "resnet56":
        from swp_plugin.models import resnet56

        return resnet56().eval(), 32
    import timm

    return timm.create_model(name, pretrained=False, num_classes=1000).eval(), 224


def conv_macs(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(MACs of all convs as dense, MACs of the kept stripes) on input ``x`` (stripe model)."""
    totals = [0.0, 0.0]

    def hook(module, inputs, output):
        kh, kw = module.kernel_size
        pixels = output.shape[0] * output.shape[2] * output.shape[3]
        totals[0] += module.out_channels * module.in_channels * kh * kw * pixels
        totals[1] += module.num_stripes * module.in_channels * pixels

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, StripeConv2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return totals[0], totals[1]


def repeats_for(seconds_per_run: float, wanted: int) -> int:
    """Fewer rounds for slow configs: about 40 s per pair of models at most, at least 5 rounds."""
    return max(5, min(wanted, int(20.0 / max(seconds_per_run, 1e-6))))


def time_pair(models: Dict[str, nn.Module], x: torch.Tensor, threads: int, repeats: int) -> Dict[str, float]:
    torch.set_num_threads(threads)
    with torch.inference_mode():
        start = time.perf_counter()
        for m in models.values():
            m(x)  # warm-up; for 'auto' layers: the one-time backend micro-benchmark for this shape/threads
        per_run = (time.perf_counter() - start) / len(models)
    return measure_latency(models, x, repeats=repeats_for(per_run, repeats), warmup=2, threads=threads,
                           progress=False)


def layer_breakdown(dense: nn.Module, stripe: nn.Module, x: torch.Tensor, threads: int, repeats: int) -> List[dict]:
    """Each stripe layer alone on its captured input: dense conv, compiled kernel, auto; aggregated by shape."""
    torch.set_num_threads(threads)
    inputs = {}
    stripe_layers = {n: m for n, m in stripe.named_modules() if isinstance(m, StripeConv2d)}
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: inputs.__setitem__(n, i[0]))
               for n, m in stripe_layers.items()]
    with torch.inference_mode():
        stripe(x)
    for h in handles:
        h.remove()
    groups = defaultdict(lambda: defaultdict(float))
    for name, layer in stripe_layers.items():
        inp = inputs[name]
        conv = dense.get_submodule(name)
        forced = copy.deepcopy(layer)
        forced.backend = "cpp" if cpu_kernel.available() else "stripe"
        with torch.inference_mode():
            layer(inp)
        chosen = layer.active_backend
        t = measure_latency({"dense": conv, "kernel": forced, "auto": layer}, inp, repeats=repeats, warmup=2,
                            threads=threads, progress=False)
        key = (f"{layer.in_channels}->{layer.out_channels} k{layer.kernel_size[0]}x{layer.kernel_size[1]} "
               f"s{layer.stride[0]} {inp.shape[2]}x{inp.shape[3]}")
        g = groups[key]
        g["layers"] += 1
        g["keep"] += layer.num_stripes / (layer.out_channels * layer.kernel_size[0] * layer.kernel_size[1])
        for k, v in t.items():
            g[f"{k}_ms"] += v
        g[f"chose_{chosen}"] += 1
    rows = []
    for key, g in groups.items():
        n = g.pop("layers")
        chose = ", ".join(f"{int(v)} {k[6:]}" for k, v in g.items() if k.startswith("chose_"))
        rows.append({"shape": key, "layers": int(n), "keep": round(g["keep"] / n, 3),
                     "dense_ms": round(g["dense_ms"], 4), "kernel_ms": round(g["kernel_ms"], 4),
                     "auto_ms": round(g["auto_ms"], 4), "chose": chose})
    return rows


def onnx_latency(dense: nn.Module, stripe: nn.Module, x: torch.Tensor, threads: int, repeats: int) -> dict | None:
    """onnxruntime median latency (ms) of both nets exported with the legacy exporter, and the max rel err."""
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError:
        return None
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, model in (("dense", dense), ("stripe", stripe)):
            path = f"{tmp}/{name}.onnx"
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=18, input_names=["x"])
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            sessions[name] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {"x": x.numpy()}
        for s in sessions.values():
            s.run(None, feed)
        times = {n: [] for n in sessions}
        for r in range(repeats):
            for k, name in enumerate(list(sessions)[r % 2:] + list(sessions)[: r % 2]):
                del k
                start = time.perf_counter()
                sessions[name].run(None, feed)
                times[name].append(time.perf_counter() - start)
        y = sessions["stripe"].run(None, feed)[0]
        with torch.no_grad():
            ref = stripe(x).numpy()
        result = {f"{n}_ms": round(1000 * statistics.median(v), 4) for n, v in times.items()}
        result["max_rel_err"] = float(np.abs(y - ref).max() / np.abs(ref).max())
    return result


def run(args) -> dict:
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                           "cpp_kernel": cpu_kernel.available(), "cpp_error": cpu_kernel.build_error()},
               "nets": [], "anchors": [], "layers": {}, "onnx": []}
    for net in args.nets:
        dense, size = build(net)
        for keep in args.keep:
            stripe = random_stripe_model(copy.deepcopy(dense), keep).eval()
            for batch in args.batches:
                x = torch.randn(batch, 3, size, size)
                macs_dense, macs_stripe = conv_macs(stripe, x)
                for threads in args.threads:
                    t = time_pair({"dense": dense, "stripe": stripe}, x, threads, args.repeats)
                    layers = [m for m in stripe.modules() if isinstance(m, StripeConv2d)]
                    row = {"net": net, "keep": keep, "batch": batch, "threads": threads,
                           "dense_ms": round(t["dense"], 3), "stripe_ms": round(t["stripe"], 3),
                           "speedup": round(t["dense"] / t["stripe"], 3),
                           "conv_macs_ratio": round(macs_dense / macs_stripe, 3),
                           "layers_on_kernel": sum(m.active_backend != "dense" for m in layers),
                           "layers": len(layers)}
                    results["nets"].append(row)
                    print(f"{net:9s} keep {keep:.2f} batch {batch:3d} threads {threads}: "
                          f"dense {row['dense_ms']:9.2f} ms  stripe {row['stripe_ms']:9.2f} ms  "
                          f"x{row['speedup']:.2f}  (conv MACs /"
                          f"{row['conv_macs_ratio']:.2f}, {row['layers_on_kernel']}/{row['layers']} layers on the "
                          f"stripe kernel)", flush=True)
                    if keep == args.detail_keep and threads == max(args.threads):
                        if net in ("vgg16", "resnet56"):
                            results["anchors"].append(anchor_row(net, batch, dense, stripe, x, threads, args.repeats))
                        if args.layers:
                            results["layers"][f"{net} batch {batch}"] = layer_breakdown(
                                dense, stripe, x, threads, max(5, args.repeats // 2))
                        if args.onnx and net in ("vgg16", "resnet56"):
                            o = onnx_latency(dense, stripe, x, threads, max(5, args.repeats // 2))
                            if o:
                                results["onnx"].append({"net": net, "keep": keep, "batch": batch, "threads": threads,
                                                        **o})
                                print(f"  onnxruntime: {o}", flush=True)
    return results


def anchor_row(net, batch, dense, stripe, x, threads, repeats) -> dict:
    """Issue 4's anchor table for our backends: pure-PyTorch loop, compiled kernel everywhere, auto."""
    variants = {"dense": dense, "auto": stripe}
    for backend in ("stripe", "cpp"):
        if backend == "cpp" and not cpu_kernel.available():
            continue
        m = copy.deepcopy(stripe)
        for layer in m.modules():
            if isinstance(layer, StripeConv2d):
                layer.backend = backend
        variants[backend] = m
    t = time_pair(variants, x, threads, repeats)
    row = {"net": net, "batch": batch, "threads": threads, **{f"{k}_ms": round(v, 3) for k, v in t.items()}}
    for k in t:
        if k != "dense":
            row[f"{k}_speedup"] = round(t["dense"] / t[k], 3)
    print(f"  anchor {net} batch {batch}: " + ", ".join(f"{k} x{row[k + '_speedup']:.2f}" for k in t if k != "dense"),
          flush=True)
    return row


def markdown(results: dict, args) -> str:
    m = results["machine"]
    kernel = "yes" if m["cpp_kernel"] else f"no ({m['cpp_error']})"
    lines = ["# Performance: stripe-pruned nets against dense (CPU)", "",
             "Generated by `benchmarks/latency.py` (" + " ".join(args.argv) + f"). Machine: {m['cpu']}, "
             f"torch {m['torch']}, compiled stripe kernel: {kernel}.",
             "Random skeletons (`swp_plugin.testing.random_stripe_model`: every groups=1 conv keeps the given fraction "
             "of its stripes at random, each filter at least one), random weights, `backend='auto'`; dense and "
             "stripe nets timed interleaved, median of rounds, `torch.inference_mode()`. Speedup = dense / stripe; "
             "'conv MACs /' = the convs' dense MACs over the kept stripes' MACs (the ideal for the convs alone; "
             "BatchNorm, ReLU, pooling and the classifier cost the same in both nets).", ""]
    if results["anchors"]:
        lines += ["## Issue 4's anchor table, for our backends", "",
                  f"Keep {args.detail_keep:.0%} of the stripes, {max(args.threads)} threads. Columns: speedup over "
                  "dense of the pure-PyTorch `'stripe'` backend (a loop over kernel positions, the reference code's "
                  "form), of the compiled kernel on every layer (`'cpp'`), and of `'auto'` (per layer the faster "
                  "of the kernel and dense).", "",
                  "| net, batch | dense (ms) | pure-PyTorch stripe | compiled kernel everywhere | auto "
                  "| ideal (FLOPs) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        ideal = {(r["net"], r["batch"]): r["conv_macs_ratio"] for r in results["nets"]
                 if r["keep"] == args.detail_keep}
        for r in results["anchors"]:
            lines.append(f"| {r['net']}, {r['batch']} | {r['dense_ms']:.2f} | x{r.get('stripe_speedup', 0):.2f} | "
                         f"x{r.get('cpp_speedup', float('nan')):.2f} | x{r['auto_speedup']:.2f} | "
                         f"x{ideal.get((r['net'], r['batch']), float('nan')):.2f} |")
        lines.append("")
    lines += ["## All nets", "", "| net | keep | batch | threads | dense (ms) | stripe (ms) | speedup | conv MACs / | "
              "layers on the kernel |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["nets"]:
        lines.append(f"| {r['net']} | {r['keep']:.0%} | {r['batch']} | {r['threads']} | {r['dense_ms']:.2f} | "
                     f"{r['stripe_ms']:.2f} | x{r['speedup']:.2f} | x{r['conv_macs_ratio']:.2f} | "
                     f"{r['layers_on_kernel']}/{r['layers']} |")
    lines.append("")
    if results["onnx"]:
        lines += ["## onnxruntime (exported with `torch.onnx.export`, legacy exporter, opset 18)", "",
                  "The pruned net exports through the pure-PyTorch `'stripe'` form (per kernel position a Slice and "
                  "a 1x1 Conv, a Concat, a 1x1 Conv with the 0/1 stripe-to-channel selection; the compiled kernel is "
                  "not exportable), or as a dense conv where `auto` picked dense.", "",
                  "| net | keep | batch | threads | ORT dense (ms) | ORT stripe (ms) | speedup "
                  "| max rel err vs PyTorch |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in results["onnx"]:
            lines.append(f"| {r['net']} | {r['keep']:.0%} | {r['batch']} | {r['threads']} | {r['dense_ms']:.2f} | "
                         f"{r['stripe_ms']:.2f} | x{r['dense_ms'] / r['stripe_ms']:.2f} | {r['max_rel_err']:.1e} |")
        lines.append("")
    if results["layers"]:
        lines += ["## Per-layer breakdown", "",
                  f"Keep {args.detail_keep:.0%}, {max(args.threads)} threads; each layer alone on its captured "
                  "input; layers of the same shape summed (ms). 'kernel' = the compiled kernel forced, 'auto' = "
                  "what the net runs.", ""]
        for title, rows in results["layers"].items():
            lines += [f"### {title}", "", "| layers (in->out, kernel, stride, input) | n | kept | dense | kernel | "
                      "auto | auto speedup | chose |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            for r in rows:
                lines.append(f"| {r['shape']} | {r['layers']} | {r['keep']:.0%} | {r['dense_ms']:.3f} | "
                             f"{r['kernel_ms']:.3f} | {r['auto_ms']:.3f} | x{r['dense_ms'] / r['auto_ms']:.2f} | "
                             f"{r['chose']} |")
            lines.append("")
    lines += ["## What limits it", "", limits_text(), ""]
    return "\n".join(lines)


def limits_text() -> str:
    """The hand-written analysis appended to docs/performance.md (benchmarks/latency_limits.md)."""
    path = Path(__file__).with_name("latency_limits.md")
    return path.read_text().strip() if path.exists() else ""


def main(argv: List[str] | None = None) -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default=",".join(NETS))
    parser.add_argument("--keep", default="0.1,0.2,0.4")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--detail-keep", type=float, default=0.2, help="keep fraction of the anchor/layer/ONNX tables")
    parser.add_argument("--no-layers", dest="layers", action="store_false")
    parser.add_argument("--no-onnx", dest="onnx", action="store_false")
    parser.add_argument("--quick", action="store_true", help="vgg16,resnet56; keep 0.2; 2 threads; 10 repeats")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "latency.json"))
    parser.add_argument("--md", default=str(ROOT / "docs" / "performance.md"))
    parser.add_argument("--no-docs", action="store_true", help="print only, write nothing")
    parser.add_argument("--from-json", help="re-render --md from a results JSON written by an earlier run")
    args = parser.parse_args(argv)
    args.argv = ["python", "benchmarks/latency.py"] + (sys.argv[1:] if argv is None else list(argv))
    if args.quick:
        args.nets, args.keep, args.threads, args.repeats = "vgg16,resnet56", "0.2", "2", 10
    args.nets = [n for n in args.nets.split(",") if n]
    args.keep = [float(k) for k in args.keep.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.threads = [int(t) for t in args.threads.split(",")]
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        for key, value in saved.pop("args").items():
            setattr(args, key, value)
        Path(args.md).write_text(markdown(saved, args) + "\n")
        print(f"wrote {args.md}")
        return
    results = run(args)
    results["args"] = {"argv": args.argv, "detail_keep": args.detail_keep, "threads": args.threads}
    if args.no_docs:
        return
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    Path(args.md).write_text(markdown(results, args) + "\n")
    print(f"wrote {args.json} and {args.md}")


if __name__ == "__main__":
    main()

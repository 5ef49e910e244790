"""GPU latency of stripe-pruned networks: cuDNN's dense model, the same compiled, and the deployed stripe model.

For each net (the paper's CIFAR VGG16-BN / ResNet56 at 32x32, timm resnet18 / resnet50 at 224x224; random init,
BatchNorm statistics calibrated), dtype (bfloat16 and float16) and batch (1 and 64), side by side
(``swp_plugin.utils.timing.side_by_side``, every call synchronized, order rotated, median):

* ``dense``: the dense model on cuDNN, channels_last, ``torch.backends.cudnn.benchmark = True`` - the anchor;
* ``compiled``: the same model through ``torch.compile`` (inductor, default mode);
* ``deployed_<keep>``: the stripe-pruned model (every ``groups=1`` conv keeps a random fraction of its stripes,
  ``swp_plugin.testing.random_stripe_model``; 20% and 50%) after ``swp_plugin.deploy`` on the GPU: BatchNorm folded,
  per layer the Triton stripe kernel (``TritonStripeConv2d``) or cuDNN, whichever the layer's own timing prefers,
  ReLU / residual add fused into the kernel's epilogue; channels_last input.

Each row also records how many convs run the kernel, the tile plans' efficiency (kept stripes / multiplied stripe
slots) and the deployed model's error against the dense model of the same dtype. Rows are written to the JSON as
they are measured (most important first: VGG16 and resnet18, bfloat16), so a run stopped by ``--budget-s`` or a
time limit still leaves what it measured.

Usage (from the repository root)::

    python benchmarks/gpu_latency.py                 # everything above on the GPU (never run yet; --budget-s 480
                                                     # stops starting new configurations after 8 min)
    python benchmarks/gpu_latency.py --nets vgg16,resnet18 --dtypes bfloat16 --budget-s 240
    python benchmarks/gpu_latency.py --dry-run       # CPU check of the script: narrow nets, the kernel under
                                                     # Triton's interpreter, aot_eager instead of inductor
    python benchmarks/latency.py --device cuda ...   # the same, through the CPU benchmark's entry point

Writes ``benchmarks/results/gpu_latency.json`` (``--json``) and the GPU section of ``docs/performance.md``
(``--md``, between ``<!-- gpu:begin/end -->``; ``--doc-only`` renders it from the JSON). The dry run writes
nothing unless given ``--json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn as nn
from doc_section import write_section

import swp_plugin
from swp_plugin.layers.deployed import DeployedStripeConv2d
from swp_plugin.layers.deployed_triton import TritonStripeConv2d
from swp_plugin.layers.kernels import triton_stripe
from swp_plugin.testing import calibrate_bn, random_stripe_model
from swp_plugin.utils import synchronized
from swp_plugin.utils.timing import side_by_side

ROOT = Path(__file__).resolve().parent.parent
NETS = ("vgg16", "resnet18", "resnet56", "resnet50")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: consecutive calls per model and round (the median of a block is past any warm-up of the switch)
BLOCK = 5


def build(name: str, dry_run: bool) -> tuple[nn.Module, int]:
    """Dense net (random init, BatchNorm calibrated on CPU in float32, eval) and its input size. The dry run uses
    narrow CIFAR nets (the interpreter is numpy) and no timm nets."""
    torch.manual_seed(0)
    if name in ("vgg16", "resnet56"):
        from swp_plugin.models import resnet56, vgg16_bn

        width = (1 / 16 if name == "vgg16" else 0.25) if dry_run else 1.0
        model, size = (vgg16_bn(width=width) if name == "vgg16" else resnet56(width=width)), 32
        size = 16 if dry_run and name == "resnet56" else size
    else:
        import timm

        model, size = timm.create_model(name, pretrained=False, num_classes=1000), 224
    calibrate_bn(model, torch.randn(4, 3, size, size))
    return model.eval(), size


def _on_triton(deployed: nn.Module) -> int:
    """Dry run on CPU: ``deploy`` chose the CPU kernel; run those layers on the Triton layer (interpreted) instead,
    with the same epilogue. Returns how many layers were swapped."""
    swapped = 0
    for name, m in list(deployed.named_modules()):
        if type(m) is DeployedStripeConv2d:
            parent, _, child = name.rpartition(".")
            new = TritonStripeConv2d.from_stripe(m.to_stripe(), act=m.act, residual=m.residual)
            setattr(deployed.get_submodule(parent) if parent else deployed, child, new)
            swapped += 1
    return swapped


def _kernel_summary(model: nn.Module) -> dict:
    layers = [m for m in model.modules() if isinstance(m, TritonStripeConv2d)]
    choices = getattr(model, "deploy_report", None)
    total = len(choices.choices) if choices is not None else len(layers)
    eff = [m.efficiency for m in layers]
    return {"kernel_layers": len(layers), "convs": total,
            "mean_tile_efficiency": round(sum(eff) / len(eff), 3) if eff else None}


def _rel_err(want: torch.Tensor, got: torch.Tensor) -> float:
    want, got = want.double(), got.double()
    return float((want - got).abs().max() / (want.abs().max() or 1.0))


def configuration(net: str, dense_fp32: nn.Module, size: int, dtype: torch.dtype, batch: int, keeps: List[float],
                  args, device: torch.device) -> dict:
    """One (net, dtype, batch): every model timed side by side; ms, speedups, kernel counts, errors."""
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    dense = copy.deepcopy(dense_fp32).to(device=device, dtype=dtype).to(memory_format=torch.channels_last).eval()
    row: dict = {"net": net, "dtype": str(dtype).removeprefix("torch."), "batch": batch, "size": size}
    models: Dict[str, nn.Module] = {"dense": dense}
    with torch.no_grad():
        want = dense(x)
        if args.compile:
            start = time.perf_counter()
            models["compiled"] = torch.compile(dense, backend=args.compile_backend)
            models["compiled"](x)
            row["compile_s"] = round(time.perf_counter() - start, 1)
        for keep in keeps:
            stripe = random_stripe_model(copy.deepcopy(dense_fp32), keep).to(device=device, dtype=dtype).eval()
            start = time.perf_counter()
            deployed = swp_plugin.deploy(stripe, x, verify=False)  # checked below against the dense model
            if args.dry_run:
                row[f"swapped_{keep}"] = _on_triton(deployed)
            deployed = deployed.to(memory_format=torch.channels_last)
            row[f"deploy_s_{keep}"] = round(time.perf_counter() - start, 1)
            # the pruned model's own output (same weights, masked) is the reference of the deployed one
            row[f"deployed_err_{keep}"] = _rel_err(stripe(x), deployed(x))
            row[f"kernels_{keep}"] = _kernel_summary(deployed)
            models[f"deployed_{keep}"] = deployed
        runs = {name: (lambda m=m: m(x)) for name, m in models.items()}
        times = side_by_side(synchronized(runs, device), rounds=args.rounds, warmup=args.warmup, stat="median",
                             block=args.block)
    row.update({f"{k}_ms": round(1e3 * v, 4) for k, v in times.items()})
    for keep in keeps:
        row[f"speedup_{keep}_vs_dense"] = round(times["dense"] / times[f"deployed_{keep}"], 3)
        if "compiled" in times:
            row[f"speedup_{keep}_vs_compiled"] = round(times["compiled"] / times[f"deployed_{keep}"], 3)
    row["dense_out_max"] = float(want.float().abs().max())
    return row


def machine(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cudnn=torch.backends.cudnn.version(),
                    cuda=torch.version.cuda)
    else:
        info.update(gpu=None, note="dry run on CPU: the Triton kernel under its interpreter; times mean nothing")
    return info


GPU_HEADING = "## GPU (Triton stripe kernel against cuDNN)"
RESULTS = ROOT / "benchmarks" / "results" / "gpu_latency.json"


def doc_section(results: dict | None = None) -> str:
    """The GPU section of docs/performance.md, from a GPU run's results (default: the saved JSON, if any)."""
    if results is None and RESULTS.exists():
        results = json.loads(RESULTS.read_text())
    how = ("Run it where a GPU is at hand: `python benchmarks/gpu_latency.py` (or `python benchmarks/latency.py "
           "--device cuda`), then `python benchmarks/gpu_latency.py --doc-only` renders "
           "this section from `benchmarks/results/gpu_latency.json`.")
    if not results or not results.get("rows") or results["machine"].get("gpu") is None:
        return "\n".join([GPU_HEADING, "", "Not measured on a GPU yet (the kernel is checked for correctness under "
                          "Triton's interpreter only, `tests/test_triton_stripe.py`). " + how])
    m, rows = results["machine"], results["rows"]
    keeps = sorted({float(k.split("_")[1]) for r in rows for k in r if k.startswith("deployed_") and
                    k.endswith("_ms")})
    head = "| net | dtype | batch | cuDNN dense ms | compiled ms | " + " | ".join(
        f"deployed {k:.0%} ms (x vs dense, kernel convs)" for k in keeps) + " |"
    lines = [GPU_HEADING, "", f"Generated by `python benchmarks/gpu_latency.py` on {m['gpu']} (torch {m['torch']}, "
             f"Triton {m['triton']}, cuDNN {m['cudnn']}). Dense: cuDNN, channels_last, `cudnn.benchmark`; compiled: "
             "`torch.compile` of it; deployed: random stripe masks, `swp_plugin.deploy` on the GPU (per layer the "
             "Triton kernel or cuDNN, whichever its timing prefers). " + how, "", head,
             "|" + " --- |" * (5 + len(keeps))]
    for r in rows:
        compiled = f"{r['compiled_ms']:.3f}" if "compiled_ms" in r else "-"
        cells = [r["net"], r["dtype"], str(r["batch"]), f"{r['dense_ms']:.3f}", compiled]
        for k in keeps:
            kern = r[f"kernels_{k}"]
            cells.append(f"{r[f'deployed_{k}_ms']:.3f} (x{r[f'speedup_{k}_vs_dense']:.2f}, "
                         f"{kern['kernel_layers']}/{kern['convs']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def wants_cuda(argv: List[str] | None = None) -> bool:
    """True if ``argv`` (default ``sys.argv[1:]``) asks for ``--device cuda``: ``benchmarks/latency.py`` hands
    such a run to :func:`main`."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--device", default="cpu")
    return parser.parse_known_args(sys.argv[1:] if argv is None else argv)[0].device.startswith("cuda")


def main(argv: List[str] | None = None) -> dict:
    """Parse ``argv`` (default ``sys.argv[1:]``), measure, write the JSON; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default=",".join(NETS))
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--keep", default="0.2,0.5")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds of BLOCK calls per model")
    parser.add_argument("--block", type=int, default=BLOCK, help="consecutive calls per model and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per model first")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="no torch.compile column")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--budget-s", type=float, default=480.0, help="no new configuration after this many s")
    parser.add_argument("--json", default=None, help="default benchmarks/results/gpu_latency.json (GPU runs)")
    parser.add_argument("--dry-run", action="store_true", help="CPU check: narrow CIFAR nets, batch 1/2, float32, "
                        "2 rounds, the kernel under Triton's interpreter, aot_eager compile")
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)  # accepted from latency.py --device cuda
    parser.add_argument("--md", default=str(ROOT / "docs" / "performance.md"), help="doc whose GPU section is set")
    parser.add_argument("--doc-only", action="store_true", help="only render the GPU section of --md from the JSON")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.doc_only:
        write_section(args.md, "gpu", doc_section(json.loads(Path(args.json).read_text()) if args.json else None))
        return {}
    if args.dry_run:
        device = torch.device("cpu")
        triton_stripe.set_interpret(True)
        args.nets = ",".join(n for n in args.nets.split(",") if n in ("vgg16", "resnet56"))
        args.dtypes, args.batches, args.compile_backend = "float32", "1,2", "aot_eager"
        args.rounds, args.block, args.warmup = 2, 1, 1
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run it where a GPU is lent, or check the script with --dry-run")
        reason = triton_stripe.unavailable_reason("cuda")
        if reason:
            parser.error(f"the Triton kernel cannot run: {reason}")
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
        args.json = args.json or str(ROOT / "benchmarks" / "results" / "gpu_latency.json")
    keeps = [float(k) for k in args.keep.split(",")]
    results = {"machine": machine(device), "args": {k: v for k, v in vars(args).items() if k != "json"}, "rows": []}
    start = time.perf_counter()
    for net in args.nets.split(","):
        dense, size = build(net, args.dry_run)
        for dtype in args.dtypes.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                if time.perf_counter() - start > args.budget_s:
                    results.setdefault("skipped", []).append(f"{net} {dtype} batch {batch}: --budget-s reached")
                    continue
                row = configuration(net, dense, size, DTYPES[dtype], batch, keeps, args, device)
                results["rows"].append(row)
                speed = ", ".join(f"{k}={v}" for k, v in row.items() if k.startswith("speedup"))
                print(f"{net} {dtype} batch {batch}: dense {row['dense_ms']} ms; {speed}", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    results["wall_s"] = round(time.perf_counter() - start, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        if not args.dry_run:
            write_section(args.md, "gpu", doc_section(results))
    return results


if __name__ == "__main__":
    main()

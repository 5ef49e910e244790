"""Per-layer speed of the stripe kernel against ONNX Runtime's dense convolution, side by side.

For every distinct conv of timm resnet18 / resnet50 at 224x224 (random init; its input shape taken from a forward
pass), each keep fraction and batch: the dense conv as a one-node ONNX model in onnxruntime, and the deployed
stripe layer (``DeployedStripeConv2d``, random skeleton: every filter keeps a random fraction of its stripes, at
least one, so 1x1 convs stay dense). Both are timed interleaved in blocks with pauses between runtimes
(``swp_plugin.utils.timing.side_by_side``). Columns: MACs (dense, kept), times, GMAC/s (ORT of the dense MACs,
the kernel of the kept MACs) and the share of the ideal, ``ORT time x kept/dense MACs / kernel time``.

    python benchmarks/kernel_layers.py                       # resnet18,resnet50; 20%,50%; batch 1,8; 2 threads
    python benchmarks/kernel_layers.py --nets resnet18 --keep 0.2 --batches 1 --budget 0.5

Writes ``benchmarks/results/kernel_layers.json`` (``--json`` to change) and prints markdown tables (cells: share
of the ideal, then kernel GMAC/s of kept MACs vs ORT GMAC/s of dense MACs); ``--from-json`` re-prints them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn as nn

from swp_plugin.deployment.onnx import ort_runner, ort_session
from swp_plugin.layers.deployed import DeployedStripeConv2d
from swp_plugin.layers.kernels import cpu as cpu_kernel
from swp_plugin.layers.stripe_conv import StripeConv2d
from swp_plugin.utils.timing import side_by_side

ROOT = Path(__file__).resolve().parent.parent


def distinct_convs(name: str, size: int = 224) -> List[Dict]:
    """The distinct convs of timm ``name`` (geometry and input shape), with the layers that share each."""
    import timm

    model = timm.create_model(name, pretrained=False).eval()
    seen: Dict[tuple, Dict] = {}
    hooks = []
    for layer_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            def hook(mod, args, out, layer_name=layer_name):
                key = (mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                       tuple(args[0].shape[1:]))
                seen.setdefault(key, {"layers": [], "conv": mod, "input": tuple(args[0].shape[1:])})
                seen[key]["layers"].append(layer_name)
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return list(seen.values())


def one_node_onnx(conv: nn.Conv2d, weight: torch.Tensor, path: Path) -> None:
    """``conv`` (with ``weight``, a zero bias) as a one-node ONNX model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    bias = torch.zeros(conv.out_channels)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=list(conv.kernel_size),
                            strides=list(conv.stride), dilations=list(conv.dilation),
                            pads=[conv.padding[0], conv.padding[1], conv.padding[0], conv.padding[1]])
    inits = [numpy_helper.from_array(weight.numpy(), "w"), numpy_helper.from_array(bias.numpy(), "b")]
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def cpu_times(runs: Dict[str, Callable[[], object]], budget: float, stat: str) -> Dict[str, float]:
    """CPU time of the process per call (``time.process_time``), alternating blocks of 5 calls: on a loaded
    machine the time a call waits for a core does not count. Only meaningful with one thread (spinning pool
    threads count as CPU time)."""
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for f in runs.values():
        f()
        f()
    start = time.perf_counter()
    while time.perf_counter() - start < 2 * budget or min(len(v) for v in times.values()) < 10:
        for name, f in runs.items():
            for _ in range(5):
                t0 = time.process_time()
                f()
                times[name].append(time.process_time() - t0)
    reduce = min if stat == "min" else statistics.median
    return {name: reduce(v) for name, v in times.items()}


def measure(entry: Dict, keep: float, batch: int, threads: int, budget: float, folder: Path, seed: int,
            stat: str = "median", clock: str = "wall") -> Dict:
    conv, (c, h, w) = entry["conv"], entry["input"]
    gen = torch.Generator().manual_seed(seed)
    out, _, kh, kw = conv.weight.shape
    mask = torch.rand(out, kh, kw, generator=gen) < keep
    empty = ~mask.view(out, -1).any(1)
    mask.view(out, -1)[empty, torch.randint(kh * kw, (int(empty.sum()),), generator=gen)] = True
    dense = nn.Conv2d(c, out, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=True)
    with torch.no_grad():
        dense.weight.mul_(mask[:, None])
        dense.bias.zero_()
    layer = DeployedStripeConv2d.from_stripe(StripeConv2d.from_dense(dense, mask)).eval()
    x = torch.randn(batch, c, h, w, generator=gen)
    path = folder / f"conv_{seed}.onnx"
    one_node_onnx(conv, dense.weight.detach(), path)
    session = ort_session(path, threads)
    with torch.no_grad():
        y = layer(x)
        err = float((y - torch.from_numpy(session.run(None, {"x": x.numpy()})[0])).abs().max())
        runs = {"ort": ort_runner(session, [x]), "kernel": lambda: layer(x)}
        if clock == "cpu":
            times = cpu_times(runs, budget, stat)
        else:
            times = side_by_side(runs, rounds=50, warmup=2, budget_s=budget, block=5, settle_s=0.05, stat=stat)
    out_h, out_w = y.shape[2:]
    dense_macs = batch * out * c * kh * kw * out_h * out_w
    kept_macs = batch * int(mask.sum()) * c * out_h * out_w
    ideal = times["ort"] * kept_macs / dense_macs
    return {"layers": entry["layers"], "shape": f"{c}->{out} {kh}x{kw}/{conv.stride[0]} @{h}x{w}", "keep": keep,
            "batch": batch, "dense_macs": dense_macs, "kept_macs": kept_macs, "ort_ms": times["ort"] * 1e3,
            "kernel_ms": times["kernel"] * 1e3, "ort_gmacs": dense_macs / times["ort"] / 1e9,
            "kernel_gmacs": kept_macs / times["kernel"] / 1e9, "of_ideal": ideal / times["kernel"], "max_err": err}


def markdown(rows: List[Dict]) -> str:
    """Per net: every distinct conv's share of the ideal in each configuration, and the sums over all layers."""
    configs = sorted({(r["keep"], r["batch"]) for r in rows}, key=lambda c: (c[1], c[0]))
    names = " | ".join(f"{k:.0%} kept, batch {b}" for k, b in configs)
    out = []
    for net in dict.fromkeys(r["net"] for r in rows):
        mine = [r for r in rows if r["net"] == net]
        out += [f"### {net}, share of the ideal (ORT dense time x kept/dense MACs / kernel time)", "",
                f"| layer (x layers like it) | conv | {names} |", "| --- | --- |" + " --- |" * len(configs)]
        for shape in dict.fromkeys(r["shape"] for r in mine):
            cells = []
            for keep, batch in configs:
                r = next((r for r in mine if r["shape"] == shape and (r["keep"], r["batch"]) == (keep, batch)), None)
                cells.append("" if r is None else
                             f"{r['of_ideal']:.0%} ({r['kernel_gmacs']:.0f} vs {r['ort_gmacs']:.0f})")
            first = next(r for r in mine if r["shape"] == shape)
            out.append(f"| {first['layers'][0]} (x{len(first['layers'])}) | {shape} | " + " | ".join(cells) + " |")
        sums = []
        for keep, batch in configs:
            sel = [r for r in mine if (r["keep"], r["batch"]) == (keep, batch)]
            ideal = sum(len(r["layers"]) * r["ort_ms"] * r["kept_macs"] / r["dense_macs"] for r in sel)
            kernel = sum(len(r["layers"]) * r["kernel_ms"] for r in sel)
            sums.append(f"**{ideal / kernel:.0%}**" if kernel else "")
        out += ["| all convs (sum over layers) | | " + " | ".join(sums) + " |", ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default="resnet18,resnet50")
    parser.add_argument("--keep", default="0.2,0.5")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=1.0, help="timed seconds per layer and configuration")
    parser.add_argument("--stat", default="median", choices=("median", "min"),
                        help="of the timed calls (min: the least disturbed call, on a loaded machine)")
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                        help="cpu: the process's CPU time per call (a loaded machine; --threads 1 only)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "kernel_layers.json"))
    parser.add_argument("--from-json", help="only print the markdown tables of a saved run")
    args = parser.parse_args()
    if args.from_json:
        print(markdown(json.loads(Path(args.from_json).read_text())["rows"]))
        return
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu needs --threads 1")
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for net in args.nets.split(","):
            convs = distinct_convs(net)
            for batch in [int(b) for b in args.batches.split(",")]:
                for keep in [float(k) for k in args.keep.split(",")]:
                    print(f"\n{net}, {keep:.0%} kept, batch {batch}, {args.threads} threads")
                    print(f"{'layer (x count)':34} {'shape':28} {'ORT ms':>8} {'kern ms':>8} {'ORT GMAC/s':>10} "
                          f"{'kern GMAC/s':>11} {'of ideal':>8}")
                    tot = {"ort": 0.0, "kernel": 0.0, "ideal": 0.0}
                    for i, entry in enumerate(convs):
                        row = measure(entry, keep, batch, args.threads, args.budget, Path(tmp), seed=i, stat=args.stat,
                                      clock=args.clock)
                        row["net"] = net
                        rows.append(row)
                        count = len(row["layers"])
                        tot["ort"] += count * row["ort_ms"]
                        tot["kernel"] += count * row["kernel_ms"]
                        tot["ideal"] += count * row["ort_ms"] * row["kept_macs"] / row["dense_macs"]
                        label = f"{row['layers'][0]} (x{count})"
                        print(f"{label:34} {row['shape']:28} {row['ort_ms']:8.3f} {row['kernel_ms']:8.3f} "
                              f"{row['ort_gmacs']:10.1f} {row['kernel_gmacs']:11.1f} {row['of_ideal']:8.0%}",
                              flush=True)
                    print(f"{'all convs (sum over layers)':63} {tot['ort']:8.3f} {tot['kernel']:8.3f} "
                          f"{'':22} {tot['ideal'] / tot['kernel']:8.0%}")
    meta = {"machine": platform.machine(), "torch": torch.__version__, "threads": args.threads, "stat": args.stat,
            "clock": args.clock, "cpp_kernel": cpu_kernel.available()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("\n" + markdown(rows))


if __name__ == "__main__":
    main()

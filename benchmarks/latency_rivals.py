"""What ``benchmarks/latency.py`` compares the deployed stripe model with, besides ONNX Runtime's dense model.

* :func:`channel_pruned`: the rival a user weighs SWP against, torch-pruning's magnitude pruner
  (``tp.pruner.MagnitudePruner``, L1 importance, one uniform ratio for every layer, the classifier kept) with the
  ratio found by bisection so that the channel-pruned model's MACs match the stripe model's (within ``rtol``);
* :func:`layer_rates`: per conv of the deployed model, its time on its own input (the implementation deploy chose,
  epilogue included) against ONNX Runtime running the same conv dense (a one-conv ONNX model), as GMAC/s: where
  the kernel stands against the machine.
"""

from __future__ import annotations

import copy
import tempfile
from functools import partial
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch_pruning as tp

from swp_plugin.deployment.onnx import ort_runner, ort_session
from swp_plugin.layers.deployed import DeployedStripeConv2d
from swp_plugin.measure.counting import count_ops_and_params, stripe_macs
from swp_plugin.utils.timing import side_by_side


def macs(model: nn.Module, x: torch.Tensor) -> float:
    """MACs of one forward of ``x`` (stripe layers: kept stripes), the project's count."""
    return float(count_ops_and_params(model, x)[0])


def _classifier(model: nn.Module) -> List[nn.Module]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Module) and not isinstance(head, nn.Identity):
        return [head]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def prune_channels(dense: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module:
    """A copy of ``dense`` with ``ratio`` of every prunable layer's channels removed (L1 magnitude, uniform)."""
    model = copy.deepcopy(dense).eval()
    if ratio <= 0:
        return model
    pruner = tp.pruner.MagnitudePruner(model, x[:1], importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=_classifier(model))
    pruner.step()
    return model.eval()


def channel_pruned(dense: nn.Module, x: torch.Tensor, target_macs: float, rtol: float = 0.01,
                   steps: int = 8) -> Tuple[nn.Module, float, float]:
    """The channel-pruned model whose MACs match ``target_macs``: ``(model, ratio, its MACs)``. MACs fall
    monotonically with the uniform ratio, about as ``(1 - ratio)^2``: each step takes the ratio that model
    predicts from the last result (bisection within the bracket where the prediction leaves it), stopped within
    ``rtol`` of the target or after ``steps`` prunings (each builds torch-pruning's DependencyGraph: seconds)."""
    full = macs(dense, x[:1])
    if target_macs >= full:
        return copy.deepcopy(dense).eval(), 0.0, full
    lo, hi = 0.0, 0.99  # MACs(lo) > target > MACs(hi)
    ratio = 1 - (target_macs / full) ** 0.5
    best = (copy.deepcopy(dense).eval(), 0.0, full)
    for _ in range(steps):
        model = prune_channels(dense, x, ratio)
        got = macs(model, x[:1])
        if abs(got - target_macs) < abs(best[2] - target_macs):
            best = (model, ratio, got)
        if abs(got - target_macs) <= rtol * target_macs:
            break
        lo, hi = (ratio, hi) if got > target_macs else (lo, ratio)
        guess = 1 - (1 - ratio) * (target_macs / got) ** 0.5
        ratio = guess if lo < guess < hi else (lo + hi) / 2
    return best


def _as_dense_conv(layer: nn.Module) -> nn.Conv2d:
    """The unpruned conv of the same geometry as a deployed layer (the weights do not matter for timing)."""
    if isinstance(layer, DeployedStripeConv2d):
        return layer.to_stripe().to_dense()
    return layer


def _conv_macs(conv: nn.Conv2d, out: torch.Tensor) -> float:
    kh, kw = conv.kernel_size
    return float(out.numel() * conv.in_channels // conv.groups * kh * kw)


@torch.no_grad()
def layer_rates(deployed: nn.Module, x: torch.Tensor, names: List[str], threads: int, budget_s: float = 0.6,
                block: int = 5, settle_s: float = 0.02) -> List[Dict]:
    """Per named conv of ``deployed`` on its own input (captured on ``x``): ms and GMAC/s of the deployed layer
    (kept MACs) and of ONNX Runtime's dense conv of the same geometry (dense MACs), timed side by side."""
    modules = dict(deployed.named_modules())
    captured: Dict[str, tuple] = {}

    def keep(name):
        def hook(module, args, output):
            captured.setdefault(name, (args, output))
        return hook

    handles = [modules[n].register_forward_hook(keep(n)) for n in names if n in modules]
    try:
        deployed(x)  # the hooks make this the eager forward
    finally:
        for h in handles:
            h.remove()
    rows = []
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in names:
                if name not in captured:
                    continue
                args, out = captured[name]
                layer = modules[name]
                conv = _as_dense_conv(layer).eval()
                path = Path(tmp) / "conv.onnx"
                torch.onnx.export(conv, (args[0],), str(path), dynamo=False, opset_version=18, input_names=["x"])
                ort = ort_runner(ort_session(path, threads), [args[0]])
                times = side_by_side({"deployed": partial(layer, *args), "ort_dense": ort}, rounds=50, warmup=2,
                                     budget_s=budget_s, block=block, settle_s=settle_s)
                dense_macs = _conv_macs(conv, out)
                kept = (float(stripe_macs(layer, out)) if isinstance(layer, DeployedStripeConv2d) else dense_macs)
                dep_ms, ort_ms = 1e3 * times["deployed"], 1e3 * times["ort_dense"]
                rows.append({"layer": name, "impl": "kernel" if isinstance(layer, DeployedStripeConv2d) else "dense",
                             "kernel": list(conv.kernel_size), "stride": list(conv.stride),
                             "c_in": conv.in_channels, "c_out": conv.out_channels,
                             "out_hw": list(out.shape[2:]), "dense_mmacs": round(dense_macs / 1e6, 3),
                             "kept_mmacs": round(kept / 1e6, 3), "deployed_ms": round(dep_ms, 4),
                             "ort_dense_ms": round(ort_ms, 4),
                             "deployed_gmacs": round(kept / dep_ms / 1e6, 1),
                             "ort_gmacs": round(dense_macs / ort_ms / 1e6, 1),
                             "share_of_ideal": round(ort_ms * kept / dense_macs / dep_ms, 3)})
    finally:
        torch.set_num_threads(previous)
    return rows

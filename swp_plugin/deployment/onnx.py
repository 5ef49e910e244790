"""ONNX export of a deployed model that onnxruntime runs at least as fast as the dense model.

ONNX Runtime has no stripe operator. A stripe layer can be written two ways with standard ops: ``'dense'``, one
``Conv`` whose kernel holds the pruned stripes as zeros (onnxruntime then runs its dense convolution at full
cost: no gain, no loss), or ``'stripe'``, per kernel position a ``Slice`` + 1x1 ``Conv`` of the kept stripes,
a ``Concat`` and a 1x1 ``Conv`` that routes partial sums to their channels (fewer MACs, more ops and memory
traffic). :func:`export_onnx` measures, in onnxruntime with the target thread count, each stripe layer of the
model alone on its own input in both forms and keeps the faster (``'stripe'`` must win by :data:`MARGIN`); then it
times the whole model exported that way against the all-``'dense'`` export, side by side, and writes the faster.
So the exported stripe model is never slower than the exported dense model (to the precision of the timing).
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
import torch.nn as nn

from ..layers.deployed import DeployedStripeConv2d
from ..utils.timing import side_by_side

#: the stripe form replaces the dense form of a layer only if it is at least this much faster in onnxruntime
MARGIN = 0.95
OPSET = 18


def ort_session(path: str | Path, threads: int):
    """An onnxruntime CPU session with ``threads`` intra-op threads (1 inter-op)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_runner(session, inputs: List[torch.Tensor]) -> Callable[[], list]:
    """A zero-argument callable running ``session`` on ``inputs`` (numpy copies made once)."""
    feed = {i.name: t.detach().numpy() for i, t in zip(session.get_inputs(), inputs)}
    return partial(session.run, None, feed)


def _export(module: nn.Module, inputs: tuple, path: Path) -> None:
    names = [f"input{i}" for i in range(len(inputs))]
    torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=OPSET, input_names=names)


class _Call(nn.Module):
    """One layer with its (residual) inputs, for exporting it alone."""

    def __init__(self, layer: DeployedStripeConv2d) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.layer(x, residual)


def _layer_inputs(model: nn.Module, layers: Dict[str, DeployedStripeConv2d], example: torch.Tensor) -> Dict:
    captured: Dict[str, tuple] = {}

    def keep(name: str):
        def hook(module, args, output) -> None:
            captured.setdefault(name, tuple(a.detach() for a in args if isinstance(a, torch.Tensor)))
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return captured


def _time_forms(layer: DeployedStripeConv2d, inputs: tuple, threads: int, folder: Path, rounds: int) -> Dict:
    runs = {}
    for form in ("dense", "stripe"):
        layer.onnx_form = form
        path = folder / f"layer_{form}.onnx"
        _export(_Call(layer), inputs, path)
        runs[form] = ort_runner(ort_session(path, threads), list(inputs))
    times = side_by_side(runs, rounds, warmup=2)
    return {f"{form}_ms": round(1e3 * t, 4) for form, t in times.items()}


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, threads: int = 2, rounds: int = 30
                ) -> Dict:
    """Export ``model`` (a deployed model, :func:`swp_plugin.deploy`) to ONNX at ``path``, each stripe layer in the
    form onnxruntime runs faster, never slower than the all-dense export. ``example``: one input batch ``(N, C, H,
    W)`` (the shape is fixed in the graph). Returns a report: per layer the forms' times (ms), whole-model times of
    the chosen and of the all-dense export, which was written, and the max relative error against PyTorch."""
    model = model.eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, DeployedStripeConv2d)}
    report: Dict = {"threads": threads, "layers": []}
    with tempfile.TemporaryDirectory(prefix="swp_onnx_") as tmp:
        folder = Path(tmp)
        captured = _layer_inputs(model, layers, example)
        for name, layer in layers.items():
            inputs = captured.get(name)
            if inputs is None:
                layer.onnx_form = "dense"
                continue
            times = _time_forms(layer, inputs, threads, folder, rounds)
            layer.onnx_form = "stripe" if times["stripe_ms"] < MARGIN * times["dense_ms"] else "dense"
            report["layers"].append({"layer": name, "form": layer.onnx_form, **times})
        chosen = {n: m.onnx_form for n, m in layers.items()}
        runs = {}
        variants = ("chosen", "dense") if "stripe" in chosen.values() else ("dense",)
        for variant in variants:
            for name, layer in layers.items():
                layer.onnx_form = chosen[name] if variant == "chosen" else "dense"
            _export(model, (example,), folder / f"{variant}.onnx")
            runs[variant] = ort_runner(ort_session(folder / f"{variant}.onnx", threads), [example])
        times = side_by_side(runs, rounds, warmup=2)
        times.setdefault("chosen", times["dense"])  # every layer dense: the same export
        best = "chosen" if times["chosen"] < times["dense"] else "dense"
        for name, layer in layers.items():
            layer.onnx_form = chosen[name] if best == "chosen" else "dense"
        Path(path).write_bytes((folder / f"{best}.onnx").read_bytes())
        with torch.no_grad():
            reference = model(example).numpy()
        output = runs[best]()[0]
        report.update(chosen_ms=round(1e3 * times["chosen"], 4), dense_ms=round(1e3 * times["dense"], 4),
                      written=best, stripe_layers=sum(f == "stripe" for f in chosen.values()) if best == "chosen"
                      else 0, max_rel_err=float(np.abs(output - reference).max() / np.abs(reference).max()))
    return report

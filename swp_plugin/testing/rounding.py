"""Float32 against float64, for a whole model and layer by layer: is an inexact float32 ``step()`` rounding, or a
layer that a stripe form computes wrongly? (docs/coverage.md, "inception_v4 and mobileone_s1"; the sweep's
``--per-layer`` option runs :func:`layer_errors` on its pruned model.)

Per layer (forward hooks; a module called twice keeps its last call), for each stripe form (``dense``, ``stripe``,
``cpp``: :func:`swp_plugin.set_backend` values of the ``'auto'`` layers): the float32 model's output against the
float64 copy's, ``max|diff| / max|y64|`` (*chained*: the error every layer before it left, plus its own), the
layer's gain (chained error of its output over that of its input, at least float32's unit roundoff: above 1, the
layer amplifies the rounding that came in), and for a ``StripeConv2d`` its *local* error (the layer alone, fed
the float64 input rounded to float32). A stripe form with a defect shows as a local error far above the dense
form's, and as the first layer whose chained error departs from the dense form's; rounding shows as the same
chained errors in every form, grown by the same layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from ..layers.config import use_backend
from ..layers.kernels import cpu as cpu_kernel
from ..layers.stripe_conv import StripeConv2d
from ..utils import copy_model, flat_outputs
from .exactness import rel_err

#: layer types reported by :func:`layer_errors` (those that compute; activations and identities are skipped)
LAYER_TYPES: Tuple[type, ...] = (nn.Conv2d, StripeConv2d, nn.modules.batchnorm._BatchNorm, nn.Linear)


@torch.no_grad()
def float32_rounding(model: nn.Module, inputs) -> float:
    """``max|diff| / max|y|`` of float32 ``model``'s eval outputs on ``inputs`` (a tensor or a tuple) against those
    of its float64 copy, worst over the outputs: the float32 error the network has anyway."""
    model.eval()
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    y32 = flat_outputs(model(*inputs))
    y64 = flat_outputs(copy_model(model).double()(*[t.double() for t in inputs]))
    return max(rel_err(b, a.double()) for a, b in zip(y32, y64, strict=True))


def stripe_forms() -> List[str]:
    """The forms compared: ``dense``, ``stripe`` and, where the compiled kernel is loaded, ``cpp``."""
    return ["dense", "stripe"] + (["cpp"] if cpu_kernel.available() else [])


@dataclass
class LayerRow:
    """One layer of :func:`layer_errors`: float64 output magnitude, a BatchNorm's :func:`bn_scale` (first form),
    and per form the chained error, the gain and (a ``StripeConv2d``) the
    local error."""

    name: str
    kind: str
    out_max: float
    scale: float | None = None
    chained: Dict[str, float] = field(default_factory=dict)
    gain: Dict[str, float] = field(default_factory=dict)
    local: Dict[str, float] = field(default_factory=dict)


def _record(model: nn.Module, names: Sequence[str], x: torch.Tensor, form: str
            ) -> Tuple[List[torch.Tensor], Dict[str, Tuple[torch.Tensor, torch.Tensor]]]:
    """The model's outputs on ``x`` and each layer's ``(input, output)`` in float64, under backend ``form``."""
    seen: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    modules = dict(model.named_modules())
    where = {modules[n]: n for n in names}

    def hook(module: nn.Module, inputs, output) -> None:
        if isinstance(output, torch.Tensor) and inputs and isinstance(inputs[0], torch.Tensor):
            seen[where[module]] = (inputs[0].detach().double().clone(), output.detach().double().clone())

    handles = [modules[n].register_forward_hook(hook) for n in names]
    try:
        with torch.no_grad(), use_backend(form):
            out = [o.double() for o in flat_outputs(model.eval()(x))]
    finally:
        for handle in handles:
            handle.remove()
    return out, seen


#: float32's unit roundoff: the error of an input that is only rounded to float32 (the floor of a gain's divisor)
UNIT_ROUNDOFF = 2.0 ** -24


def bn_scale(layer: nn.Module, error: torch.Tensor) -> float | None:
    """A BatchNorm's ``|gamma| / sqrt(running_var + eps)`` (what it multiplies a channel's error by) on the channel
    where ``error`` (the output's difference, ``(N, C, ...)``) is largest, else ``None``."""
    if not isinstance(layer, nn.modules.batchnorm._BatchNorm) or layer.running_var is None or error.dim() < 2:
        return None
    channel = int(error.abs().transpose(0, 1).reshape(error.shape[1], -1).amax(dim=1).argmax())
    gamma = float(layer.weight[channel].abs()) if layer.weight is not None else 1.0
    return gamma / float(layer.running_var[channel] + layer.eps) ** 0.5


@torch.no_grad()
def layer_errors(model: nn.Module, x: torch.Tensor, forms: Sequence[str] | None = None
                 ) -> Tuple[Dict[str, float], List[LayerRow]]:
    """``(logit errors per form, rows)`` of float32 ``model`` on ``x`` against its float64 copy (module docstring);
    rows in the order the layers ran."""
    forms = list(forms) if forms is not None else stripe_forms()
    names = [n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    y64, ref = _record(copy_model(model).double(), names, x.double(), "dense")
    modules = dict(model.named_modules())
    rows = [LayerRow(n, type(modules[n]).__name__, float(ref[n][1].abs().max())) for n in ref]  # in running order
    logits: Dict[str, float] = {}
    for form in forms:
        y32, got = _record(model, names, x, form)
        logits[form] = max(rel_err(a, b) for a, b in zip(y64, y32, strict=True))
        for row in rows:
            in64, out64 = ref[row.name]
            in32, out32 = got[row.name]
            row.chained[form] = rel_err(out64, out32)
            row.gain[form] = row.chained[form] / max(rel_err(in64, in32), UNIT_ROUNDOFF)
            if form == forms[0]:
                row.scale = bn_scale(modules[row.name], out64 - out32)
            layer = modules[row.name]
            if isinstance(layer, StripeConv2d):
                with use_backend(form):
                    row.local[form] = rel_err(out64, layer(in64.float()).double())
    return logits, rows


def first_departure(rows: Sequence[LayerRow], form: str, factor: float = 10.0, reference: str = "dense"
                    ) -> LayerRow | None:
    """The first row whose chained error under ``form`` exceeds ``factor`` times the ``reference`` form's (and
    float32's resolution, 1e-6): where a defect of ``form`` would start. ``None``: no such layer."""
    for row in rows:
        if row.chained[form] > max(factor * row.chained[reference], 1e-6):
            return row
    return None


def markdown(logits: Dict[str, float], rows: Sequence[LayerRow], top: int = 8) -> str:
    """The report: logit errors, the first departure and worst local error per form, and the ``top`` layers of
    largest gain (in the dense form) with their chained errors, as markdown."""
    forms = list(logits)
    lines = ["| form | logits vs float64 | first layer 10x above dense | worst local error of a stripe layer |",
             "| --- | --- | --- | --- |"]
    for form in forms:
        first = first_departure(rows, form) if form != "dense" else None
        local = max(rows, key=lambda r: r.local.get(form, -1.0))
        lines.append(f"| {form} | {logits[form]:.1e} | {first.name if first else 'none'} | "
                     f"{local.local.get(form, float('nan')):.1e} ({local.name}) |")
    lines += ["", "| layer (largest gain, dense) | type | max abs float64 output | BN scale, worst channel | gain | "
              + " | ".join(f"chained, {f}" for f in forms) + " |", "| --- " * (5 + len(forms)) + "|"]
    for row in sorted(rows, key=lambda r: -r.gain["dense"])[:top]:
        scale = "-" if row.scale is None else f"{row.scale:.0f}"
        lines.append(f"| {row.name} | {row.kind} | {row.out_max:.2e} | {scale} | {row.gain['dense']:.1f} | "
                     + " | ".join(f"{row.chained[f]:.1e}" for f in forms) + " |")
    return "\n".join(lines)

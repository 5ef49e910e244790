"""Per-layer report of a stripe-pruned model, in the spirit of the paper's Table 5."""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn

from ..layers.stripe_conv import StripeConv2d
from ..utils import run_with_hooks
from .counting import STRIPE_LAYERS, stripe_macs


@torch.no_grad()
def _conv_macs(model: nn.Module, example_inputs) -> Dict[str, Dict]:
    """Name -> layer facts (MACs per sample for one forward of ``example_inputs``) for every 2-D conv."""
    facts: Dict[str, Dict] = {}
    names = {id(m): n for n, m in model.named_modules()}

    def record(module, inputs, output) -> None:
        positions = output.shape[-2] * output.shape[-1]
        kh, kw = module.kernel_size
        if isinstance(module, STRIPE_LAYERS):
            kept_filters = int(torch.unique(module.stripe_out).numel())
            kind = f"Strip({module.in_channels}, {module.num_stripes})"
            macs = stripe_macs(module, output[:1]) // positions
            if isinstance(module, StripeConv2d):
                backend = module.active_backend  # the hook runs after the forward: what it used
                backend = f"auto({backend})" if module.backend == "auto" else backend
            else:
                backend = "deployed kernel"
        else:
            kept_filters = int(module.weight.detach().flatten(1).ne(0).any(dim=1).sum())
            kind = f"Conv({module.in_channels}, {module.out_channels}, {kh}x{kw})"
            macs, backend = module.out_channels * module.in_channels // module.groups * kh * kw, "dense"
        facts[names[id(module)]] = {
            "layer": names[id(module)], "kind": kind, "kept_filters": kept_filters,
            "out_channels": module.out_channels, "macs": macs * positions, "backend": backend,
            "dense_macs": module.out_channels * (module.in_channels // getattr(module, "groups", 1)) * kh * kw
            * positions,
        }

    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, *STRIPE_LAYERS))]
    run_with_hooks(model, convs, record, example_inputs)
    return facts


def report(model: nn.Module, example_inputs, baseline: nn.Module | None = None, show: bool = True) -> List[Dict]:
    """Per-layer rows ``{layer, kind, kept_filters, out_channels, macs_before, macs, backend}`` plus a
    ``total`` row; MACs per sample. ``macs_before`` comes from ``baseline`` (the unpruned model, same layer
    names) when given, else from the dense equivalent of the layer as it is now. Prints the table if
    ``show``."""
    facts = _conv_macs(model, example_inputs)
    before = _conv_macs(baseline, example_inputs) if baseline is not None else {}
    rows = []
    for name, row in facts.items():
        row["macs_before"] = before[name]["macs"] if name in before else row.pop("dense_macs")
        row.pop("dense_macs", None)
        rows.append(row)
    rows.append({"layer": "total", "kind": "", "kept_filters": sum(r["kept_filters"] for r in rows),
                 "out_channels": sum(r["out_channels"] for r in rows), "backend": "",
                 "macs_before": sum(r["macs_before"] for r in rows), "macs": sum(r["macs"] for r in rows)})
    if show:
        print(format_report(rows))
    return rows


def format_report(rows: List[Dict]) -> str:
    """The report as a fixed-width text table."""
    header = (f"{'layer':36} {'stripes':>22} {'kept filters':>13} {'MACs before':>12} {'MACs after':>12} "
              f"{'ratio':>6}  backend")
    lines = [header, "-" * len(header)]
    for r in rows:
        ratio = r["macs"] / r["macs_before"] if r["macs_before"] else 0.0
        filters = f"{r['kept_filters']}/{r['out_channels']}"
        lines.append(f"{r['layer'][:36]:36} {r['kind']:>22} {filters:>13} {r['macs_before'] / 1e6:>11.2f}M "
                     f"{r['macs'] / 1e6:>11.2f}M {ratio:>6.2f}  {r['backend']}")
    return "\n".join(lines)

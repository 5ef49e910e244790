"""The ``latency`` section of docs/performance.md and the README's latency table, from the results of
``benchmarks/latency.py`` (tables, issue 22's targets with met / missed, per-layer GMAC/s)."""

from __future__ import annotations

from collections import Counter
from typing import Callable, Dict, List, Tuple

from doc_section import write_section

IMAGENET_TARGET_NETS = ("resnet18", "resnet50")


def ratios(row: dict) -> Dict[str, float]:
    """``vs_dense``, ``vs_channel`` (speed-ups of the deployed model) and ``of_ideal`` (ORT dense time x MACs ratio
    over the deployed time) of a result row."""
    ideal_ms = row["ort_dense_ms"] * row["stripe_gmacs"] / row["dense_gmacs"]
    return {"vs_dense": row["ort_dense_ms"] / row["deployed_ms"],
            "vs_channel": row["ort_channel_ms"] / row["deployed_ms"],
            "of_ideal": ideal_ms / row["deployed_ms"],
            "twin_gain": row["deployed_eager_ms"] / row["deployed_ms"]}


#: issue 22's targets, 2 threads: (what, rows it applies to, measure, bar, goal)
TARGETS: List[Tuple[str, Callable[[dict], bool], str, float, float]] = [
    ("ImageNet-size rows vs ORT channel-pruned at equal MACs",
     lambda r: r["net"] in IMAGENET_TARGET_NETS, "vs_channel", 0.9, 1.2),
    ("every row: share of the ideal", lambda r: True, "of_ideal", 0.6, 0.8),
    ("VGG16-BN batch 1 / 64, ResNet56 batch 64, 20% kept, vs ORT dense",
     lambda r: abs(r["keep"] - 0.2) < 1e-9 and (r["net"] == "vgg16" or (r["net"] == "resnet56" and r["batch"] > 1)),
     "vs_dense", 2.0, 3.0),
    ("ResNet56 batch 1, 20% kept, vs ORT dense",
     lambda r: r["net"] == "resnet56" and r["batch"] == 1 and abs(r["keep"] - 0.2) < 1e-9, "vs_dense", 1.5, 3.0),
]


def _label(r: dict) -> str:
    return f"{r['net']} @{r['size']}, {r['keep']:.0%} kept, batch {r['batch']}, {r['threads']} threads"


def _fmt(measure: str, value: float) -> str:
    return f"{value:.0%}" if measure == "of_ideal" else f"x{value:.2f}"


def target_rows(rows: List[dict], text: bool = False) -> List[str]:
    """One line per (target, row it applies to, 2 threads): measured, bar, goal, met / missed."""
    out = [] if text else ["| target | row | measured | bar | goal | |", "| --- " * 6 + "|"]
    for what, applies, measure, bar, goal in TARGETS:
        chosen = [r for r in rows if r["threads"] == 2 and applies(r)]
        if not chosen:
            out.append(f"{what}: not run" if text else f"| {what} | not run | | | | |")
        for r in chosen:
            got = ratios(r)[measure]
            verdict = "goal met" if got >= goal else "bar met" if got >= bar else "missed"
            cells = [what, _label(r), _fmt(measure, got), _fmt(measure, bar), _fmt(measure, goal), verdict]
            out.append(" | ".join(cells) if text else
                       "| " + " | ".join(cells[:-1] + [verdict if verdict != "missed" else "**missed**"]) + " |")
    return out


def main_table(rows: List[dict]) -> List[str]:
    lines = ["| net | keep | batch | MACs: stripe / dense (G) | channel-pruned: ratio, MACs | ORT dense (ms) | "
             "ORT channel-pruned | `deploy()` | `deploy()`, eager | vs dense | vs channel | of ideal | "
             "forward |", "| --- " * 13 + "|"]
    for r in rows:
        q = ratios(r)
        lines.append(f"| {r['net']} @{r['size']} | {r['keep']:.0%} | {r['batch']} | {r['stripe_gmacs']:.3f} / "
                     f"{r['dense_gmacs']:.3f} | {r['channel_ratio']:.2f}, {r['channel_gmacs']:.3f} | "
                     f"{r['ort_dense_ms']:.3f} | {r['ort_channel_ms']:.3f} | **{r['deployed_ms']:.3f}** | "
                     f"{r['deployed_eager_ms']:.3f} | x{q['vs_dense']:.2f} | x{q['vs_channel']:.2f} | "
                     f"{q['of_ideal']:.0%} | {r['forward']} |")
    return lines


def choice_lines(rows: List[dict]) -> List[str]:
    lines = ["| net | keep | batch | layers on the kernel | deploy |", "| --- " * 5 + "|"]
    for r in rows:
        impl = Counter(c["impl"] for c in r["choices"])
        lines.append(f"| {r['net']} | {r['keep']:.0%} | {r['batch']} | {impl['kernel']}/{len(r['choices'])} | "
                     f"{r['deploy']} |")
    return lines


def layer_lines(rows: List[dict]) -> List[str]:
    """Per-layer GMAC/s of the deployed layers against ONNX Runtime's dense conv of the same geometry."""
    lines: List[str] = []
    for r in rows:
        if not r.get("layers"):
            continue
        layers = r["layers"]
        dep = sum(c["deployed_ms"] for c in layers)
        ort = sum(c["ort_dense_ms"] for c in layers)
        kept = sum(c["kept_mmacs"] for c in layers)
        dense = sum(c["dense_mmacs"] for c in layers)
        lines += [f"### {_label(r)}", "",
                  f"Convs alone: deployed {dep:.3f} ms for {kept / 1e3:.3f} GMACs kept ({kept / dep:.1f} "
                  f"GMAC/s); ONNX Runtime dense {ort:.3f} ms for {dense / 1e3:.3f} GMACs ({dense / ort:.1f} "
                  f"GMAC/s); share of the ideal {ort * kept / dense / dep:.0%}.", "",
                  "| layer | impl | k, stride | C_in -> C_out @ H_out x W_out | kept / dense MMACs | deployed (ms) | "
                  "GMAC/s | ORT dense (ms) | ORT GMAC/s | of ideal |", "| --- " * 10 + "|"]
        for c in layers:
            lines.append(f"| {c['layer']} | {c['impl']} | {c['kernel'][0]}x{c['kernel'][1]}, {c['stride'][0]} | "
                         f"{c['c_in']} -> {c['c_out']} @ {c['out_hw'][0]}x{c['out_hw'][1]} | {c['kept_mmacs']:.1f} / "
                         f"{c['dense_mmacs']:.1f} | {c['deployed_ms']:.3f} | {c['deployed_gmacs']:.1f} | "
                         f"{c['ort_dense_ms']:.3f} | {c['ort_gmacs']:.1f} | {c['share_of_ideal']:.0%} |")
        lines.append("")
    return lines


def _load(rows: List[dict], cores) -> str:
    loads = [r["load_avg_1min"] for r in rows if "load_avg_1min" in r]
    if not loads:
        return ""
    return (f" Load average (1 min) while the rows were timed: {min(loads):.1f} to {max(loads):.1f} on {cores} "
            "cores (other processes were running: absolute times are inflated and the ratios distorted; rerun it "
            "on a quiet machine)." if max(loads) > 1.5 * (cores or 1) else
            f" Load average (1 min) while the rows were timed: {min(loads):.1f} to {max(loads):.1f}.")


def section(results: Dict) -> str:
    m, rows = results["machine"], results["rows"]
    kernel = "yes" if m["cpp_kernel"] else f"no ({m['cpp_error']})"
    lines = ["## Latency against ONNX Runtime: dense, and channel-pruned at equal MACs (generated)", "",
             f"Generated by `{results['command']}` (`--from-json` re-renders). Machine: {m['cpu']}, "
             f"{m.get('cores', '?')} cores, torch {m['torch']}, onnxruntime {m.get('onnxruntime', '?')}, compiled "
             f"stripe kernel: {kernel}.{_load(rows, m.get('cores'))}", "",
             "Random skeletons (every groups=1 conv keeps the fraction of its stripes at random, each filter at "
             "least one), random weights, BatchNorm calibrated. Per row, every model is timed in one run, side "
             "by side (blocks of calls with a pause before each, order rotated, median): the ratios are what "
             "counts. *ORT channel-pruned*: torch-pruning's magnitude pruner, one uniform ratio bisected so that "
             "its MACs match the stripe model's, in ONNX Runtime. *`deploy()`*: the model `swp_plugin.deploy` "
             "returns; *eager*: `deploy(..., torchscript=False)`. *of ideal*: ORT dense time x (stripe MACs / "
             "dense MACs) over the deployed time. *forward*: what ran the deployed model's calls.", ""]
    lines += main_table(rows) + ["", "### Targets (issue 22; 2 threads)", ""] + target_rows(rows)
    lines += ["", "### What deploy chose", ""] + choice_lines(rows)
    layer = layer_lines(rows)
    if layer:
        lines += ["", "### Per layer: the deployed layer against ONNX Runtime's dense conv of the same geometry", "",
                  "Each conv alone on its own input (captured in the net), the deployed layer as deploy chose it "
                  "(epilogue included, called from Python) against a one-conv ONNX model in ONNX Runtime, side by "
                  "side. GMAC/s: kept MACs for the deployed layer, dense MACs for ONNX Runtime; *of ideal*: ORT "
                  "time x kept / dense MACs over the deployed time.", ""] + layer
    return "\n".join(lines)


def readme_table(results: Dict) -> str:
    lines = ["```", f"{'net, keep, batch (2 threads)':34}{'ORT dense':>10}{'ORT channel':>13}{'deploy()':>10}"
             f"{'vs dense':>10}{'vs channel':>12}{'of ideal':>10}"]
    for r in results["rows"]:
        if r["threads"] != 2:
            continue
        q = ratios(r)
        label = f"{r['net']} @{r['size']}, {r['keep']:.0%}, {r['batch']}"
        vs_dense, vs_channel = f"x{q['vs_dense']:.2f}", f"x{q['vs_channel']:.2f}"
        lines.append(f"{label:34}{r['ort_dense_ms']:>10.2f}{r['ort_channel_ms']:>13.2f}{r['deployed_ms']:>10.2f}"
                     f"{vs_dense:>10}{vs_channel:>12}{q['of_ideal']:>10.0%}")
    lines += ["(ms; random skeletons; ORT channel = channel-pruned to the same MACs, in ONNX Runtime; "
              f"`{results['command']}`)"]
    loads = [r["load_avg_1min"] for r in results["rows"] if "load_avg_1min" in r]
    cores = results["machine"].get("cores") or 1
    if loads and max(loads) > 1.5 * cores:
        lines.append(f"(a loaded machine: load average {min(loads):.0f}-{max(loads):.0f} on {cores} cores while it "
                     "timed; the ratios are distorted, rerun it on a quiet machine)")
    lines.append("```")
    return "\n".join(lines)


def render(results: Dict, md: str, readme: str) -> None:
    """Write the ``latency`` section of ``md`` and the ``latency`` table of ``readme``."""
    write_section(md, "latency", section(results))
    write_section(readme, "latency", readme_table(results))

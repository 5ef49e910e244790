"""docs/results.md's continual-pruning section from the JSONs the main job writes (``examples/continual_prune.py
--json``): each run's table with the command above it, the paper's Table 3 beside all three of its rows, the DCP
ablation (``benchmarks/dcp_ablation.py``).

    python benchmarks/continual_report.py          # rewrites the section between its markers in docs/results.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List

from doc_section import write_section

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TITLE = "## Continual pruning: SWP after a channel-pruning stage (issues 5, 13, 16)"

#: (JSON, heading): the runs of the section, the first three are the paper's Table 3 rows
RUNS = [("continual_default.json", "VGG16-BN, Network Slimming -> SWP (the default, `make run`)"),
        ("continual_dcp_vgg19.json", "VGG19-BN, DCP -> SWP"),
        ("continual_gbn_resnet56.json", "ResNet56 (width 0.5), GBN -> SWP"),
        ("continual_gbn.json", "VGG16-BN, GBN -> SWP")]

#: the paper's Table 3 (CIFAR-10): net -> [(stage, params M, FLOPs M, accuracy)]
PAPER = {"VGG16": [("baseline", 14.72, 627.36, 93.63), ("Network Slimming", 1.44, 272.83, 93.60),
                   ("Network Slimming + SWP", 1.09, 204.02, 93.62)],
         "VGG19": [("DCP", 10.36, 398.42, 93.6), ("DCP + SWP", 3.40, 253.24, 93.4)],
         "ResNet56": [("GBN", 0.30, 112.77, 92.89), ("GBN + SWP", 0.24, 81.26, 92.67)]}


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def run_table(result: Dict) -> List[str]:
    batches = result["args"].get("latency_batches", [1])
    lines = ["| stage | accuracy (%) | params (M) | MACs (M) | "
             + " | ".join(f"deployed latency, batch {b} (ms)" for b in batches)
             + " | epochs | train (s) | train CPU (s) |", "| --- " * (7 + len(batches)) + "|"]
    for s in result["stages"]:
        lat = " | ".join(_cell(s.get(f"latency_ms_batch{b}"), ".3f") for b in batches)
        lines.append(f"| {s['name']} | {s['accuracy']:.2f} | {s['params'] / 1e6:.4f} | {s['macs'] / 1e6:.2f} | {lat} "
                     f"| {s['epochs']:g} | {s['train_seconds']:.0f} | {s.get('train_cpu_seconds', 0):.0f} |")
    swp = result["stages"][-1]
    notes = [f"{100 * swp['dead_stripes']:.1f}% of the stripes died in SWP training",
             f"{swp['accuracy_before_finetune']:.2f}% right after the exact `step()`"]
    if "latency_ms_batch1_eager" in swp:
        notes.append("the SWP model not deployed (eager `StripeConv2d`): " + ", ".join(
            f"{swp[f'latency_ms_batch{b}_eager']:.3f} ms at batch {b}" for b in batches))
    if swp.get("deploy"):
        notes.append(f"deployed: {swp['deploy']}")
    return lines + ["", "SWP row: " + "; ".join(notes) + "."]


def table3(runs: Dict[str, Dict]) -> List[str]:
    lines = ["| net | stage (paper) | params (M) | FLOPs (M) | acc (%) | stage (here) | params (M) | MACs (M) | "
             "acc (%) |", "| --- " * 9 + "|"]
    ours = {"VGG16": runs.get("continual_default.json"), "VGG19": runs.get("continual_dcp_vgg19.json"),
            "ResNet56": runs.get("continual_gbn_resnet56.json")}
    for net, rows in PAPER.items():
        stages = (ours[net] or {}).get("stages", [])
        stages = stages if net == "VGG16" else stages[1:]  # the paper lists the baseline of VGG16 only
        for i, (stage, params, flops, acc) in enumerate(rows):
            here = stages[i] if i < len(stages) else None
            mine = (f"{here['name']} | {here['params'] / 1e6:.4f} | {here['macs'] / 1e6:.2f} | {here['accuracy']:.2f}"
                    if here else "not run | - | - | -")
            lines.append(f"| {net} | {stage} | {params:.2f} | {flops:.2f} | {acc:.2f} | {mine} |")
    return lines


def reading(runs: Dict[str, Dict]) -> List[str]:
    """What SWP added on top of each first stage, here and in the paper (computed)."""
    paper = {"VGG16": PAPER["VGG16"][1:], "VGG19": PAPER["VGG19"], "ResNet56": PAPER["ResNet56"]}
    ours = {"VGG16": "continual_default.json", "VGG19": "continual_dcp_vgg19.json",
            "ResNet56": "continual_gbn_resnet56.json"}
    lines = []
    for net, name in ours.items():
        (_, p0, f0, a0), (_, p1, f1, a1) = paper[net]
        text = (f"- {net}: the paper's SWP removes {100 * (1 - f1 / f0):.0f}% of the first stage's FLOPs and "
                f"{100 * (1 - p1 / p0):.0f}% of its params at {a1 - a0:+.2f} points")
        if name in runs:
            first, swp = runs[name]["stages"][-2:]
            text += (f"; here {100 * (1 - swp['macs'] / first['macs']):.0f}% of the MACs and "
                     f"{100 * (1 - swp['params'] / first['params']):.0f}% of the params (stripe indexes counted) at "
                     f"{swp['accuracy'] - first['accuracy']:+.2f} points")
            if "latency_ms_batch1" in swp and "latency_ms_batch1" in first:
                text += ", deployed latency " + ", ".join(
                    f"x{first[f'latency_ms_batch{b}'] / swp[f'latency_ms_batch{b}']:.2f} at batch {b}"
                    for b in runs[name]["args"].get("latency_batches", [1]))
        lines.append(text + ".")
    return lines


def ablation(path: Path) -> List[str]:
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    a = data["args"]
    lines = ["### DCP ablation", "", "```bash", f"python benchmarks/dcp_ablation.py --baseline {a['baseline']} "
             f"--json benchmarks/results/dcp_ablation.json", "```", "",
             f"The last DCP stage of the trained VGG19-BN baseline loses {100 * a['ratio']:.0f}% of each layer's input "
             "channels in one shot, chosen by each method; test accuracy right after removal, no fine-tuning.", "",
             "| selection | accuracy (%) | CPU (s) |", "| --- | --- | --- |"]
    for r in data["rows"]:
        lines.append(f"| {r['method']} | {r['accuracy']:.2f} | {_cell(r.get('cpu_seconds'), '.1f')} |")
    return lines


def section() -> str:
    runs = {name: json.loads((RESULTS / name).read_text()) for name, _ in RUNS if (RESULTS / name).exists()}
    parts = [TITLE, "", "Generated by `python benchmarks/continual_report.py` from the JSONs the runs below "
             "wrote (do not edit between the markers). Fashion-MNIST, 20 000 training images (the cpu preset), "
             "evaluated on the 10 000 test images; each stage deployed the same way (`swp_plugin.deploy`) and "
             "timed side by side at the end of its run; schedules and aids in [continual.md](continual.md).", ""]
    for name, heading in RUNS:
        if name not in runs:
            continue
        r = runs[name]
        parts += [f"**{heading}**, {r['total_seconds']:.0f} s in all:", "", "```bash",
                  f"python examples/continual_prune.py {r['command']}".rstrip(), "```", ""] + run_table(r) + [""]
    parts += ["### The paper's Table 3, all three rows (issue 16)", "",
              "The paper: CIFAR-10, full-width nets, 160-epoch schedules on a GPU (its FLOPs = our MACs). Here: "
              "Fashion-MNIST, nets sized for 2 CPU cores, minutes of training. Compare the shape of the result (what "
              "SWP adds on top of a channel-pruned net), not the figures.", ""] + table3(runs) + [""]
    parts += reading(runs) + [""] + ablation(RESULTS / "dcp_ablation.json")
    return "\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--doc", default=str(ROOT / "docs" / "results.md"))
    args = parser.parse_args()
    write_section(args.doc, "continual", section())
    print(f"wrote the continual section of {args.doc}")


if __name__ == "__main__":
    main()

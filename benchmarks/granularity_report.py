"""Reporting of the granularity benchmark (``benchmarks/granularity.py``): statistics over seeds, tables,
verdicts, pictures and its section of ``docs/results.md``, from the results JSONs.

Statistics: per method and point, mean and sample standard deviation over seeds. A comparison of two methods
is paired by seed (same baseline and data): the per-seed differences' mean counts as a win or a loss when a
two-sided paired t-test rejects "no difference" at 5% (``|mean| > t_0.975(n-1) * sd / sqrt(n)``; with 3 seeds
that is 2.48 standard deviations of the differences); otherwise it is a tie.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from doc_section import write_section
from granularity_methods import parse_spec

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DOC = ROOT / "docs" / "results.md"
SECTION_TITLE = "## Granularity: stripes vs filters (issues 8, 15)"
ROLES = ("quick", "medium", "full")
FILTERS = ("l1_filter", "slimming")
#: two-sided 95% quantiles of Student's t by degrees of freedom (beyond the table: 1.96)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       15: 2.131, 20: 2.086, 30: 2.042}


def t95(dof: int) -> float:
    return T95.get(dof) or next((T95[k] for k in sorted(T95) if k >= dof), 1.96)


def mean_sd(values: Sequence[float]) -> Tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def label(method: str) -> str:
    if method == "baseline":
        return "baseline"
    return parse_spec(method).label


def point_of(row: dict) -> Tuple[str, float]:
    return ("push", row["push"]) if row.get("push") is not None else ("target", row["target"])


def groups(rows: Sequence[dict], net: str) -> Dict[Tuple[str, Tuple[str, float]], Dict[int, dict]]:
    """(method, point) -> seed -> row, for one net."""
    out: Dict[Tuple[str, Tuple[str, float]], Dict[int, dict]] = {}
    for r in rows:
        if r["net"] == net:
            out.setdefault((r["method"], point_of(r)), {})[r["seed"]] = r
    return out


def stat(rows: Dict[int, dict], key: str = "accuracy", scale: float = 1.0) -> str:
    values = [r[key] * scale for r in rows.values() if r.get(key) is not None]
    if not values:
        return "-"
    mean, sd = mean_sd(values)
    return f"{mean:.2f} ± {sd:.2f}" if len(values) > 1 else f"{mean:.2f}"


def compare(a: Dict[int, float], b: Dict[int, float]) -> Tuple[str, str]:
    """Paired comparison of per-seed values: (verdict, text 'mean ± sd')."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        return "n/a", "-"
    mean, sd = mean_sd(diffs)
    n = len(diffs)
    if n < 2:
        return "single seed", f"{mean:+.2f}"
    significant = abs(mean) > t95(n - 1) * sd / math.sqrt(n)
    verdict = ("beats" if mean > 0 else "loses to") if significant else "ties"
    return verdict, f"{mean:+.2f} ± {sd:.2f}"


def interpolate(rows: Sequence[dict], x: float, key: str = "macs_reduction") -> float | None:
    """Accuracy of a method's curve (its rows of one seed) at ``x`` by linear interpolation; ``None`` outside."""
    points = sorted((r[key], r["accuracy"]) for r in rows if r.get(key) is not None)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if min(x0, x1) <= x <= max(x0, x1) and x1 != x0:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


# --------------------------------------------------------------------------------------------- tables
def _methods(rows: Sequence[dict], paper: bool = False) -> List[str]:
    """The main methods (specs without options) of ``rows``: target-driven ones, or (``paper``) the paper mode."""
    seen = dict.fromkeys(r["method"] for r in rows if r["method"] != "baseline")
    return [m for m in seen if (parse_spec(m).base == "swp_paper") == paper and not parse_spec(m).options]


def has_latency(rows: Sequence[dict]) -> bool:
    """Whether every baseline and main-method row (the ones ``--latency-only`` times) has its latency."""
    timed = {"baseline", *_methods(rows), *_methods(rows, paper=True)}
    return all("latency_b1_ms" in r for r in rows if r["method"] in timed)


def _variants(rows: Sequence[dict], order: Sequence[str] = ()) -> List[str]:
    """The ablation's variants: specs with options, in the order of ``order`` (the run's ``--methods``), else of
    the rows (a resumed run may have written them in another order)."""
    found = [m for m in dict.fromkeys(r["method"] for r in rows if r["method"] != "baseline") if parse_spec(m).options]
    rank = {m: i for i, m in enumerate(order)}
    return sorted(found, key=lambda m: rank.get(m, len(rank)))


def _targets(rows: Sequence[dict]) -> List[float]:
    return sorted({r["target"] for r in rows if r["method"] != "baseline" and r.get("push") is None})


def accuracy_table(rows: Sequence[dict], net: str) -> str:
    """Targets x methods: accuracy mean ± sd over seeds, then MACs reduction reached."""
    g, methods = groups(rows, net), _methods(rows)
    lines = ["| MACs target | " + " | ".join(label(m) for m in methods) + " |", "| --- |" + " --- |" * len(methods)]
    for t in _targets(rows):
        lines.append(f"| -{100 * t:.0f}% | " + " | ".join(stat(g.get((m, ("target", t)), {})) for m in methods) + " |")
    for t in _targets(rows):
        cells = [stat(g.get((m, ("target", t)), {}), "accuracy_before_finetune") for m in methods]
        lines.append(f"| -{100 * t:.0f}%, before fine-tuning | " + " | ".join(cells) + " |")
    for t in _targets(rows):
        cells = [stat(g.get((m, ("target", t)), {}), "macs_reduction", 100) for m in methods]
        lines.append(f"| -{100 * t:.0f}%, MACs reduction reached (%) | " + " | ".join(cells) + " |")
    base = g.get(("baseline", ("target", 0.0)), {})
    if base:
        lines.append(f"\nBaseline: {stat(base)}% ({len(base)} seed(s)), {next(iter(base.values()))['macs'] / 1e6:.2f}M "
                     "MACs. Cells: test accuracy (%) after fine-tuning, mean ± sample standard deviation over seeds.")
    return "\n".join(lines)


def verdicts(rows: Sequence[dict], net: str, reference: str = "swp") -> List[str]:
    """Per other method: where ``reference`` beats, ties or loses (paired by seed)."""
    g, lines = groups(rows, net), []
    for other in _methods(rows):
        if other == reference:
            continue
        parts: Dict[str, List[str]] = {"beats": [], "ties": [], "loses to": [], "single seed": []}
        for t in _targets(rows):
            a = {s: r["accuracy"] for s, r in g.get((reference, ("target", t)), {}).items()}
            b = {s: r["accuracy"] for s, r in g.get((other, ("target", t)), {}).items()}
            verdict, text = compare(a, b)
            if verdict in parts:
                parts[verdict].append(f"-{100 * t:.0f}% ({text})")
        said = [f"{k} it at {', '.join(v)}" if k != "single seed" else f"differs by {', '.join(v)} (one seed)"
                for k, v in parts.items() if v]
        lines.append(f"- vs {label(other)}: {label(reference)} " + "; ".join(said) + ".")
    return lines


def paper_table(rows: Sequence[dict], net: str) -> str:
    """The paper's threshold mode: per push, MACs reached, accuracy, and the target-driven methods'
    accuracy interpolated at the same MACs (paired by seed)."""
    g = groups(rows, net)
    others = [m for m in _methods(rows) if parse_spec(m).base in ("swp", *FILTERS)]
    lines = ["| method, push | dead stripes (%) | MACs reduction (%) | accuracy | "
             + " | ".join(f"minus {label(m)} at the same MACs" for m in others) + " |",
             "| --- | --- | --- | --- |" + " --- |" * len(others)]
    for (method, (kind, push)), seeds in sorted(g.items(), key=lambda kv: (kv[0][0], kv[0][1][1])):
        if kind != "push":
            continue
        dead = {s: {"d": 100 * r["details"].get("dead_stripes", 0)} for s, r in seeds.items()}
        cells = []
        for m in others:
            curve = {s: [r for (mm, _), rs in g.items() if mm == m for ss, r in rs.items() if ss == s] for s in seeds}
            theirs = {s: interpolate(curve[s], seeds[s]["macs_reduction"]) for s in seeds}
            mine = {s: seeds[s]["accuracy"] for s in seeds if theirs[s] is not None}
            verdict, text = compare(mine, {s: v for s, v in theirs.items() if v is not None})
            cells.append(f"{text} ({verdict})" if mine else "outside their MACs range")
        lines.append(f"| {label(method)}, {push:g} | {stat(dead, 'd')} | {stat(seeds, 'macs_reduction', 100)} | "
                     f"{stat(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def latency_table(rows: Sequence[dict], net: str) -> str:
    """Per main method and point: MACs, params, latency at batch 1 and 64 (means over seeds), speed-up."""
    g = groups(rows, net)
    base = g.get(("baseline", ("target", 0.0)), {})
    b1 = mean_sd([r["latency_b1_ms"] for r in base.values()])[0]
    b64 = mean_sd([r["latency_b64_ms"] for r in base.values()])[0]
    lines = ["| method | point | MACs (M) | params (M) | latency b1 (ms) | b64 (ms) | speed-up b1 / b64 |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             f"| baseline | | {_mean(base, 'macs') / 1e6:.2f} | {_mean(base, 'params') / 1e6:.3f} | {b1:.3f} | "
             f"{b64:.2f} | 1.00 / 1.00 |"]
    shown = _methods(rows) + _methods(rows, paper=True)
    for (method, (kind, value)), seeds in sorted(g.items(), key=lambda kv: (kv[0][1][0], kv[0][1][1], kv[0][0])):
        if method not in shown:
            continue
        l1, l64 = _mean(seeds, "latency_b1_ms"), _mean(seeds, "latency_b64_ms")
        where = f"-{100 * value:.0f}% MACs" if kind == "target" else f"push {value:g}"
        lines.append(f"| {label(method)} | {where} | {_mean(seeds, 'macs') / 1e6:.2f} | "
                     f"{_mean(seeds, 'params') / 1e6:.3f} | {l1:.3f} | {l64:.2f} | {b1 / l1:.2f} / {b64 / l64:.2f} |")
    return "\n".join(lines)


def _mean(seeds: Dict[int, dict], key: str) -> float:
    return mean_sd([r[key] for r in seeds.values()])[0]


def equal_latency(rows: Sequence[dict], net: str, key: str) -> List[str]:
    """Each SWP point (target-driven and paper mode) against each filter pruner's curve (seed means, baseline
    included, linear in latency) at the SWP model's latency."""
    g, lines = groups(rows, net), []
    stripes = [m for m in _methods(rows) + _methods(rows, paper=True) if parse_spec(m).base in ("swp", "swp_paper")]
    for other in [m for m in FILTERS if m in _methods(rows)]:
        curve = [{key: _mean(s, key), "accuracy": _mean(s, "accuracy")} for (m, _), s in g.items()
                 if m in (other, "baseline")]
        for (method, (kind, value)), seeds in sorted(g.items(), key=lambda kv: (kv[0][0], kv[0][1][1])):
            if method not in stripes:
                continue
            mine, accuracy = _mean(seeds, key), _mean(seeds, "accuracy")
            at = interpolate(curve, mine, key)
            where = f"-{100 * value:.0f}% MACs" if kind == "target" else f"push {value:g}"
            lines.append(f"- {label(method)} {where}: {mine:.3f} ms, {accuracy:.2f}%; {label(other)} at that latency: "
                         + (f"{at:.2f}% ({accuracy - at:+.2f})" if at is not None else "outside its latency range"))
    return lines


def layer_table(rows: Sequence[dict], net: str, target: float, methods: Sequence[str]) -> str:
    """Per conv, kept weight (= MACs) fraction at ``target``, mean over seeds."""
    g = groups(rows, net)
    present = [m for m in methods if (m, ("target", target)) in g]
    if not present:
        return ""
    names = list(next(iter(g[(present[0], ("target", target))].values()))["layers"])
    lines = [f"| conv (kept % at -{100 * target:.0f}% MACs) | " + " | ".join(label(m) for m in present) + " |",
             "| --- |" + " --- |" * len(present)]
    for n in names:
        cells = [f"{100 * mean_sd([r['layers'][n] for r in g[(m, ('target', target))].values()])[0]:.0f}"
                 for m in present]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- pictures
def plot(result: dict, path: str | os.PathLike, title: str) -> None:
    """Accuracy (mean ± sd) against MACs, and against latency at batch 1 and 64 when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    net = rows[0]["net"]
    axes_keys = [("macs", "MACs (M) per 28x28 image", 1e-6)]
    if has_latency(rows):
        axes_keys += [("latency_b1_ms", "CPU latency, batch 1 (ms)", 1.0), ("latency_b64_ms",
                                                                               "CPU latency, batch 64 (ms)", 1.0)]
    fig, axes = plt.subplots(1, len(axes_keys), figsize=(6 * len(axes_keys), 4.8), squeeze=False)
    g = groups(rows, net)
    for ax, (key, xlabel, scale) in zip(axes[0], axes_keys):
        for method in _methods(rows) + _methods(rows, paper=True):
            pts = sorted((_stat_xy(seeds, key, scale) for (m, _), seeds in g.items() if m == method))
            xs, xe, ys, ye = zip(*pts)
            ax.errorbar(xs, ys, xerr=xe, yerr=ye, marker="o", capsize=3, label=label(method),
                        ls="" if parse_spec(method).base == "swp_paper" else "-")
        base = g.get(("baseline", ("target", 0.0)))
        if base:
            x, _, y, _ = _stat_xy(base, key, scale)
            ax.plot([x], [y], "k*", ms=11, label="baseline")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stat_xy(seeds: Dict[int, dict], key: str, scale: float) -> Tuple[float, float, float, float]:
    x = mean_sd([r[key] * scale for r in seeds.values()])
    y = mean_sd([r["accuracy"] for r in seeds.values()])
    return x[0], x[1], y[0], y[1]


# --------------------------------------------------------------------------------------------- the doc
def settings(method: str, args: dict) -> str:
    """The SWP settings a spec ran with (its options over the run's defaults), in words."""
    spec = parse_spec(method)
    o = spec.options
    epochs = o.get("epochs", args["epochs_sparse"])
    if spec.base == "swp_paper":
        renorm = o.get("renorm", args.get("paper_renorm", 0))
        return (f"threshold {o.get('thr', args.get('paper_threshold', 0.05)):g}, {epochs} epochs"
                f"{', renormalised' if renorm else ''}")
    if spec.base not in ("swp", "shape"):
        return f"{epochs} epochs"
    gradual = o.get("gradual", args.get("gradual", 0))
    return (f"push {o.get('push', args['push_swp']):g}, {'renorm' if o.get('renorm', args['renorm']) else 'no renorm'}"
            f", {f'gradual ({gradual} steps)' if gradual and gradual > 1 else 'one shot'}, score "
            f"{o.get('score', args.get('score', 'fs'))}, {epochs} epochs")


def ablation_table(rows: Sequence[dict], net: str, args: dict) -> str:
    """Variants (then the default SWP and the filter pruners) x targets: accuracy mean ± sd, and the paired
    difference to the first variant."""
    g, targets = groups(rows, net), _targets(rows)
    methods = _variants(rows, args.get("methods", ())) + [m for m in _methods(rows) if m in ("swp", *FILTERS)]
    ref = methods[0]
    lines = ["| variant | settings | " + " | ".join(f"-{100 * t:.0f}%" for t in targets)
             + f" | before fine-tuning, -{100 * targets[-1]:.0f}% | layers at <= 10%, -{100 * targets[-1]:.0f}% |",
             "| --- | --- |" + " --- |" * (len(targets) + 2)]
    for m in methods:
        cells = []
        for t in targets:
            mine = g.get((m, ("target", t)), {})
            cell = stat(mine)
            if m != ref and mine:
                verdict, text = compare({s: r["accuracy"] for s, r in mine.items()},
                                        {s: r["accuracy"] for s, r in g.get((ref, ("target", t)), {}).items()})
                cell += f" ({text}, {verdict.replace('loses to', 'worse').replace('beats', 'better')})"
            cells.append(cell)
        last = g.get((m, ("target", targets[-1])), {})
        low = [sum(v <= 0.105 for v in r["layers"].values()) for r in last.values()]
        lines.append(f"| `{m}` | {settings(m, args)} | " + " | ".join(cells)
                     + f" | {stat(last, 'accuracy_before_finetune')} | {mean_sd(low)[0]:.1f} |")
    return "\n".join(lines)


def _setup(result: dict) -> str:
    a = result["args"]
    seeds = a["seeds"]
    lat = result.get("latency")
    gradual = f"gradual ({a.get('gradual')} steps)" if (a.get("gradual") or 0) > 1 else "one shot"
    return (f"Preset `{a['preset']}`: {', '.join(a['nets'])} (width {a['width']:g}, `in_chans=1`), Fashion-MNIST "
            f"{a['subset'] or 60000} training / {a['test_subset'] or 10000} test images, batch {a['batch_size']}, SGD "
            f"momentum 0.9, wd {a['weight_decay']:g}; seeds {', '.join(map(str, seeds))} (a seed sets the "
            f"initialisation, the training subset and the data order; the methods of a seed share its baseline). "
            f"Baseline {a['epochs_baseline']} epochs (lr {a['lr']:g} cosine); per method one sparse training of "
            f"{a['epochs_sparse']} epochs (lr {a['lr']:g} cosine; plain training for L1 filter; one per target for "
            f"gradual SWP, one per push for the paper mode); every pruned model fine-tuned {a['epochs_finetune']} "
            f"epoch(s) (lr {a['lr_finetune']:g} cosine). Strengths: SWP/shape-wise push {a['push_swp']:g}, "
            f"{'with' if a['renorm'] else 'without'} renormalisation, "
            f"{gradual}, score "
            f"{a.get('score', 'fs')}; paper mode pushes {', '.join(f'{p:g}' for p in a['paper_pushes'])}, threshold "
            f"{a.get('paper_threshold', 0.05):g}; group lasso push {a['push_gl']:g}; slimming push {a['push_slim']:g}; "
            f"global rankings capped at {100 * a['max_layer_ratio']:.0f}% of a layer. Compute: "
            f"{sum(r['seconds'] for r in result['results']) / 60:.0f} min of wall time summed over the models "
            f"({a['threads'] or 'default'} thread(s) per process, {a['device']}, a shared 2-core machine at low "
            "priority)"
            + (f"; latency: {lat['form']} form, {lat['threads']} threads, median of side-by-side rounds." if lat
               else "; latency not measured yet (`--latency-only`)."))


def _commands(result: dict) -> List[str]:
    lines = ["```bash", result["command"]]
    if result.get("latency"):
        lines.append(result["latency"]["command"] + "   # on an idle machine")
    return lines + ["```"]


def section(results: Dict[str, dict]) -> str:
    """The doc section from the results of each role present (quick, medium, full)."""
    parts = [SECTION_TITLE, "", "Generated by `benchmarks/granularity.py` from `benchmarks/results/"
             "granularity_*.json` (do not edit between the markers; `--render --doc` redraws it, the commands below "
             "rerun it). " + __doc__.split("\n\n")[1].replace("\n", " "), ""]
    for role in ROLES:
        result = results.get(role)
        if result is None:
            continue
        rows = result["results"]
        parts += [f"### {role.capitalize()} run", ""]
        parts += _commands(result) + ["", _setup(result), ""]
        for net in dict.fromkeys(r["net"] for r in rows):
            parts += [f"![accuracy vs MACs and latency, {role}](granularity_{role}.png)",
                      "", f"**{net}**", "", accuracy_table(rows, net), "",
                      "SWP against each method, paired by seed (difference in points, mean ± sd over seeds):", ""]
            parts += verdicts(rows, net) + [""]
            variants = _variants(rows, result["args"].get("methods", ()))
            if variants:
                last = _targets(rows)[-1]
                parts += ["Ablation: SWP variants from the same baselines (in brackets: paired difference to the "
                          "first row, the configuration of issue 8, and the t-test's verdict):", "",
                          ablation_table(rows, net, result["args"]), "", f"Per conv, weights (= MACs) kept at "
                          f"-{100 * last:.0f}% MACs, mean over seeds:", "",
                          layer_table(rows, net, last, variants[:1] + _methods(rows)), ""]
            if _methods(rows, paper=True):
                parts += ["The paper's SWP (threshold during training, `step()` without a target) per push, and "
                          "the target-driven methods' accuracy at its MACs (linear interpolation between their "
                          "targets, per seed):", "", paper_table(rows, net), ""]
            if has_latency(rows):
                parts += ["Latency (means over seeds; every saved model timed side by side):", "",
                          latency_table(rows, net), "", "At equal latency (the filter pruner's accuracy interpolated "
                          "at the stripe model's latency, seed means):", ""]
                for key in ("latency_b1_ms", "latency_b64_ms"):
                    parts += [f"batch {key[9:-3]}:", ""] + equal_latency(rows, net, key) + [""]
    return "\n".join(parts) + "\n"


def role_of(result: dict) -> str:
    return result["args"]["preset"]


def render(doc: str | os.PathLike | None, json_path: str | os.PathLike) -> Dict[str, dict]:
    """Print the tables of ``json_path``; with ``doc``: the pictures beside it and its section, from that JSON
    and the other roles' JSONs found beside it (``granularity_<role>.json``)."""
    json_path = Path(json_path)
    mine = json.loads(json_path.read_text())
    results = {r: json.loads(p.read_text()) for r in ROLES
               if (p := json_path.parent / f"granularity_{r}.json").exists()}
    results[role_of(mine)] = mine
    for net in dict.fromkeys(r["net"] for r in mine["results"]):
        print(f"\n{net}\n{accuracy_table(mine['results'], net)}\n" + "\n".join(verdicts(mine["results"], net)))
    if doc:
        for role, result in results.items():
            a = result["args"]
            plot(result, Path(doc).parent / f"granularity_{role}.png",
                 f"{', '.join(a['nets'])} x{a['width']:g}, Fashion-MNIST {a['subset'] or 60000} images, preset "
                 f"{role}, seeds {', '.join(map(str, a['seeds']))}; mean ± sd over seeds")
        write_section(doc, "granularity", section(results))
        print(f"section -> {doc}")
    return results

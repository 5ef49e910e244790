"""docs/coverage.md's sections from the records of ``benchmarks/timm_coverage.py`` (one per source: timm,
torchvision): the protocol, one table row per model, the models where stripes can do little, the errors grouped."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Dict, List

from swp_plugin.testing.sweep import FLOAT64


def _m(v) -> str:
    return "-" if v is None else f"{v / 1e6:.3g}"


def status_text(r: dict) -> str:
    s = r.get("status", "?")
    if s in ("error", "crash", "timeout"):
        return f"{s} ({r.get('stage')})"
    return s


def _protocol(meta: dict) -> str:
    """The protocol paragraph of a source's section."""
    if meta.get("source", "timm") == "timm":
        create = (f"random init, `num_classes=10`, input `4x3xSxS`, S = 96 unless noted; float64 for "
                  f"{', '.join(sorted(FLOAT64))}, whose float32 forward at random init is dominated by rounding")
        ignored, checked = "[classifier]", "the logits"
    else:
        create = ("`torchvision.models.get_model(name, weights=None, num_classes=10)`, segmentation models with "
                  "`weights_backbone=None` and their auxiliary head where they have one (dict outputs `{'out', "
                  "'aux'}`), input `4x3xSxS`, S = 96 (inception_v3: 299, the least its auxiliary classifier "
                  "takes in train mode); `@noaux`: built with `aux_logits=False`")
        ignored = "output_layers"
        checked = "every output (the worst one: logits, segmentation maps)"
    return (
        f"Protocol per model ({create}): `StripePruner(model, x[:1], sr=1e-4, threshold=0.05, ignored_layers="
        f"{ignored})`, random sparse skeleton (50% stripes dead, 30% filters dead), one `regularize()`d SGD step, "
        f"BatchNorm calibration, eval outputs before/after `step()`; **exact** = `max|diff|/max|y| <= 1e-4` on "
        f"{checked} (or within ten times the model's own float32 rounding, measured on the same state, where that "
        f"is larger: docs/coverage.md, \"inception_v4 and mobileone_s1\"), and one fine-tuning step of the pruned "
        f"model (train-mode forward, backward, SGD step) gives "
        "finite gradients and outputs. *Channels removed*: total BatchNorm features or conv output channels went "
        "down. *MACs in g=1 / KxK convs*: share of the model's "
        "MACs in the convs that get a Filter Skeleton with `groups=1` (what stripe pruning removes), and in those "
        "of them with a kernel larger than 1x1 (where a stripe is finer than a filter). Anchor: "
        "`tp.pruner.BasePruner(GroupMagnitudeImportance(), pruning_ratio=0.3)` on a fresh model, same ignored "
        "layers, `step()`, forward (output shapes unchanged). MACs (per image) and params from "
        "`swp_plugin.count_ops_and_params` (torch-pruning's counter plus stripe layers and timm's conv/norm "
        "subclasses), in millions. Each run in its own process with a time limit "
        f"(SWP {meta['timeout']:g} s, torch-pruning {meta['tp_timeout']:g} s). *step s*: wall time of `step()` "
        "(construction time, per-stage times and the child's CPU time are in the JSON; wall times on a shared "
        "machine are indicative only)." + ("" if meta.get("source", "timm") == "timm" else _TORCHVISION_NOTES)
    )


_TORCHVISION_NOTES = (
    " `output_layers`: every conv or linear with 10 outputs (classifiers, auxiliary classifiers, the last conv of "
    "each segmentation head), ignored by both pruners so that every output keeps its channels. The training loss "
    "sums cross-entropies over all outputs (per pixel for segmentation maps; googlenet's and inception_v3's "
    "auxiliary logits in train mode). Their auxiliary classifiers run only in train mode, and torch-pruning's "
    "DependencyGraph is traced in eval mode: channel cleanup removes channels those heads read, so the eval outputs "
    "stay exact but a train-mode forward fails, for SWP and for torch-pruning's own pruner alike (see the errors "
    "below); `@noaux` builds the model without them."
)


def _share(s: dict) -> str:
    if s.get("macs_share_g1") is None:
        return "-"
    return f"{100 * s['macs_share_g1']:.0f} / {100 * s['macs_share_kxk']:.0f}"


def _little_to_gain(records: List[dict], below: float = 0.25) -> List[str]:
    """A paragraph naming the models whose MACs lie mostly where stripes are no finer than filters."""
    few = [f"{r['model']} ({_share(r['swp'])})" for r in records
           if r["swp"].get("macs_share_kxk") is not None and r["swp"]["macs_share_kxk"] < below]
    if not few:
        return []
    return ["", f"Where SWP can do little beyond channel pruning: less than {100 * below:.0f}% of the MACs in "
            f"stripe-prunable KxK convs (g=1 / KxK %): {', '.join(few)}. In 1x1 convs a stripe is a whole filter "
            "(SWP prunes like a channel pruner there); depthwise and grouped convs stay dense (a depthwise stripe is "
            "one weight; whole dead filters still go); `nn.Linear` layers get no skeleton - e.g. ConvNeXt, whose "
            "MLPs are `nn.Linear` and whose 7x7 convs are depthwise, leaves SWP only its stem and downsampling convs."]


def render_md(records: List[dict], meta: dict) -> str:
    """The markdown section of one sweep (``meta['source']``: timm or torchvision)."""
    n = len(records)
    swp = [r["swp"] for r in records]
    tpr = [r["tp"] for r in records]
    exact = [s for s in swp if s.get("status") == "exact"]
    cleanup = [s for s in exact if s.get("channels_removed")]
    tp_ok = [t for t in tpr if t.get("status") == "ok"]
    title = "timm CNNs" if meta.get("source", "timm") == "timm" else "torchvision models"
    lines = [
        f"# SWP coverage on {title}",
        "",
        f"Produced by `{meta['command']}` on {meta['date']} ({meta['machine']}).",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}. "
        f"swp_plugin core: {_core_summary(records)}.",
        "",
        _protocol(meta),
        "",
        f"**SWP: {len(exact)}/{n} exact ({len(cleanup)} with channel cleanup); "
        f"torch-pruning BasePruner: {len(tp_ok)}/{n}**",
        "",
        "SWP: " + _counts(swp) + ". torch-pruning: " + _counts(tpr) + ".",
        "",
        "| model | family | S | SWP | rel err | MACs M before->after | params M before->after | channels removed |"
        " MACs in g=1 / KxK convs % | step s | tp anchor | tp MACs M after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        s, t = r["swp"], r["tp"]
        err = s.get("rel_err")
        removed = s.get("channels_removed")
        step = "-" if s.get("t_step") is None else f"{s['t_step']:.2f}"
        lines.append(
            f"| {r['model']} | {r['family']} | {r['size']} | {status_text(s)} | "
            f"{'-' if err is None else f'{err:.1e}'} | {_m(s.get('macs_before'))} -> {_m(s.get('macs_after'))} | "
            f"{_m(s.get('params_before'))} -> {_m(s.get('params_after'))} | "
            f"{'-' if removed is None else ('yes' if removed else 'no')} | {_share(s)} | "
            f"{step} | "
            f"{status_text(t)} | {_m(t.get('macs_after'))} |"
        )
    lines += _little_to_gain(records)
    lines += ["", "## SWP errors and inexact results, by type", ""]
    lines += _grouped(records, "swp") or ["none"]
    lines += ["", "## torch-pruning anchor errors, by type", ""]
    lines += _grouped(records, "tp") or ["none"]
    broken = [f"`{r['model']}` ({r['tp']['train_forward'][:160]})".replace("|", "\\|") for r in records
              if r["tp"].get("status") == "ok" and r["tp"].get("train_forward", "ok") != "ok"]
    if broken:
        lines += ["", "Anchor runs counted ok (its check is an eval forward) whose pruned model no longer runs in "
                  "train mode: " + "; ".join(broken) + "."]
    lines.append("")
    return "\n".join(lines)


def _counts(recs: List[dict]) -> str:
    c = Counter(r.get("status", "?") for r in recs)
    return ", ".join(f"{v} {k}" for k, v in sorted(c.items(), key=lambda kv: -kv[1]))


def _grouped(records: List[dict], key: str) -> List[str]:
    groups: Dict[str, List[str]] = defaultdict(list)
    for r in records:
        s = r[key]
        if s.get("status") in ("exact", "ok"):
            continue
        if s.get("status") == "inexact":
            groups["inexact"].append(f"`{r['model']}`: rel err {s.get('rel_err', float('nan')):.3g}")
            continue
        msg = s.get("error", "")
        msg = (msg[:240] + " [...]" if len(msg) > 240 else msg).replace("|", "\\|").replace("`", "'")
        extra = ""
        if s.get("rel_err") is not None:
            extra = (f" (rel err after the failed step: {s['rel_err']:.3g})" if s.get("stage") == "step" else
                     f" (eval outputs after step(): rel err {s['rel_err']:.3g})")
        groups[s.get("error_type", "?")].append(f"`{r['model']}` ({s.get('stage')}): {msg}{extra}")
    out = []
    for kind, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        out.append(f"- **{kind}** ({len(items)})")
        out += [f"  - {item}" for item in items]
    return out


def _core_summary(records: List[dict]) -> str:
    cores: Dict[str, List[str]] = defaultdict(list)
    for r in records:
        c = r["swp"].get("core") or r["tp"].get("core") or {}
        cores[f"git {c.get('git', '?')}, sources sha1 {c.get('sha1')}" if c else "unknown"].append(r["model"])
    if len(cores) <= 1:
        return next(iter(cores), "unknown")
    return "**changed during the sweep** (the SWP run of each model used the one listed): " + "; ".join(
        f"{k}: {', '.join(v)}" for k, v in cores.items()
    )

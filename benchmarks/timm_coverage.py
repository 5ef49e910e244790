"""Coverage sweep: Stripe-Wise Pruning (``swp_plugin.StripePruner``) on timm CNNs, with torch-pruning's own
channel pruner as an anchor.

For each model, in its own subprocess with a wall-clock limit:

* SWP: ``timm.create_model(name, pretrained=False, num_classes=10)``, ``StripePruner(model, x[:1], sr=1e-4,
  threshold=0.05, ignored_layers=[classifier])``, a random sparse skeleton (half the stripes dead, 30% of the
  filters dead), one regularized training step, BatchNorm calibration, outputs before / after ``step()`` and
  their relative error ``max|diff| / max|y|`` (exact if <= 1e-4), then a train-mode forward + backward of the
  pruned model. MACs / params before and after, timings, skipped convs, notes, channels removed.
* torch-pruning anchor: ``tp.pruner.BasePruner(..., GroupMagnitudeImportance(), pruning_ratio=0.3)`` on a fresh
  instance of the same model, ``step()``, a forward.

Usage (from the repository root)::

    python benchmarks/timm_coverage.py                       # the full sweep (30-60 min on 2 cores)
    python benchmarks/timm_coverage.py --models resnet18,dla34 --json /tmp/c.json --md /tmp/c.md
    python benchmarks/timm_coverage.py --one resnet18         # one model in this process, record printed

Writes ``benchmarks/results/timm_coverage.json`` (one record per model) and ``docs/coverage.md``.
The per-model functions (``run_swp``, ``run_tp``) are imported by ``tests/test_timm_coverage.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "timm_coverage.json"
DEFAULT_MD = ROOT / "docs" / "coverage.md"
TOLERANCE = 1e-4

# name -> family; the smallest variant of each family, plus a few with a special layer (noted).
MODELS: Dict[str, str] = {
    "resnet18": "resnet",
    "resnet50": "resnet",
    "resnet18d": "resnet",  # deep stem, avg-pool downsample
    "resnet10t": "resnet",
    "resnext26ts": "resnext",
    "resnext50_32x4d": "resnext",
    "seresnet18": "senet",
    "legacy_seresnet18": "senet",
    "seresnext26d_32x4d": "senet",
    "ecaresnet26t": "senet",  # ECA attention (conv1d over channels)
    "gcresnet33ts": "senet",  # global context attention
    "regnetx_002": "regnet",
    "regnety_002": "regnet",
    "regnetz_005": "regnetz",
    "efficientnet_b0": "efficientnet",
    "tf_efficientnet_b0": "efficientnet",  # Conv2dSame (TF 'SAME' padding)
    "efficientnet_b0_gn": "efficientnet",  # GroupNorm
    "efficientnet_cc_b0_4e": "efficientnet",  # CondConv2d (routed expert kernels)
    "efficientnetv2_rw_t": "efficientnetv2",
    "tf_efficientnetv2_b0": "efficientnetv2",
    "tinynet_e": "tinynet",
    "mobilenetv2_035": "mobilenetv2",
    "mobilenetv3_small_050": "mobilenetv3",
    "mobilenetv4_conv_small_035": "mobilenetv4",
    "mobilenetv4_hybrid_medium": "mobilenetv4",  # attention blocks
    "mnasnet_small": "mnasnet",
    "semnasnet_050": "mnasnet",
    "fbnetc_100": "fbnet",
    "fbnetv3_b": "fbnet",
    "ghostnet_050": "ghostnet",
    "ghostnetv2_100": "ghostnet",
    "ghostnetv3_050": "ghostnet",
    "repghostnet_050": "repghost",
    "rexnet_100": "rexnet",
    "mixnet_s": "mixnet",
    "densenet121": "densenet",
    "dla34": "dla",
    "dla46_c": "dla",
    "dla60_res2net": "dla",
    "dpn48b": "dpn",
    "hrnet_w18_small": "hrnet",
    "cspresnet50": "cspnet",
    "cspdarknet53": "cspnet",
    "cs3darknet_s": "cspnet",
    "darknet17": "darknet",
    "sedarknet21": "darknet",
    "res2net50_14w_8s": "res2net",
    "resnest14d": "resnest",
    "skresnet18": "sknet",
    "nf_resnet26": "nfnet",  # ScaledStdConv2d
    "dm_nfnet_f0": "nfnet",
    "repvgg_a0": "repvgg",
    "repvgg_a0@reparam": "repvgg",  # after reparameterize(): one 3x3 conv per block
    "mobileone_s0": "mobileone",
    "mobileone_s0@reparam": "mobileone",
    "convnext_atto": "convnext",  # LayerNorm
    "convnextv2_atto": "convnext",  # GRN
    "inception_v3": "inception",
    "inception_v4": "inception",
    "xception41": "xception",
    "ese_vovnet19b_dw": "vovnet",
    "vovnet39a": "vovnet",
    "selecsls42b": "selecsls",
    "gernet_s": "gernet",
    "lcnet_050": "lcnet",
    "tresnet_m": "tresnet",  # space-to-depth stem, anti-aliasing
    "resnetv2_18": "resnetv2",  # pre-activation
    "resnetv2_50x1_bit": "resnetv2",  # StdConv2d + GroupNorm
    "hgnetv2_b0": "hgnet",
    "hgnet_tiny": "hgnet",
    "vgg11_bn": "vgg",
    "repvit_m0_9": "repvit",
    "fastvit_t8": "fastvit",
    "mobilevit_xxs": "mobilevit (hybrid)",
    "edgenext_xx_small": "edgenext (hybrid)",
    "efficientvit_b0": "efficientvit (hybrid)",
    "efficientvit_m0": "efficientvit (hybrid)",
    "lambda_resnet26t": "lambda (hybrid)",
    "inception_next_atto": "inception_next",
}

#: name suffix: prune the model after ``timm.utils.reparameterize_model`` (its fused inference form)
REPARAM = "@reparam"

#: Models checked in float64: at random init their float32 forward is numerically meaningless (repvit_m0_9:
#: activations reach 1e7 and the float32 logits differ from float64 ones by 100%), so a float32 comparison
#: measures rounding, not the pruning (in float64 its stripe conversion matches to 1e-13).
FLOAT64 = {"repvit_m0_9"}

# Per-model input size where the default does not suit (every model above runs at 96x96 in timm 1.0.31).
SIZES: Dict[str, int] = {}


# ---------------------------------------------------------------------------------------------- helpers








def channel_counts(model) -> Dict[str, int]:
    """Total BatchNorm ``num_features`` and total conv output channels (dense and stripe convs)."""
    import torch.nn as nn

    from swp_plugin import StripeConv2d

    bn = sum(m.num_features for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    conv = sum(m.out_channels for m in model.modules() if isinstance(m, (nn.Conv2d, StripeConv2d)))
    return {"bn_features": int(bn), "conv_out_channels": int(conv)}


def error_info(err: BaseException) -> Dict[str, str]:
    """Type, the message's first line (the traceback's last line) and the last frames of the traceback."""
    lines = str(err).strip().splitlines()
    tb = traceback.format_exception(type(err), err, err.__traceback__)
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if "swp_plugin" in f.filename.replace("\\", "/").split("/")]
    info = {
        "error_type": type(err).__name__,
        "error": (lines[0] if lines else "")[:400],
        "traceback": "".join(tb)[-3000:],
    }
    if ours:  # the innermost swp_plugin frame: where the core gave up (or called what failed)
        f = ours[-1]
        info["where"] = f"{f.filename.split('swp_plugin')[-1].lstrip('/')}:{f.lineno} {f.name}"
    return info


def core_fingerprint() -> Dict[str, str]:
    """Where ``swp_plugin`` is imported from and a hash of its sources (the core may change between runs)."""
    spec = importlib.util.find_spec("swp_plugin")
    if spec is None or spec.origin is None:
        return {"path": "not installed", "sha1": ""}
    pkg = Path(spec.origin).parent
    digest = hashlib.sha1()
    for path in sorted(pkg.rglob("*.py")):
        digest.update(str(path.relative_to(pkg)).encode())
        digest.update(path.read_bytes())
    info = {"path": str(pkg), "sha1": digest.hexdigest()[:12]}
    try:
        head = subprocess.run(["git", "-C", str(pkg), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(pkg), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=10)
        if head.returncode == 0:
            info["git"] = head.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def versions() -> Dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in ("torch", "timm", "torch-pruning"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def _stage_times(rec: dict) -> None:
    """Close the running stage's clock in ``rec['stage_s']``."""
    now = time.perf_counter()
    if rec.get("stage") and "_t" in rec:
        rec.setdefault("stage_s", {})[rec["stage"]] = round(now - rec["_t"], 3)
    rec["_t"] = now


def _make_model(name: str, size: int):
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(name.removesuffix(REPARAM), pretrained=False, num_classes=10)
    if name.endswith(REPARAM):  # the deploy form of a reparameterisable net
        from timm.utils.model import reparameterize_model

        model = reparameterize_model(model.eval())
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    if name in FLOAT64:
        model, x = model.double(), x.double()
    return model.eval(), x


def _finished(rec: dict, t_start: float) -> dict:
    """Close the last stage's clock and record the wall time of the pipeline."""
    _stage_times(rec)
    rec.pop("_t", None)
    rec["wall"] = time.perf_counter() - t_start
    return rec


def _stager(rec: dict, progress: Callable[[dict], None] | None) -> Callable[[str], None]:
    """``stage(name)``: close the running stage's clock in ``rec``, start ``name``, report progress."""

    def stage(s: str) -> None:
        _stage_times(rec)
        rec["stage"] = s
        if progress is not None:
            progress(rec)

    return stage


# ---------------------------------------------------------------------------------------------- SWP
def run_swp(name: str, size: int = 96, progress: Callable[[dict], None] | None = None) -> dict:
    """The SWP pipeline on one model, in this process. Returns the record; never raises (errors are recorded
    with the stage they happened in). ``progress(record)`` is called when each stage starts."""
    import torch
    import torch.nn.functional as F

    rec: dict = {"status": "running", "stage": None}
    t_start = time.perf_counter()
    stage = _stager(rec, progress)

    try:
        stage("import")
        import swp_plugin
        from swp_plugin.testing import calibrate_bn, randomize_skeletons, regularized_step

        stage("create")
        model, x = _make_model(name, size)
        stage("count_before")
        macs, params = swp_plugin.count_ops_and_params(model, x[:1])
        rec.update(macs_before=float(macs), params_before=int(params))
        rec.update({k + "_before": v for k, v in channel_counts(model).items()})

        stage("pruner")
        t = time.perf_counter()
        pruner = swp_plugin.StripePruner(model, x[:1], sr=1e-4, threshold=0.05,
                                         ignored_layers=[model.get_classifier()])
        rec["t_pruner"] = time.perf_counter() - t
        rec["skeletons"] = len(pruner.skeletons)
        rec["skipped"] = len(pruner.skipped)
        rec["skipped_reasons"] = dict(Counter(str(r)[:160] for r in pruner.skipped.values()).most_common(5))

        stage("skeleton")
        randomize_skeletons(pruner, dead_stripes=0.5, dead_filters=0.3)
        stage("regularize")
        regularized_step(model, pruner, x)
        stage("calibrate")
        calibrate_bn(model, x)
        with torch.no_grad():
            y0 = model(x)

        stage("step")
        t = time.perf_counter()
        try:
            pruner.step()
        finally:
            rec["t_step"] = time.perf_counter() - t
            rec["notes"] = len(getattr(pruner, "notes", []) or [])
            rec["notes_sample"] = [str(n)[:200] for n in (getattr(pruner, "notes", []) or [])[:3]]
            _measure_after(rec, model, x, y0)

        stage("count_after")
        macs, params = swp_plugin.count_ops_and_params(model, x[:1])
        rec.update(macs_after=float(macs), params_after=int(params))
        rec["stripe_convs"] = sum(isinstance(m, swp_plugin.StripeConv2d) for m in model.modules())

        stage("backward")
        model.train()
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), torch.arange(x.shape[0]) % 10)
        loss.backward()
        params = [p for p in model.parameters() if p.requires_grad]
        if not any(p.grad is not None for p in params):
            raise RuntimeError("backward gave no gradient to any parameter")
        rec["backward_ok"] = True
        rec["params_without_grad"] = sum(p.grad is None for p in params)  # info: unused branches have none
        rec["grads_finite"] = all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)

        _stage_times(rec)
        rec["stage"] = None
        rec["status"] = "exact" if rec["rel_err"] <= TOLERANCE else "inexact"
    except Exception as err:  # noqa: BLE001 - recorded, the sweep goes on
        rec["status"] = "error"
        rec.update(error_info(err))
    return _finished(rec, t_start)


def _measure_after(rec: dict, model, x, y0) -> None:
    """Outputs after ``step()`` (also after a failed one: the model may have been changed), channels."""
    import torch

    from swp_plugin.testing import rel_err

    try:
        model.eval()
        with torch.no_grad():
            y1 = model(x)
            rec["rel_err"] = rel_err(y0, y1)
    except Exception as err:  # noqa: BLE001
        rec["after_forward_error"] = f"{type(err).__name__}: {str(err).strip()[:200]}"
    counts = channel_counts(model)
    rec.update({k + "_after": v for k, v in counts.items()})
    rec["channels_removed"] = any(counts[k] < rec.get(k + "_before", counts[k]) for k in counts)


# ---------------------------------------------------------------------------------------------- anchor
def run_tp(name: str, size: int = 96, progress: Callable[[dict], None] | None = None) -> dict:
    """torch-pruning's own channel pruner (magnitude, ratio 0.3) on a fresh model, then a forward."""
    import torch
    import torch_pruning as tp

    rec: dict = {"status": "running", "stage": None}
    t_start = time.perf_counter()
    stage = _stager(rec, progress)

    try:
        stage("import")
        try:  # only for the MAC counter (tp's, plus timm's conv / norm subclasses): same figures as SWP's
            from swp_plugin import count_ops_and_params
            rec["counter"] = "swp_plugin"
        except Exception:  # noqa: BLE001 - the core may be mid-edit; the anchor must not depend on it
            count_ops_and_params = tp.utils.count_ops_and_params
            rec["counter"] = "torch_pruning"

        stage("create")
        model, x = _make_model(name, size)
        macs, params = count_ops_and_params(model, x[:1])
        rec.update(macs_before=float(macs), params_before=int(params))
        stage("pruner")
        t = time.perf_counter()
        pruner = tp.pruner.BasePruner(model, x[:1], importance=tp.importance.GroupMagnitudeImportance(),
                                      pruning_ratio=0.3, ignored_layers=[model.get_classifier()])
        rec["t_pruner"] = time.perf_counter() - t
        stage("step")
        t = time.perf_counter()
        pruner.step()
        rec["t_step"] = time.perf_counter() - t
        stage("forward")
        with torch.no_grad():
            y = model(x)
        if tuple(y.shape) != (x.shape[0], 10):
            raise RuntimeError(f"output shape {tuple(y.shape)} after pruning")
        stage("count_after")
        macs, params = count_ops_and_params(model, x[:1])
        rec.update(macs_after=float(macs), params_after=int(params))
        _stage_times(rec)
        rec["stage"] = None
        rec["status"] = "ok"
    except Exception as err:  # noqa: BLE001
        rec["status"] = "error"
        rec.update(error_info(err))
    return _finished(rec, t_start)


RUNNERS = {"swp": run_swp, "tp": run_tp}


# ---------------------------------------------------------------------------------------------- driver
def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def child_main(name: str, mode: str, size: int, out: str | None, threads: int = 1) -> int:
    """``--one NAME``: run one model in this process; the record (updated at each stage) goes to ``out``."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    progress = (lambda rec: _write_json(Path(out), rec)) if out else None
    rec = RUNNERS[mode](name, size, progress)
    rec["core"] = core_fingerprint()
    if out:
        _write_json(Path(out), rec)
    else:
        print(json.dumps(rec, indent=1, default=str))
    return 0


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def held(lock_file: str | None):
    """An exclusive ``flock`` on ``lock_file`` for the duration (nothing when ``None``)."""
    if not lock_file:
        yield
        return
    with open(lock_file, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_isolated(name: str, mode: str, size: int, timeout: float, threads: int = 1) -> dict:
    """Run one model in a subprocess (``--one``) with a wall-clock limit; a timeout or crash is recorded with
    the last stage the child reported."""
    with tempfile.TemporaryDirectory(prefix="timm_cov_") as tmp:
        out = Path(tmp) / "rec.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--mode", mode, "--size", str(size),
               "--out", str(out), "--threads", str(threads)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        t, cpu = time.perf_counter(), _children_cpu()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                                  env=env)
            status, tail = None, (proc.stdout + proc.stderr)[-1500:]
            if proc.returncode != 0:
                status = "crash"
        except subprocess.TimeoutExpired as exc:  # subprocess.run kills the child
            status, tail = "timeout", str(exc.stderr or "")[-1500:]
        wall, cpu = time.perf_counter() - t, _children_cpu() - cpu
        try:
            rec = json.loads(out.read_text())
        except (OSError, ValueError):
            rec = {"stage": "start"}
    if status == "timeout":
        rec.update(status="timeout", error_type="Timeout", error=f"no result within {timeout:g} s "
                   f"(stage '{rec.get('stage')}')")
    elif status == "crash" or rec.get("status") == "running":
        rec.update(status="crash", error_type="Crash", error=f"process exited with code {proc.returncode} "
                   f"(stage '{rec.get('stage')}'): {tail.strip().splitlines()[-1][:300] if tail.strip() else ''}")
    rec["wall_process"] = round(wall, 2)
    rec["cpu_process"] = round(cpu, 2)  # user + sys of the child: wall >> cpu / 2 means a busy machine
    return rec


def _m(v) -> str:
    return "-" if v is None else f"{v / 1e6:.3g}"


def _status(r: dict) -> str:
    s = r.get("status", "?")
    if s in ("error", "crash", "timeout"):
        return f"{s} ({r.get('stage')})"
    return s


def render_md(records: List[dict], meta: dict) -> str:
    n = len(records)
    swp = [r["swp"] for r in records]
    tpr = [r["tp"] for r in records]
    exact = [s for s in swp if s.get("status") == "exact"]
    cleanup = [s for s in exact if s.get("channels_removed")]
    tp_ok = [t for t in tpr if t.get("status") == "ok"]
    lines = [
        "# SWP coverage on timm CNNs",
        "",
        f"Produced by `{meta['command']}` on {meta['date']} ({meta['machine']}).",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}. "
        f"swp_plugin core: {_core_summary(records)}.",
        "",
        "Protocol per model (random init, `num_classes=10`, input `4x3xSxS`, S = 96 unless noted; float64 for "
        f"{', '.join(sorted(FLOAT64))}, whose float32 forward at random init is dominated by rounding): "
        "`StripePruner(model, x[:1], sr=1e-4, threshold=0.05, ignored_layers=[classifier])`, random sparse "
        "skeleton (50% stripes dead, 30% filters dead), one `regularize()`d SGD step, BatchNorm calibration, "
        "eval outputs before/after `step()`; **exact** = `max|diff|/max|y| <= 1e-4` on the logits and a "
        "train-mode forward + backward of the pruned model works. *Channels removed*: total BatchNorm features "
        "or conv output channels went down. Anchor: `tp.pruner.BasePruner(GroupMagnitudeImportance(), "
        "pruning_ratio=0.3)` on a fresh model, `step()`, forward. MACs (per image) and params from "
        "`swp_plugin.count_ops_and_params` (torch-pruning's counter plus stripe layers and timm's conv/norm "
        "subclasses), in millions. Each run in its own process with a time limit "
        f"(SWP {meta['timeout']:g} s, torch-pruning {meta['tp_timeout']:g} s). *step s*: wall time of `step()` "
        "(construction time, per-stage times and the child's CPU time are in the JSON; wall times on a shared "
        "machine are indicative only).",
        "",
        f"**SWP: {len(exact)}/{n} exact ({len(cleanup)} with channel cleanup); "
        f"torch-pruning BasePruner: {len(tp_ok)}/{n}**",
        "",
        "SWP: " + _counts(swp) + ". torch-pruning: " + _counts(tpr) + ".",
        "",
        "| model | family | S | SWP | rel err | MACs M before->after | params M before->after | channels removed |"
        " step s | tp anchor | tp MACs M after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        s, t = r["swp"], r["tp"]
        err = s.get("rel_err")
        removed = s.get("channels_removed")
        step = "-" if s.get("t_step") is None else f"{s['t_step']:.2f}"
        lines.append(
            f"| {r['model']} | {r['family']} | {r['size']} | {_status(s)} | "
            f"{'-' if err is None else f'{err:.1e}'} | {_m(s.get('macs_before'))} -> {_m(s.get('macs_after'))} | "
            f"{_m(s.get('params_before'))} -> {_m(s.get('params_after'))} | "
            f"{'-' if removed is None else ('yes' if removed else 'no')} | "
            f"{step} | "
            f"{_status(t)} | {_m(t.get('macs_after'))} |"
        )
    lines += ["", "## SWP errors and inexact results, by type", ""]
    lines += _grouped(records, "swp") or ["none"]
    lines += ["", "## torch-pruning anchor errors, by type", ""]
    lines += _grouped(records, "tp") or ["none"]
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
        extra = f" (rel err after the failed step: {s['rel_err']:.3g})" if s.get("rel_err") is not None else ""
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
        cores[f"`{c.get('path')}` (git {c.get('git', '?')}, sources sha1 {c.get('sha1')})" if c else "unknown"].append(
            r["model"]
        )
    if len(cores) <= 1:
        return next(iter(cores), "unknown")
    return "**changed during the sweep** (the SWP run of each model used the one listed): " + "; ".join(
        f"{k}: {', '.join(v)}" for k, v in cores.items()
    )


def _command(argv: List[str]) -> str:
    script = Path(argv[0]).resolve()
    try:
        script_s = str(script.relative_to(ROOT))
    except ValueError:
        script_s = str(script)
    return " ".join(["python", script_s] + [shlex.quote(a) for a in argv[1:]])


def main(argv: List[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", help=f"comma-separated subset (default: the full list, {len(MODELS)} models)")
    p.add_argument("--timeout", type=float, default=300, help="SWP wall-clock limit per model, s (default 300)")
    p.add_argument("--tp-timeout", type=float, default=120, help="torch-pruning limit per model, s (default 120)")
    p.add_argument("--size", type=int, default=96, help="input size S (default 96; per-model overrides in SIZES)")
    p.add_argument("--json", default=str(DEFAULT_JSON), help="output JSON (default %(default)s)")
    p.add_argument("--md", default=str(DEFAULT_MD), help="output markdown (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per model process (default 1: robust "
                   "on a shared machine, where OpenMP threads\nof several processes oversubscribe the cores)")
    p.add_argument("--skip-tp", action="store_true", help="do not run the torch-pruning anchor")
    p.add_argument("--resume", action="store_true", help="keep the records already in --json, run the rest")
    p.add_argument("--lock", metavar="FILE", help="hold an exclusive lock on FILE (flock) while a model runs, so that "
                   "timing jobs of other\nprocesses that take the same lock run between models, not beside them")
    p.add_argument("--one", metavar="NAME", help="run one model in this process (used by the sweep)")
    p.add_argument("--mode", choices=sorted(RUNNERS), default="swp", help="with --one: which pipeline")
    p.add_argument("--out", help="with --one: write the record here (else print it)")
    args = p.parse_args(argv[1:])

    if args.one:
        return child_main(args.one, args.mode, SIZES.get(args.one, args.size), args.out, args.threads)

    import timm

    names = [n.strip() for n in args.models.split(",") if n.strip()] if args.models else list(MODELS)
    unknown = [n for n in names if not timm.is_model(n.removesuffix(REPARAM))]
    if unknown:
        p.error(f"not timm models: {', '.join(unknown)}")
    meta = {
        "command": _command(argv),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{os.cpu_count()} CPU cores, torch CPU, {args.threads} thread(s) per model process",
        "versions": versions(),
        "timeout": args.timeout,
        "tp_timeout": args.tp_timeout,
    }
    done: Dict[str, dict] = {}
    if args.resume and Path(args.json).exists():
        previous = json.loads(Path(args.json).read_text())
        done = {r["model"]: r for r in previous.get("records", []) if r["model"] in names}
        meta["command"], meta["date"] = previous["meta"]["command"], previous["meta"]["date"]
    records: List[dict] = []
    t0 = time.perf_counter()
    for i, name in enumerate(names, 1):
        if name in done:
            records.append(done[name])
            continue
        size = SIZES.get(name, args.size)
        rec = {"model": name, "family": MODELS.get(name, name.split("_")[0]), "size": size}
        with held(args.lock):
            rec["swp"] = run_isolated(name, "swp", size, args.timeout, args.threads)
            if args.skip_tp:
                rec["tp"] = {"status": "skipped"}
            else:
                rec["tp"] = run_isolated(name, "tp", size, args.tp_timeout, args.threads)
        records.append(rec)
        _write_json(Path(args.json), {"meta": meta, "records": records})
        s, t = rec["swp"], rec["tp"]
        err = f" rel_err={s['rel_err']:.1e}" if s.get("rel_err") is not None else ""
        why = f" [{s.get('error_type')}: {s.get('error', '')[:100]}]" if s.get("error_type") else ""
        print(f"[{i}/{len(names)} {time.perf_counter() - t0:.0f}s] {name}: SWP {_status(s)}{err}{why}; "
              f"tp {_status(t)} ({s.get('wall_process', 0):.0f}s + {t.get('wall_process', 0):.0f}s)", flush=True)
    meta["wall_total_s"] = round(time.perf_counter() - t0, 1)
    _write_json(Path(args.json), {"meta": meta, "records": records})
    md = render_md(records, meta)
    Path(args.md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.md).write_text(md)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

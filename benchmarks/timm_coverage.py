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

    python benchmarks/timm_coverage.py --one-process          # every model in this process, in sequence

Writes ``benchmarks/results/timm_coverage.json`` (one record per model) and ``docs/coverage.md``.
The per-model routines (``run_swp``, ``run_tp``) and the model list live in :mod:`swp_plugin.testing.sweep`.
``--one-process`` runs them in sequence in one process (no time limit): heap damage done by one model then
shows in a later one, which a process per model hides (the memory-safety sweep).
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
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List

from swp_plugin.testing.sweep import FLOAT64, MODELS, REPARAM, RUNNERS, SIZES

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "timm_coverage.json"
DEFAULT_MD = ROOT / "docs" / "coverage.md"


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


def in_process(name: str, mode: str, size: int, timeout: float, threads: int = 1) -> dict:
    """Run one model in this process (``--one-process``; ``timeout`` is not enforced)."""
    import torch

    torch.set_num_threads(threads)
    return {**RUNNERS[mode](name, size), "core": core_fingerprint()}


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
    p.add_argument("--one-process", action="store_true", help="run every model in this process, in sequence (no "
                   "time limit): the memory-safety sweep")
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
        run = in_process if args.one_process else run_isolated
        with held(args.lock):
            rec["swp"] = run(name, "swp", size, args.timeout, args.threads)
            if args.skip_tp:
                rec["tp"] = {"status": "skipped"}
            else:
                rec["tp"] = run(name, "tp", size, args.tp_timeout, args.threads)
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

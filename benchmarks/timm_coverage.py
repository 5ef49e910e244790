"""Coverage sweep: Stripe-Wise Pruning (``swp_plugin.StripePruner``) on timm CNNs or torchvision models, with
torch-pruning's own channel pruner as an anchor.

For each model, in its own subprocess with a wall-clock limit:

* SWP: ``timm.create_model(name, pretrained=False, num_classes=10)``, ``StripePruner(model, x[:1], sr=1e-4,
  threshold=0.05, ignored_layers=[classifier])``, a random sparse skeleton (half the stripes dead, 30% of the
  filters dead), one regularized training step, BatchNorm calibration, outputs before / after ``step()`` and
  their relative error ``max|diff| / max|y|`` (exact if <= 1e-4, or ten times the model's own float32 rounding
  where that is larger), then a train-mode forward + backward of the pruned model. MACs / params before and
  after, timings, skipped convs, notes, channels removed.
* torch-pruning anchor: ``tp.pruner.BasePruner(..., GroupMagnitudeImportance(), pruning_ratio=0.3)`` on a fresh
  instance of the same model, ``step()``, a forward.

torchvision models (``--source torchvision``, :mod:`swp_plugin.testing.torchvision_models`):
``torchvision.models.get_model(name, weights=None, num_classes=10)``, segmentation models also with
``weights_backbone=None`` (nothing downloads) and their auxiliary head where they have one (dict outputs
``{'out', 'aux'}``); every conv or linear with 10 outputs (classifiers, auxiliary classifiers, the last conv of
each segmentation head) is ignored; the loss sums cross-entropies over all outputs and the exactness check takes
the worst output.

Usage (from the repository root)::

    python benchmarks/timm_coverage.py                       # the full timm sweep (30-60 min on 2 cores)
    python benchmarks/timm_coverage.py --source torchvision  # the torchvision sweep (about 10 min)
    python benchmarks/timm_coverage.py --models resnet18,dla34 --json /tmp/c.json --md /tmp/c.md
    python benchmarks/timm_coverage.py --one resnet18         # one model in this process, record printed

    python benchmarks/timm_coverage.py --one-process          # every model in this process, in sequence

Writes ``benchmarks/results/{timm,torchvision}_coverage.json`` (one record per model) and the source's section
of ``docs/coverage.md`` (between ``<!-- coverage-SOURCE:begin/end -->`` markers; the other sections are kept;
``--from-json`` renders it again from the JSON).
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
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

from coverage_report import render_md, status_text  # noqa: E402
from doc_section import write_section  # noqa: E402

from swp_plugin.testing import torchvision_models  # noqa: E402
from swp_plugin.testing.sweep import MODEL_LISTS, MODELS, REPARAM, RUNNERS, SIZE_OVERRIDES, SOURCES  # noqa: E402,E501

ROOT = Path(__file__).resolve().parents[1]
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


def child_main(name: str, mode: str, size: int, out: str | None, threads: int = 1, source: str = "timm") -> int:
    """``--one NAME``: run one model in this process; the record (updated at each stage) goes to ``out``."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    progress = (lambda rec: _write_json(Path(out), rec)) if out else None
    rec = RUNNERS[mode](name, size, progress, source)
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


def in_process(name: str, mode: str, size: int, timeout: float, threads: int = 1, source: str = "timm") -> dict:
    """Run one model in this process (``--one-process``; ``timeout`` is not enforced)."""
    import torch

    torch.set_num_threads(threads)
    return {**RUNNERS[mode](name, size, None, source), "core": core_fingerprint()}


def run_isolated(name: str, mode: str, size: int, timeout: float, threads: int = 1, source: str = "timm") -> dict:
    """Run one model in a subprocess (``--one``) with a wall-clock limit; a timeout or crash is recorded with
    the last stage the child reported."""
    with tempfile.TemporaryDirectory(prefix="timm_cov_") as tmp:
        out = Path(tmp) / "rec.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--mode", mode, "--size", str(size),
               "--out", str(out), "--threads", str(threads), "--source", source]
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


def _command(argv: List[str]) -> str:
    script = Path(argv[0]).resolve()
    try:
        script_s = str(script.relative_to(ROOT))
    except ValueError:
        script_s = str(script)
    args, skip = [], False
    for a in argv[1:]:  # --lock FILE only orders this job with other timing jobs: not part of the recipe
        if skip or a.startswith("--lock="):
            skip = False
            continue
        skip = a == "--lock"
        if not skip:
            args.append(shlex.quote(a))
    return " ".join(["python", script_s] + args)


def main(argv: List[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--source", choices=SOURCES, default="timm", help="where the models come from (default timm)")
    p.add_argument("--models", help=f"comma-separated subset (default: the source's full list, {len(MODELS)} timm / "
                   f"{len(MODEL_LISTS['torchvision'])} torchvision models)")
    p.add_argument("--timeout", type=float, default=300, help="SWP wall-clock limit per model, s (default 300)")
    p.add_argument("--tp-timeout", type=float, default=120, help="torch-pruning limit per model, s (default 120)")
    p.add_argument("--size", type=int, default=96, help="input size S (default 96; per-model overrides in SIZES)")
    p.add_argument("--json", help="output JSON (default benchmarks/results/SOURCE_coverage.json)")
    p.add_argument("--md", default=str(DEFAULT_MD), help="markdown file whose SOURCE section is (re)written "
                   "(default docs/coverage.md)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per model process (default 1: robust "
                   "on a shared machine, where OpenMP threads\nof several processes oversubscribe the cores)")
    p.add_argument("--skip-tp", action="store_true", help="do not run the torch-pruning anchor")
    p.add_argument("--resume", action="store_true", help="keep the records already in --json, run the rest")
    p.add_argument("--from-json", action="store_true", help="run nothing: render the markdown from --json again")
    p.add_argument("--lock", metavar="FILE", help="hold an exclusive lock on FILE (flock) while a model runs, so that "
                   "timing jobs of other\nprocesses that take the same lock run between models, not beside them")
    p.add_argument("--one-process", action="store_true", help="run every model in this process, in sequence (no "
                   "time limit): the memory-safety sweep")
    p.add_argument("--one", metavar="NAME", help="run one model in this process (used by the sweep)")
    p.add_argument("--mode", choices=sorted(RUNNERS), default="swp", help="with --one: which pipeline")
    p.add_argument("--out", help="with --one: write the record here (else print it)")
    args = p.parse_args(argv[1:])

    if args.one:
        size = SIZE_OVERRIDES[args.source].get(args.one, args.size)
        return child_main(args.one, args.mode, size, args.out, args.threads, args.source)

    models = MODEL_LISTS[args.source]
    json_path = Path(args.json or ROOT / "benchmarks" / "results" / f"{args.source}_coverage.json")
    names = [n.strip() for n in args.models.split(",") if n.strip()] if args.models else list(models)
    if args.source == "timm":
        import timm

        unknown = [n for n in names if not timm.is_model(n.removesuffix(REPARAM))]
    else:
        unknown = [n for n in names if not torchvision_models.is_model(n)]
    if unknown:
        p.error(f"not {args.source} models: {', '.join(unknown)}")
    if args.from_json:
        saved = json.loads(json_path.read_text())
        write_section(args.md, f"coverage-{args.source}", render_md(saved["records"], saved["meta"]))
        return 0
    meta = {
        "source": args.source,
        "command": _command(argv),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{os.cpu_count()} CPU cores, torch CPU, {args.threads} thread(s) per model process",
        "versions": versions(),
        "timeout": args.timeout,
        "tp_timeout": args.tp_timeout,
    }
    done: Dict[str, dict] = {}
    if args.resume and json_path.exists():
        previous = json.loads(json_path.read_text())
        done = {r["model"]: r for r in previous.get("records", []) if r["model"] in names}
        meta["command"], meta["date"] = previous["meta"]["command"], previous["meta"]["date"]
    records: List[dict] = []
    t0 = time.perf_counter()
    for i, name in enumerate(names, 1):
        if name in done:
            records.append(done[name])
            continue
        size = SIZE_OVERRIDES[args.source].get(name, args.size)
        rec = {"model": name, "family": models.get(name, name.split("_")[0]), "size": size}
        run = in_process if args.one_process else run_isolated
        with held(args.lock):
            rec["swp"] = run(name, "swp", size, args.timeout, args.threads, args.source)
            if args.skip_tp:
                rec["tp"] = {"status": "skipped"}
            else:
                rec["tp"] = run(name, "tp", size, args.tp_timeout, args.threads, args.source)
        records.append(rec)
        _write_json(json_path, {"meta": meta, "records": records})
        s, t = rec["swp"], rec["tp"]
        err = f" rel_err={s['rel_err']:.1e}" if s.get("rel_err") is not None else ""
        why = f" [{s.get('error_type')}: {s.get('error', '')[:100]}]" if s.get("error_type") else ""
        print(f"[{i}/{len(names)} {time.perf_counter() - t0:.0f}s] {name}: SWP {status_text(s)}{err}{why}; "
              f"tp {status_text(t)} ({s.get('wall_process', 0):.0f}s + {t.get('wall_process', 0):.0f}s)", flush=True)
    meta["wall_total_s"] = round(time.perf_counter() - t0, 1)
    _write_json(json_path, {"meta": meta, "records": records})
    md = render_md(records, meta)
    write_section(args.md, f"coverage-{args.source}", md)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

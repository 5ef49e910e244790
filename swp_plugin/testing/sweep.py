"""Many models pruned and fine-tuned a step, one after another, in one process: the per-model routine of the
coverage benchmark (``benchmarks/timm_coverage.py``) and the memory-safety sweep.

    python -m swp_plugin.testing.sweep                       # 40 timm models in this process (MALLOC_CHECK_=3 ...)
    python -m swp_plugin.testing.sweep --models resnet18,dla34 --repeat 3

Per model (:func:`run_swp`): ``timm.create_model(name, num_classes=10)``, a ``StripePruner`` with a random
sparse skeleton (half the stripes, 30% of the filters dead), one regularized training step, BatchNorm
calibration, eval outputs before / after ``step()`` (exact if ``max|diff|/max|y| <= 1e-4``, or within ten times
the model's own float32 rounding where that is larger: :func:`exactness_tolerance`), then one
fine-tuning step of the pruned model (train-mode forward, backward, SGD step) and an eval forward. Running
many models in one process is the point: heap damage done by one shows in a later one, where a process per
model would hide it. :func:`run_tp` is the benchmark's anchor, torch-pruning's own channel pruner. Both take a
``source``: ``timm`` (:data:`MODELS`) or ``torchvision`` (:mod:`.torchvision_models`: dict and tuple outputs, the
layers producing the outputs ignored, the loss summed and the exactness checked over every output).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections import Counter
from typing import Callable, Dict, List

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from timm.utils.model import reparameterize_model

from ..layers.config import use_backend
from ..layers.stripe_conv import StripeConv2d
from ..measure import count_ops_and_params
from ..pruning import StripePruner
from ..utils import flat_outputs, probe_inputs, run_with_hooks
from . import torchvision_models
from .exactness import calibrate_bn, randomize_skeletons, regularized_step, rel_err
from .rounding import float32_rounding, layer_errors, markdown, stripe_forms
from .timm_models import FLOAT64, MODELS, REPARAM, SIZES

#: max|diff| / max|y| of the logits that counts as exact, at least (see :func:`exactness_tolerance`)
TOLERANCE = 1e-4
#: a float32 model is exact within this many times its own float32 rounding (two float32 forwards that sum in
#: different orders, each about that far from float64, differ by a few times it; a defect is not bounded by it)
ROUNDING_FACTOR = 10.0

NUM_CLASSES = 10
#: the model lists and per-model input sizes by source
SOURCES = ("timm", "torchvision")
MODEL_LISTS: Dict[str, Dict[str, str]] = {"timm": MODELS, "torchvision": torchvision_models.MODELS}
SIZE_OVERRIDES: Dict[str, Dict[str, int]] = {"timm": SIZES, "torchvision": torchvision_models.SIZES}


def channel_counts(model: nn.Module) -> Dict[str, int]:
    """Total BatchNorm ``num_features`` and total conv output channels (dense and stripe convs)."""
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


def make_model(name: str, size: int, source: str = "timm"):
    """``(model in eval mode, input (4, 3, size, size))`` for a timm name (``@reparam``: reparameterised) or a
    torchvision one."""
    if source == "torchvision":
        return torchvision_models.make_model(name, size, NUM_CLASSES)
    torch.manual_seed(0)
    model = timm.create_model(name.removesuffix(REPARAM), pretrained=False, num_classes=NUM_CLASSES)
    if name.endswith(REPARAM):  # the deploy form of a reparameterisable net
        model = reparameterize_model(model.eval())
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    if name in FLOAT64:
        model, x = model.double(), x.double()
    return model.eval(), x


def output_layers(model: nn.Module, source: str = "timm") -> List[nn.Module]:
    """The layers that produce the outputs, ignored by both pruners: timm's classifier, or
    :func:`.torchvision_models.output_layers`."""
    return [model.get_classifier()] if source == "timm" else torchvision_models.output_layers(model, NUM_CLASSES)


def model_loss(y, n: int) -> torch.Tensor:
    """Cross-entropy summed over the outputs (tensor, tuple or dict): logits ``(n, classes)`` or per-pixel
    maps ``(n, classes, H, W)``, labels ``arange(n) % classes``."""
    target = torch.arange(n) % NUM_CLASSES
    return sum(F.cross_entropy(o, target.view(-1, *[1] * (o.dim() - 2)).expand(n, *o.shape[2:]))
               for o in flat_outputs(y))


def stripe_macs_share(model: nn.Module, layers: List[nn.Module], x: torch.Tensor, macs: float) -> Dict[str, float]:
    """Share of the model's MACs (``macs`` per image) in the ``layers`` (skeleton convs) with ``groups=1``
    (what stripe pruning removes), and in those with a kernel larger than 1x1 (where a stripe is finer than a
    filter)."""
    found = {"g1": 0.0, "kxk": 0.0}

    def hook(conv, inputs, output) -> None:
        if getattr(conv, "groups", 1) == 1:
            kh, kw = conv.kernel_size
            m = output[0].numel() * conv.in_channels * kh * kw
            found["g1"] += m
            found["kxk"] += m if kh * kw > 1 else 0

    run_with_hooks(model, layers, hook, x[:1])
    return {"macs_share_g1": found["g1"] / macs, "macs_share_kxk": found["kxk"] / macs}


class Stages:
    """The stage clock of one record: ``stage(name)`` closes the running stage's time in ``rec['stage_s']``,
    starts ``name`` and reports ``rec`` to ``progress``; ``close()`` ends the last one."""

    def __init__(self, rec: dict, progress: Callable[[dict], None] | None) -> None:
        self.rec, self.progress, self.start = rec, progress, time.perf_counter()
        self._t = self.start

    def __call__(self, name: str | None) -> None:
        now = time.perf_counter()
        if self.rec.get("stage"):
            self.rec.setdefault("stage_s", {})[self.rec["stage"]] = round(now - self._t, 3)
        self._t = now
        self.rec["stage"] = name
        if self.progress is not None and name is not None:
            self.progress(self.rec)

    def close(self) -> dict:
        failed = self.rec.get("stage")  # None after a run that finished; the stage that raised otherwise
        self(None)
        self.rec["stage"] = failed
        self.rec["wall"] = time.perf_counter() - self.start
        return self.rec


def prepare(name: str, size: int = 96, source: str = "timm", stage: Callable[[str], None] = lambda s: None,
            rec: dict | None = None):
    """The protocol up to ``step()``: ``(model, x, pruner)`` with a random sparse skeleton, one regularized step
    and calibrated BatchNorm (eval mode). ``stage(name)`` is called as each stage starts; ``rec`` gets the counts
    and the pruner's figures."""
    rec = {} if rec is None else rec
    stage("create")
    model, x = make_model(name, size, source)
    stage("count_before")
    macs, params = count_ops_and_params(model, x[:1])
    rec.update(macs_before=float(macs), params_before=int(params))
    rec.update({k + "_before": v for k, v in channel_counts(model).items()})

    stage("pruner")
    t = time.perf_counter()
    pruner = StripePruner(model, x[:1], sr=1e-4, threshold=0.05, ignored_layers=output_layers(model, source))
    rec["t_pruner"] = time.perf_counter() - t
    rec["skeletons"] = len(pruner.skeletons)
    rec["skipped"] = len(pruner.skipped)
    rec["skipped_reasons"] = dict(Counter(str(r)[:160] for r in pruner.skipped.values()).most_common(5))
    modules = dict(model.named_modules())
    rec.update(stripe_macs_share(model, [modules[n] for n in pruner.skeletons], x, rec["macs_before"]))

    stage("skeleton")
    randomize_skeletons(pruner, dead_stripes=0.5, dead_filters=0.3)
    stage("regularize")
    regularized_step(model, pruner, x, loss_fn=model_loss)
    stage("calibrate")
    calibrate_bn(model, x)
    return model, x, pruner


def exactness_tolerance(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """``(tolerance, rounding)``: the model's own float32 rounding (:func:`float32_rounding` on ``x`` and on
    ``step()``'s probes, the worst) and the tolerance of the exactness checks, ``max(TOLERANCE, ROUNDING_FACTOR *
    rounding)``. A model that is not float32 has no float32 rounding to measure: ``(TOLERANCE, 0.0)``."""
    if next(model.parameters()).dtype != torch.float32:
        return TOLERANCE, 0.0
    rounding = max(float32_rounding(model, inputs) for inputs in [x, *probe_inputs(x[:1])])
    return max(TOLERANCE, ROUNDING_FACTOR * rounding), rounding


def run_swp(name: str, size: int = 96, progress: Callable[[dict], None] | None = None, source: str = "timm") -> dict:
    """The SWP pipeline on one model, in this process. Returns the record; never raises (errors are recorded
    with the stage they happened in). ``progress(record)`` is called when each stage starts."""
    rec: dict = {"status": "running", "stage": None}
    stage = Stages(rec, progress)
    try:
        model, x, pruner = prepare(name, size, source, stage, rec)
        stage("rounding")
        try:
            tolerance, rec["float32_rounding"] = exactness_tolerance(model, x)
        except Exception as err:  # no float64 copy of this model: the floor alone, and why
            tolerance, rec["float32_rounding"], rec["rounding_error"] = TOLERANCE, 0.0, error_info(err)["error"]
        rec["tolerance"] = tolerance
        if rec["float32_rounding"]:  # a float32 model: step() checks with the same rule
            pruner.tolerance = tolerance
        with torch.no_grad():
            y0 = model(x)

        stage("step")
        t = time.perf_counter()
        try:
            pruner.step()
        finally:
            rec["t_step"] = time.perf_counter() - t
            rec["notes"] = len(pruner.notes)
            rec["notes_sample"] = [str(n)[:200] for n in pruner.notes[:3]]
            _measure_after(rec, model, x, y0)

        stage("count_after")
        macs, params = count_ops_and_params(model, x[:1])
        rec.update(macs_after=float(macs), params_after=int(params))
        rec["stripe_convs"] = sum(isinstance(m, StripeConv2d) for m in model.modules())

        stage("finetune")
        _finetune_step(rec, model, x)
        stage(None)
        rec["status"] = "exact" if rec["rel_err"] <= tolerance else "inexact"
    except Exception as err:  # recorded, the sweep goes on
        rec["status"] = "error"
        rec.update(error_info(err))
    return stage.close()


def _measure_after(rec: dict, model: nn.Module, x: torch.Tensor, y0) -> None:
    """Outputs after ``step()`` (also after a failed one: the model may have been changed), channels; the error
    is the worst over the outputs (dict, tuple)."""
    try:
        model.eval()
        with torch.no_grad():
            before, after = flat_outputs(y0), flat_outputs(model(x))
        shapes = [tuple(t.shape) for t in before], [tuple(t.shape) for t in after]
        if shapes[0] != shapes[1]:
            raise RuntimeError(f"output shapes {shapes[0]} became {shapes[1]}")
        rec["rel_err"] = max(rel_err(a, b) for a, b in zip(before, after))
    except Exception as err:
        rec["after_forward_error"] = f"{type(err).__name__}: {str(err).strip()[:200]}"
    counts = channel_counts(model)
    rec.update({k + "_after": v for k, v in counts.items()})
    rec["channels_removed"] = any(counts[k] < rec.get(k + "_before", counts[k]) for k in counts)


def _finetune_step(rec: dict, model: nn.Module, x: torch.Tensor) -> None:
    """The first step of fine-tuning the pruned model (train-mode forward, backward, SGD step), then an eval
    forward: gradients and outputs must be finite."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    model.train()
    loss = model_loss(model(x), x.shape[0])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if not any(p.grad is not None for p in params):
        raise RuntimeError("backward gave no gradient to any parameter")
    rec["backward_ok"] = True
    rec["params_without_grad"] = sum(p.grad is None for p in params)  # info: unused branches have none
    rec["grads_finite"] = all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
    optimizer.step()
    model.eval()
    with torch.no_grad():
        rec["finetuned_finite"] = all(bool(torch.isfinite(t).all()) for t in flat_outputs(model(x)))


def run_tp(name: str, size: int = 96, progress: Callable[[dict], None] | None = None, source: str = "timm") -> dict:
    """torch-pruning's own channel pruner (magnitude, ratio 0.3) on a fresh model, then a forward (output shapes
    unchanged); whether the pruned model still runs in train mode is recorded (``train_forward``), not judged."""
    rec: dict = {"status": "running", "stage": None}
    stage = Stages(rec, progress)
    try:
        stage("create")
        model, x = make_model(name, size, source)
        macs, params = count_ops_and_params(model, x[:1])
        rec.update(macs_before=float(macs), params_before=int(params))
        with torch.no_grad():
            shapes = [tuple(t.shape) for t in flat_outputs(model(x))]
        stage("pruner")
        t = time.perf_counter()
        pruner = tp.pruner.BasePruner(model, x[:1], importance=tp.importance.GroupMagnitudeImportance(),
                                      pruning_ratio=0.3, ignored_layers=output_layers(model, source))
        rec["t_pruner"] = time.perf_counter() - t
        stage("step")
        t = time.perf_counter()
        pruner.step()
        rec["t_step"] = time.perf_counter() - t
        stage("forward")
        with torch.no_grad():
            after = [tuple(t.shape) for t in flat_outputs(model(x))]
        if after != shapes:
            raise RuntimeError(f"output shapes {shapes} became {after} after pruning")
        try:
            model.train()
            model(x)
            rec["train_forward"] = "ok"
        except Exception as err: # information only
            rec["train_forward"] = f"{type(err).__name__}: {str(err).strip()[:200]}"
        model.eval()
        stage("count_after")
        macs, params = count_ops_and_params(model, x[:1])
        rec.update(macs_after=float(macs), params_after=int(params))
        stage(None)
        rec["status"] = "ok"
    except Exception as err:
        rec["status"] = "error"
        rec.update(error_info(err))
    return stage.close()


RUNNERS = {"swp": run_swp, "tp": run_tp}

#: the default of the one-process sweep: 40 models of the coverage list, fast ones first
SWEEP = [n for n in MODELS if n not in {"gcresnet33ts", "mobilenetv4_hybrid_medium", "inception_v4", "tresnet_m",
                                         "resnext50_32x4d", "dm_nfnet_f0", "xception41", "cspdarknet53",
                                         "lambda_resnet26t", "hrnet_w18_small", "vovnet39a", "hgnet_tiny"}][:40]


def unpruned_rounding(name: str, size: int) -> float:
    """:func:`float32_rounding` of the fresh, unpruned model after the sweep's BatchNorm calibration."""
    model, x = make_model(name, size)
    calibrate_bn(model, x)
    return float32_rounding(model, x)


def per_layer_report(name: str, size: int) -> str:
    """The sweep's pruned model (``step()`` run under the ``dense`` backend, so that it always completes), layer by
    layer in float32 against float64 (:func:`.rounding.layer_errors`), after what the exactness check sees: each
    form's logits against the float32 logits before ``step()``, and the model's own float32 rounding there."""
    model, x, pruner = prepare(name, size)
    tolerance, rounding = exactness_tolerance(model, x)
    with torch.no_grad():
        y0 = model(x)
    with use_backend("dense"):
        pruner.step()
    forms = stripe_forms()
    checked = []
    for form in forms:
        with torch.no_grad(), use_backend(form):
            checked.append(f"{form} {rel_err(y0, model(x)):.1e}")
    logits, rows = layer_errors(model, x, forms)
    return "\n".join([f"{name} at {size}x{size}: float32 rounding before step() {rounding:.1e} (tolerance "
                      f"{tolerance:.1e}); after step(), against the float32 logits before it: {', '.join(checked)}",
                      "", markdown(logits, rows)])


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(SWEEP), help="comma-separated timm names (default: 40)")
    parser.add_argument("--repeat", type=int, default=1, help="run the whole list this many times")
    parser.add_argument("--size", type=int, default=64, help="input size (default 64)")
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--float64", action="store_true", help="run the models in float64 (rounding or defect?)")
    parser.add_argument("--rounding", action="store_true", help="only print each unpruned model's float32 error")
    parser.add_argument("--per-layer", action="store_true", help="only print each pruned model's float32 error "
                        "against float64, layer by layer, per stripe form (swp_plugin.testing.rounding)")
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    if args.rounding:
        for name in names:
            print(f"{name}: unpruned float32 vs float64 {unpruned_rounding(name, SIZES.get(name, args.size)):.1e}")
        return 0
    if args.per_layer:
        for name in names:
            print(per_layer_report(name, SIZES.get(name, args.size)) + "\n")
        return 0
    if args.float64:
        FLOAT64.update(names)
    records, bad = [], 0
    start = time.time()
    for round_ in range(args.repeat):
        for name in names:
            rec = {"model": name, "round": round_, **run_swp(name, SIZES.get(name, args.size))}
            records.append(rec)
            ok = rec["status"] == "exact" and rec.get("grads_finite") and rec.get("finetuned_finite")
            bad += not ok
            print(f"[{time.time() - start:6.0f}s] {name}: {rec['status']}"
                  + (f" rel_err {rec['rel_err']:.1e}" if "rel_err" in rec else "")
                  + ("" if ok else f" FAILED {rec.get('error_type', '')}: {rec.get('error', '')[:200]}"), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=1, default=str)
    print(f"{'ok' if not bad else 'FAILED'}: {len(records)} runs, {bad} failed, {time.time() - start:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

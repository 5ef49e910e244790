"""The timm model contract of a stripe-pruned model, model by model (``tests/test_timm_contract.py``).

    python -m swp_plugin.testing.contract --models resnet18,mobilenetv3_small_050 --size 64

Per model: ``timm.create_model(name, num_classes=10, scriptable=True)`` (``@reparam``: reparameterised), a
``StripePruner`` with a random sparse skeleton, a ``timm.utils.ModelEmaV3`` taken after it and a deep copy, one
regularized step (BatchNorm statistics as initialised: calibrated ones on a random net leave float32 exact but
make it too ill-conditioned for a bf16 comparison), then :func:`swp_plugin.interop.step_with_ema`, and the checks
below, each recorded as ``'ok'`` or the error (``max|diff| / max|y|`` against the eager outputs must stay <= 1e-4):

* ``counts``: ``tp.utils.count_ops_and_params`` MACs equal ``swp_plugin.count_ops_and_params`` (fresh, attached,
  pruned, deployed); params equal its ``include_indexes=False`` figure;
* ``copy``: the deep copy taken with skeletons attached still runs after ``step()`` (and detaches on its own);
* ``ema``: the EMA has the pruned structure and keeps averaging (``update`` = lerp towards the model);
* ``script``: ``torch.jit.script`` of the pruned model; ``fx``: plain ``torch.fx.symbolic_trace``;
* ``tp_state_dict``: ``tp.state_dict`` / ``tp.load_state_dict`` into a fresh model;
* ``reset_classifier``: ``reset_classifier(5)`` after channel removal, then a forward;
* ``deploy_script``: ``torch.jit.freeze(torch.jit.script(swp_plugin.deploy(...)))``;
* ``autocast``: the deployed model under CPU bf16 autocast: within :data:`AUTOCAST_TOLERANCE` of float32.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Callable, Dict, List

import timm
import torch
import torch.nn as nn
import torch_pruning as tp
from timm.utils import ModelEmaV3
from timm.utils.model import reparameterize_model

from ..deployment import deploy
from ..interop import step_with_ema
from ..measure import count_ops_and_params
from ..pruning import StripePruner
from ..skeleton import detach_skeletons
from .exactness import randomize_skeletons, regularized_step, rel_err
from .timm_models import REPARAM

TOLERANCE = 1e-4
#: bf16 autocast against float32, ``max|diff| / max|y|`` (bf16 keeps 8 bits; the fresh models reach ~0.3%)
AUTOCAST_TOLERANCE = 0.05
CHECKS = ("counts", "copy", "ema", "script", "fx", "tp_state_dict", "reset_classifier", "deploy_script", "autocast")


def _create(name: str) -> nn.Module:
    model = timm.create_model(name.removesuffix(REPARAM), pretrained=False, num_classes=10, scriptable=True)
    return reparameterize_model(model.eval()) if name.endswith(REPARAM) else model.eval()


def _counts_agree(model: nn.Module, x: torch.Tensor) -> str | None:
    theirs = tp.utils.count_ops_and_params(model, x)
    ours = count_ops_and_params(model, x, include_indexes=False)
    return None if tuple(theirs) == tuple(ours) else f"tp {tuple(theirs)} != swp_plugin {tuple(ours)}"


def _same(fn: Callable, y: torch.Tensor, tolerance: float = TOLERANCE) -> str:
    with torch.no_grad():
        out = fn()
    err = rel_err(out.float(), y)
    return "ok" if err <= tolerance else f"max|diff|/max|y| = {err:.2e}"


def _check(rec: Dict[str, str], name: str, fn: Callable[[], str]) -> None:
    try:
        rec[name] = fn()
    except Exception as err:  # recorded: the contract is a table of what works
        rec[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def run_contract(name: str, size: int = 64, checks=CHECKS) -> Dict[str, str]:
    """The contract checks on timm model ``name`` at ``size`` x ``size`` (see the module docstring)."""
    torch.manual_seed(0)
    model = _create(name)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    counts: List[str] = [e for e in [_counts_agree(model, x[:1])] if e]
    pruner = StripePruner(model, x[:1], ignored_layers=[model.get_classifier()])
    counts += [e for e in [_counts_agree(model, x[:1])] if e]
    ema, twin = ModelEmaV3(model, decay=0.5), copy.deepcopy(model)
    randomize_skeletons(pruner, dead_stripes=0.5, dead_filters=0.3)
    regularized_step(model, pruner, x)
    ema.update(model)
    step_with_ema(pruner, ema)
    model.eval()
    with torch.no_grad():
        y = model(x)
    counts += [e for e in [_counts_agree(model, x[:1])] if e]
    rec: Dict[str, str] = {}
    if "copy" in checks:
        _check(rec, "copy", lambda: "ok" if twin.eval()(x).shape == y.shape and detach_skeletons(twin) else "no-op")
    if "ema" in checks:
        _check(rec, "ema", lambda: _ema_averages(ema, model))
    if "script" in checks:
        _check(rec, "script", lambda: _same(lambda: torch.jit.script(model)(x), y))
    if "fx" in checks:
        _check(rec, "fx", lambda: _same(lambda: torch.fx.symbolic_trace(model)(x), y))
    if "tp_state_dict" in checks:
        _check(rec, "tp_state_dict", lambda: _same(lambda: tp.load_state_dict(_create(name), state_dict=tp.state_dict(
            model)).eval()(x), y))
    if "reset_classifier" in checks:
        _check(rec, "reset_classifier", lambda: _reset_classifier(copy.deepcopy(model), x))
    if {"deploy_script", "autocast", "counts"} & set(checks):
        deployed = deploy(model, x[:1])
        counts += [e for e in [_counts_agree(deployed, x[:1])] if e]
        if "deploy_script" in checks:
            _check(rec, "deploy_script", lambda: _same(lambda: torch.jit.freeze(torch.jit.script(deployed))(x), y))
        if "autocast" in checks:
            _check(rec, "autocast", lambda: _autocast(deployed, x, y))
    if "counts" in checks:
        rec["counts"] = "ok" if not counts else "; ".join(counts)
    return rec


def _ema_averages(ema: ModelEmaV3, model: nn.Module) -> str:
    before = [t.clone() for t in ema.module.state_dict().values()]
    ema.update(model)
    for b, a, m in zip(before, ema.module.state_dict().values(), model.state_dict().values(), strict=True):
        expected = torch.lerp(b, m, 0.5) if b.is_floating_point() else m
        if a.shape != m.shape or not torch.allclose(a, expected, rtol=1e-5, atol=1e-6):
            return "the EMA did not average towards the model"
    return "ok"


def _reset_classifier(model: nn.Module, x: torch.Tensor) -> str:
    model.reset_classifier(5)
    with torch.no_grad():
        shape = tuple(model.eval()(x).shape)
    return "ok" if shape == (x.shape[0], 5) else f"output shape {shape}"


def _autocast(deployed: nn.Module, x: torch.Tensor, y: torch.Tensor) -> str:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return _same(lambda: deployed(x), y, AUTOCAST_TOLERANCE)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="comma-separated timm names")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    for name in args.models.split(","):
        try:
            rec = run_contract(name, args.size)
        except Exception as err:  # the setup itself failed: one line, the sweep goes on
            rec = {"setup": f"{type(err).__name__}: {str(err)[:200]}"}
        print(json.dumps({"model": name, **rec}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The timm model contract of a stripe-pruned model, model by model (``tests/test_timm_contract.py``).

    python -m swp_plugin.testing.contract --models resnet18,mobilenetv3_small_050 --size 64

Per model: ``timm.create_model(name, num_classes=10, scriptable=True)`` (``@reparam``: reparameterised), a
``StripePruner`` with a random sparse skeleton (zero-initialised BatchNorm weights set to 1 first, as a net whose
filters die has none: :func:`.exactness.unzero_norm_weights`; ``--zero-init-norms`` keeps them, which makes the
set-up fail on repvit_m0_9), a ``timm.utils.ModelEmaV3`` taken after it and a deep copy, one
regularized step (BatchNorm statistics not calibrated: calibrated ones on a random net leave float32 exact but
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

:data:`LIMITATIONS` lists the checks that fail on a family with or without pruning (timm's or torch-pruning's
code, not the plug-in's), with the reason.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Dict, List, Tuple

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
from .exactness import randomize_skeletons, regularized_step, rel_err, unzero_norm_weights
from .timm_models import REPARAM

TOLERANCE = 1e-4
#: bf16 autocast against float32, ``max|diff| / max|y|`` (bf16 keeps 8 bits; the fresh models reach ~0.3%)
AUTOCAST_TOLERANCE = 0.05
CHECKS = ("counts", "copy", "ema", "script", "fx", "tp_state_dict", "reset_classifier", "deploy_script", "autocast")


@dataclass(frozen=True)
class Limitation:
    """A check that fails on ``models`` with or without pruning (timm's own unpruned model fails it the same way:
    :func:`plain_failure`), so it is not the plug-in's to fix; ``reason`` says why."""

    check: str
    models: Tuple[str, ...]
    reason: str


#: what fails on the sweep's timm families for a reason outside the plug-in (README, "Inside a torch-pruning /
#: timm pipeline"; ``tests/test_timm_contract.py`` fails when one of them starts to pass)
LIMITATIONS: Tuple[Limitation, ...] = (
    Limitation("tp_state_dict", ("cspresnet50", "darknet17", "dpn48b", "ese_vovnet19b_dw", "fastvit_t8", "gernet_s",
                                 "inception_v3", "lambda_resnet26t", "mobilenetv4_conv_small_035", "mobileone_s0",
                                 "mobilevit_xxs", "regnetx_002", "regnetz_005", "repvgg_a0", "resnext26ts",
                                 "rexnet_100", "skresnet18", "tresnet_m", "xception41"),
               "tp.load_state_dict sets every public attribute tp.state_dict saved, and timm's ConvNormAct has a "
               "read-only in_channels property (AttributeError)"),
    Limitation("fx", ("efficientvit_b0",), "timm's LiteMLA branches on a traced tensor's device "
                                           "(efficientvit_mit.py: `v.device.type != 'meta'`)"),
    Limitation("fx", ("mobilevit_xxs",), "timm's MobileVitBlock branches on the traced input size "
                                         "(mobilevit.py: `if new_h != H or new_w != W`)"),
    Limitation("fx", ("vgg11_bn",), "timm's ConvMlp branches on the traced input size "
                                    "(vgg.py: `if x.shape[-2] < self.input_kernel_size ...`)"),
    Limitation("script", ("hrnet_w18_small",), "torch.jit.script cannot type timm's HRNet, which passes lists of "
                                               "tensors between its stages"),
    Limitation("script", ("selecsls42b",), "torch.jit.script cannot type timm's SelecSls blocks (torch.cat of a "
                                           "value it infers as one Tensor)"),
    Limitation("setup", ("inception_v3",), "one SGD step (lr 0.01) of the random-init net makes its eval outputs "
                                           "NaN, unpruned too, so step() refuses (ValueError: NaN/Inf outputs)"),
)

#: families whose contract fails for a reason not settled yet (tests/test_timm_contract.py: strict xfail)
OPEN: Dict[str, str] = {}


def expected_failures(name: str) -> Dict[str, str]:
    """``{check: reason}`` of the :data:`LIMITATIONS` of timm model ``name``."""
    return {lim.check: lim.reason for lim in LIMITATIONS if name in lim.models}


def plain_failure(name: str, check: str, size: int = 64) -> str | None:
    """``check`` (``fx``, ``script``, ``tp_state_dict`` or ``setup``: one SGD step as the contract's, then an eval
    forward that must be finite) on timm's fresh, unpruned model ``name``: the error (``Type: first line``), or
    ``None`` when it works."""
    model = create_model(name)
    runs: Dict[str, Callable[[], object]] = {
        "fx": lambda: torch.fx.symbolic_trace(model),
        "script": lambda: torch.jit.script(model),
        "tp_state_dict": lambda: tp.load_state_dict(create_model(name), state_dict=tp.state_dict(model)),
        "setup": lambda: _finite_after_a_step(model, contract_input(size)),
    }
    try:
        runs[check]()
    except Exception as err:
        return _error(err)
    return None


def contract_input(size: int) -> torch.Tensor:
    """The contract's fixed input batch, ``(2, 3, size, size)``."""
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def _finite_after_a_step(model: nn.Module, x: torch.Tensor) -> None:
    """One step of :func:`.exactness.regularized_step` without skeletons; ``ValueError`` if the eval outputs are
    then not finite."""
    regularized_step(model, SimpleNamespace(regularize=lambda m: None), x)
    with torch.no_grad():
        if not torch.isfinite(model.eval()(x)).all():
            raise ValueError("the model's outputs hold NaN/Inf after one SGD step")


def _error(err: BaseException) -> str:
    """``Type: the message's first non-empty line`` (200 characters at most)."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def create_model(name: str) -> nn.Module:
    """timm model ``name`` in eval mode (``@reparam``: reparameterised)."""
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
        rec[name] = _error(err)


def run_contract(name: str, size: int = 64, checks=CHECKS, zero_init_norms: bool = False) -> Dict[str, str]:
    """The contract checks on timm model ``name`` at ``size`` x ``size`` (see the module docstring);
    ``zero_init_norms`` keeps timm's zero-initialised BatchNorm weights under the random skeleton."""
    torch.manual_seed(0)
    model = create_model(name)
    x = contract_input(size)
    counts: List[str] = [e for e in [_counts_agree(model, x[:1])] if e]
    pruner = StripePruner(model, x[:1], ignored_layers=[model.get_classifier()])
    counts += [e for e in [_counts_agree(model, x[:1])] if e]
    if not zero_init_norms:
        unzero_norm_weights(model)
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
        _check(rec, "tp_state_dict", lambda: _same(
            lambda: tp.load_state_dict(create_model(name), state_dict=tp.state_dict(model)).eval()(x), y))
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
    parser.add_argument("--zero-init-norms", action="store_true",
                        help="keep timm's zero-initialised BatchNorm weights (the set-up then fails on repvit_m0_9)")
    args = parser.parse_args(argv)
    for name in args.models.split(","):
        try:
            rec = run_contract(name, args.size, zero_init_norms=args.zero_init_norms)
        except Exception as err:  # the setup itself failed: one line, the sweep goes on
            rec = {"setup": f"{type(err).__name__}: {str(err)[:200]}"}
        print(json.dumps({"model": name, **rec}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``deploy(model, example_inputs)``: a pruned (or plain) model fixed for fast CPU inference, same function.

The last phase of the lifecycle (attach -> train -> merge -> remove channels -> convert -> **deploy**), in the
spirit of ``torch.ao``'s ``convert``: a new model is returned, the input model is not changed.

1. The model is traced with ``torch.fx`` (:mod:`.graph`); BatchNorms are folded into the convolution before
   them. Models ``torch.fx`` cannot trace keep their structure, and their ``conv -> BatchNorm`` pairs are found
   in torch-pruning's DependencyGraph instead (no epilogue fusion then).
2. For each ``StripeConv2d`` (and, with ``dense_convs=True``, each plain ``groups=1`` convolution) the
   implementation is measured once on the layer's input for the example's shape and this thread count: the
   compiled stripe kernel (:class:`.DeployedStripeConv2d`; on CUDA the Triton kernel, :class:`.TritonStripeConv2d`,
   in the model's dtype) or PyTorch's dense convolution (``nn.Conv2d``: cuDNN on CUDA).
   The kernel must win by :data:`MARGIN`; layers faster than :data:`SMALL_LAYER_S` are timed inside TorchScript,
   as the deployed model runs them (Python's call overhead would decide otherwise).
3. ReLUs and residual adds after a kernel layer move into its epilogue (shapes propagated on fake tensors);
   ``nn.MaxPool2d`` becomes :class:`~swp_plugin.layers.pooling.SeparableMaxPool2d` (same function, faster).
4. The deployed model's outputs are compared with the original's on the example and on a random batch of the
   same shape (``max|diff|/max|y| <= tolerance``), as ``StripePruner.step()`` does; a mismatch raises.
5. Where a layer runs on the kernel, the traced model gets a TorchScript twin (:mod:`.forward`): plain
   inference calls run without Python between layers (what ``torch.jit.script`` + ``freeze`` gave by hand), and
   step 4 checks that form too.

``deployed.deploy_report`` says what was folded, chosen (with the times), fused and what runs the forward.
Steps 1, 3 and 5 with recorded choices instead of step 2: :func:`swp_plugin.deployment.rebuild.rebuild` (no timing,
no data).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils import parametrize

from ..layers.deployed import DeployedStripeConv2d
from ..layers.deployed_triton import TritonStripeConv2d
from ..layers.kernels import cpu as cpu_kernel
from ..layers.kernels import triton_stripe
from ..layers.padding import PLAIN_CONVS
from ..layers.pooling import fast_max_pool
from ..layers.stripe_conv import StripeConv2d
from ..layers.structure import describe
from ..pruning.graph import build_graph, norm_after
from ..utils import fastest, fastest_in_script, flat_outputs, probe_inputs, run_model, swap_module, synchronized
from .forward import attach_twin, detach_twin
from .graph import FOLDABLE, fold_batchnorms, fold_into, foldable_norm, fuse_epilogues, planned_epilogues, trace

#: the kernel replaces PyTorch's dense convolution only if it is at least this much faster
MARGIN = 0.97
#: on CPU, a layer faster than this (seconds, timed from Python) is timed again inside TorchScript: Python's
#: call overhead would otherwise decide the choice
SMALL_LAYER_S = 5e-4
#: default ``max|diff| / max|y|`` of the final check, by dtype
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


@dataclass
class DeployReport:
    """What :func:`deploy` did: ``folded`` (conv, norm) pairs, per-layer ``choices`` (name, implementation,
    times in ms), ``fused`` epilogues, ``pools`` (max pools made separable), ``threads``, ``traced`` (torch.fx),
    ``notes`` and ``forward``: what runs a plain inference call (``'frozen'`` / ``'scripted'``: the TorchScript
    twin, :mod:`.forward`; else ``'eager (why)'``)."""

    threads: int
    traced: bool = False
    folded: List[tuple] = field(default_factory=list)
    choices: List[Dict] = field(default_factory=list)
    fused: List[str] = field(default_factory=list)
    pools: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    forward: str = "eager"

    def summary(self) -> str:
        kernel = sum(c["impl"] == "kernel" for c in self.choices)
        return (f"{len(self.folded)} BatchNorms folded, {kernel}/{len(self.choices)} convs on the stripe kernel, "
                f"{len(self.fused)} epilogues fused ({self.threads} threads"
                f"{', torch.fx' if self.traced else ', no torch.fx trace'}; forward: {self.forward})")


def deploy(model: nn.Module, example_inputs, threads: int | None = None, dense_convs: bool = True,
           fuse: bool = True, verify: bool = True, tolerance: float | None = None,
           choices: Dict[str, str] | None = None, torchscript: bool = True) -> nn.Module:
    """Return a copy of ``model`` fixed for inference on this machine (see the module docstring).

    Args:
        model: a model after ``StripePruner.step()`` (or any CNN); Filter Skeletons must not be attached.
        example_inputs: a batch of the shape inference will see (tensor, tuple of args or dict of kwargs).
        threads: torch threads the choice is made for (default: the current setting).
        dense_convs: also consider the stripe kernel for plain ``groups=1`` convolutions (all stripes kept).
        fuse: fold BatchNorms and fuse ReLU / residual adds into kernel layers.
        verify: compare outputs with ``model``'s; ``tolerance`` defaults to 1e-4 (float32).
        choices: layer name -> ``'kernel'`` / ``'dense'`` instead of measuring (``swp_plugin.load`` rebuilds a
            saved deployed model from its recorded choices without deploying again: :mod:`.rebuild`).
        torchscript: plain inference calls of the returned model run its TorchScript twin (no Python between
            layers; :mod:`.forward`), where the model traces and scripts; ``False``: the eager forward only.
    """
    _check_deployable(model)
    for i, arg in enumerate(_as_args(example_inputs)):
        if not isinstance(arg, torch.Tensor):
            raise TypeError(f"deploy(): example input {i} is a {type(arg).__name__}, not a tensor: pass a batch of "
                            "the shape inference will see (a tensor, or a tuple of tensors), e.g. "
                            "torch.randn(1, 3, 224, 224)")
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _deploy(model, example_inputs, dense_convs, fuse, verify, tolerance, choices, torchscript)
    finally:
        torch.set_num_threads(previous)


def _deploy(model, example_inputs, dense_convs, fuse, verify, tolerance, choices, torchscript) -> nn.Module:
    shapes = [[list(t.shape), str(t.dtype).removeprefix("torch.")] for t in _as_args(example_inputs)]
    was_training = model.training
    probes = probe_inputs(example_inputs)
    with torch.no_grad():
        reference = [flat_outputs(run_model(model.eval(), p)) for p in probes]
    model.train(was_training)
    deployed, report = _passes(model, example_inputs, shapes, dense_convs, fuse, choices)
    tol = None
    if verify:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        tol = tolerance or TOLERANCE.get(dtype, 1e-2)
        _verify(deployed, probes, reference, tol)  # the eager forward
    _finish_deploy(deployed, report, model, shapes, dense_convs, fuse, torchscript)
    if verify and not report.forward.startswith("eager"):
        try:
            _verify(deployed, probes, reference, tol)  # the TorchScript twin
        except RuntimeError:
            detach_twin(deployed)
            raise
    return deployed


def _passes(model: nn.Module, example_inputs, shapes, dense_convs: bool, fuse: bool,
            choices: Dict[str, str] | None) -> Tuple[nn.Module, DeployReport]:
    """Trace, fold, choose (measured on ``example_inputs``, or from ``choices``), fuse: a new deployed model."""
    report = DeployReport(threads=torch.get_num_threads())
    deployed: nn.Module = copy.deepcopy(model).eval()
    try:
        deployed = trace(deployed)
        report.traced = True
    except Exception as err:  # any tracing failure: deploy the module tree as it is
        report.notes.append(f"torch.fx could not trace the model ({type(err).__name__}: {str(err)[:160]}); "
                            "BatchNorms folded through the DependencyGraph, no epilogue fusion")
    if fuse and report.traced:
        report.folded = fold_batchnorms(deployed)
    elif fuse:
        report.folded = _fold_without_trace(deployed, example_inputs if example_inputs is not None
                                            else _zeros(shapes))
    _choose_implementations(deployed, example_inputs, dense_convs, report, choices)
    report.pools = swap_max_pools(deployed)
    if fuse and report.traced and any(c["impl"] == "kernel" for c in report.choices):
        with torch.no_grad():
            ShapeProp(deployed, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*_zeros(shapes))
        report.fused = fuse_epilogues(deployed)
    return deployed, report


def _finish_deploy(deployed: nn.Module, report: DeployReport, model: nn.Module, shapes, dense_convs: bool,
                   fuse: bool, torchscript: bool) -> None:
    """The TorchScript twin (where the kernel runs) and what a saved deployed model records."""
    if not torchscript:
        report.forward = "eager (torchscript=False)"
    elif not any(c["impl"] == "kernel" for c in report.choices):
        report.forward = "eager (no layer on the stripe kernel)"
    else:
        form = attach_twin(deployed)
        report.forward = form if not form.startswith("eager") else f"eager ({form[7:]})"
    deployed.deploy_report = report
    deployed.deploy_source = {"structure": describe(model), "dense_convs": dense_convs, "fuse": fuse,
                              "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
                              "example": shapes, "choices": {c["layer"]: c["impl"] for c in report.choices}}


def _zeros(shapes) -> tuple:
    return tuple(torch.zeros(shape, dtype=getattr(torch, dtype)) for shape, dtype in shapes)


def jit_load(path, map_location=None) -> torch.jit.ScriptModule:
    """``torch.jit.load`` of a scripted or traced deployed model: loads the compiled stripe kernel first (its op
    must be registered before TorchScript can resolve it); raises ``RuntimeError`` saying why if it cannot."""
    if not cpu_kernel.available():
        raise RuntimeError(f"the compiled stripe kernel is unavailable here ({cpu_kernel.build_error()}); a "
                           "scripted deployed model needs it. Load the swp_plugin.save file instead (it falls back "
                           "to PyTorch ops) or fix the build")
    return torch.jit.load(path, map_location=map_location)


def _check_deployable(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            raise ValueError(f"'{name or type(model).__name__}' still has parametrizations (Filter Skeletons or "
                             "channel masks?): call pruner.step() (or swp_plugin.detach_skeletons) before deploy()")


def _as_args(example_inputs) -> tuple:
    if isinstance(example_inputs, dict):
        raise ValueError("deploy() with keyword example inputs: pass them as a tuple of positional args")
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _fold_without_trace(model: nn.Module, example_inputs) -> List[tuple]:
    """``conv -> BatchNorm`` pairs from torch-pruning's DependencyGraph; each BatchNorm becomes an Identity."""
    try:
        graph = build_graph(model, example_inputs, {}, timeout=120)
    except Exception:  # no graph: nothing is folded
        return []
    names = {m: n for n, m in model.named_modules()}
    folded = []
    for conv, bn in norm_after(graph).items():
        if type(conv) in FOLDABLE and foldable_norm(bn) and type(bn) in (nn.BatchNorm2d,):
            fold_into(conv, bn)
            swap_module(model, bn, nn.Identity())
            folded.append((names[conv], names[bn]))
    return folded


def _candidates(model: nn.Module, dense_convs: bool) -> Dict[str, nn.Module]:
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, StripeConv2d) or (dense_convs and type(m) in PLAIN_CONVS
                                           and m.groups == 1):
            found[name] = m
    return found


@torch.no_grad()  # not inference mode: the modules made here must be plain tensors
def _choose_implementations(model: nn.Module, example_inputs, dense_convs: bool, report: DeployReport,
                            given: Dict[str, str] | None) -> None:
    """Per candidate layer: measured on its input from ``example_inputs``, or as ``given`` (no forward pass)."""
    layers = _candidates(model, dense_convs)
    inputs = _layer_inputs(model, layers, example_inputs) if given is None else {}
    # the dense conv is timed with the ReLU / residual add the kernel would run in its epilogue
    epilogues = planned_epilogues(model) if given is None and report.traced else {}
    kernel_ok = cpu_kernel.available()
    for name, layer in layers.items():
        stripe = layer if isinstance(layer, StripeConv2d) else StripeConv2d.from_dense(layer)
        dense = layer.to_dense() if isinstance(layer, StripeConv2d) else layer
        x = inputs.get(name)
        # with given choices nothing runs: the weights stand for the input's device and dtype
        kernel, why = _kernel_for(stripe.weight if given is not None else x, stripe, kernel_ok)
        if kernel is None or (given is not None and given.get(name, "dense") == "dense"):
            _swap(model, name, dense)
            report.choices.append({"layer": name, "impl": "dense", **({"why": why} if why else {})})
            continue
        candidate = kernel.from_stripe(stripe)
        choice = {"layer": name, "stripes": stripe.num_stripes,
                  "dense_stripes": stripe.out_channels * stripe.kernel_size[0] * stripe.kernel_size[1]}
        if given is not None:
            choice["impl"] = "kernel"
        else:
            times = time_choice(dense, candidate, x, *epilogues.get(name, (False, False)))
            choice.update(impl="kernel" if times["kernel"] < MARGIN * times["dense"] else "dense",
                          dense_ms=round(1e3 * times["dense"], 4), kernel_ms=round(1e3 * times["kernel"], 4))
        _swap(model, name, candidate if choice["impl"] == "kernel" else dense)
        report.choices.append(choice)


class _DenseWithEpilogue(nn.Module):
    """A dense conv followed by the residual add and / or ReLU a kernel layer would run in its epilogue."""

    def __init__(self, conv: nn.Module, residual: torch.Tensor | None, relu: bool) -> None:
        super().__init__()
        self.conv, self.residual, self.relu = conv, residual, relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.residual is not None:
            y = y + self.residual
        return torch.relu(y) if self.relu else y


def time_choice(dense: nn.Module, kernel: nn.Module, x: torch.Tensor, residual: bool = False,
                relu: bool = False) -> Dict[str, float]:
    """Seconds per call of the two implementations of a layer on its input ``x``, side by side, the dense conv
    with the ``residual`` add and ``relu`` that the kernel would fuse; on CPU a layer faster than
    :data:`SMALL_LAYER_S` is timed again inside TorchScript, as the deployed model's twin runs it."""
    if residual or relu:
        dense = _DenseWithEpilogue(dense, torch.randn_like(dense(x)) if residual else None, relu)
    times = fastest(synchronized({"dense": partial(dense, x), "kernel": partial(kernel, x)}, x.device))
    if x.device.type == "cpu" and min(times.values()) < SMALL_LAYER_S:
        calls = max(4, min(256, int(2e-3 / max(1e-6, min(times.values())))))
        times = fastest_in_script({"dense": dense, "kernel": kernel}, x, calls) or times
    return times


def _layer_inputs(model: nn.Module, layers: Dict[str, nn.Module], example_inputs) -> Dict[str, torch.Tensor]:
    """Each layer's first input when ``model`` runs on ``example_inputs``."""
    inputs: Dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, args, output) -> None:  # returns None: the output stays
            inputs.setdefault(name, args[0])
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    try:
        run_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return inputs


def _kernel_for(x: torch.Tensor | None, stripe: StripeConv2d, kernel_ok: bool) -> Tuple[type | None, str | None]:
    """The kernel layer to measure against the dense conv for input ``x`` (None and why where there is none): on
    CUDA the Triton kernel in the model's dtype, on CPU the compiled kernel (float32)."""
    if x is None:
        return None, "not run"
    if x.device.type == "cuda":
        if not triton_stripe.applies(x) or x.dtype != stripe.weight.dtype:
            return None, triton_stripe.unavailable_reason(x.device) or f"{x.dtype} input, {stripe.weight.dtype} weights"
        return TritonStripeConv2d, None
    if not kernel_ok:
        return None, "no kernel"
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return None, f"{x.dtype} on {x.device.type}"
    return DeployedStripeConv2d, None


def swap_max_pools(model: nn.Module) -> List[str]:
    """Replace every ``nn.MaxPool2d`` of ``model`` that has a separable form (:mod:`swp_plugin.layers.pooling`:
    the same function, several times faster on CPU) in place; returns their names."""
    swapped = []
    for name, module in list(model.named_modules()):
        fast = fast_max_pool(module)
        if fast is not None and name:
            _swap(model, name, fast)
            swapped.append(name)
    return swapped


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    old = model.get_submodule(name)
    if new is not old:
        swap_module(model, old, new)


@torch.no_grad()
def _verify(deployed: nn.Module, probes, reference, tolerance: float) -> None:
    for ref, probe in zip(reference, probes):
        out = flat_outputs(run_model(deployed, probe))
        for r, o in zip(ref, out):
            if r.shape != o.shape:
                raise RuntimeError(f"deploy() changed an output's shape {tuple(r.shape)} -> {tuple(o.shape)}")
            err = float((r - o).abs().max()) / (float(r.abs().max()) or 1.0)
            if not err <= tolerance:
                raise RuntimeError(f"deploy() changed the model's outputs (max|diff|/max|y| = {err:.3g} > "
                                   f"{tolerance:g}); please report the model. deploy(..., fuse=False) may avoid it.")



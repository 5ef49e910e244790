"""The deployed model's forward without Python between layers: a ``torch.fx`` GraphModule with a TorchScript twin.

At batch 1 an eager deployed net pays Python per layer (``nn.Module.__call__``, the generated fx code, each
layer's ``forward``): on ResNet56 at 32x32, more than half of its time. :class:`DeployedGraphModule` is the
``fx.GraphModule`` that :func:`swp_plugin.deploy` returns; :func:`attach_twin` gives it a TorchScript form of
itself (``torch.jit.script``, then ``torch.jit.freeze`` where freezing keeps every weight as the very tensor the
module owns) that a plain inference call runs instead of the Python code. Nothing is copied: the twin reads
the module's own parameters and buffers; after a write to a kernel layer's weight or bias (``load_state_dict``,
``param.data = ...``, ``.to(dtype)`` round trips) the next call packs the layers again and makes the twin again
(freezing pools equal tensors into one, so sharing alone would not carry the write). The module stays the one
owner of the state and an ordinary ``nn.Module``
(``state_dict``, ``repr``, ``swp_plugin.save``, hooks, ``torch.jit.script``, ``torch.compile``, ONNX export).

The eager forward runs instead (same function) whenever the twin could differ from it or cannot run: keyword
arguments, an input that is not a CPU float32 tensor, training mode, forward or backward hooks (on the model,
any module it calls or global), ``torch.compile`` / ``torch.jit`` tracing / ONNX export / ``torch.fx`` tracing in
progress, and once a submodule, parameter or buffer was replaced (found through torch's registration hooks and a
check of the module tree; the twin is then dropped). Not detected: a submodule put in training mode while the
model is in eval mode (call ``model.train()`` on the whole model).
"""

from __future__ import annotations

import functools
import operator
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules import module as _module

from ..layers.deployed import DeployedStripeConv2d
from ..layers.kernels import cpu as cpu_kernel

#: bumped whenever any module anywhere registers a submodule, parameter or buffer (torch's global hooks)
_GENERATION = [0]
_HOOKS_INSTALLED = [False]
_VERSION = operator.attrgetter("_version")
_GLOBAL_HOOKS = (_module._global_forward_hooks, _module._global_forward_pre_hooks, _module._global_backward_hooks,
                 _module._global_backward_pre_hooks)


class _PyStamps:
    """The stamps (version, data pointer) of ``tensors`` when made, read from Python: where the kernel is not
    loaded (its ``Stamps`` class does the same in one call)."""

    def __init__(self, tensors: List[torch.Tensor]) -> None:
        self.tensors = tensors
        self.stamps = self._read()

    def _read(self) -> Tuple[List[int], ...]:
        return list(map(_VERSION, self.tensors)), list(map(torch.Tensor.data_ptr, self.tensors))

    def current(self) -> bool:
        return self._read() == self.stamps

    def requires_grad(self) -> bool:
        return any(t.requires_grad for t in self.tensors)


def _stamps(layers: List[DeployedStripeConv2d]):
    """The stamps of the kernel layers' weights and biases, taken now: ``current()`` tells whether none was written
    (in place, or given new data) since, ``requires_grad()`` whether any requires grad. The kernel's
    ``swp_stripe.Stamps`` reads them in one call where it is loaded (ResNet56's 114 tensors right after a call of
    the net, their objects out of the caches: ``benchmarks/overheads.py``), else :class:`_PyStamps`."""
    tensors = [m._parameters["weight"] for m in layers] + [m._parameters["bias"] for m in layers]
    return torch.classes.swp_stripe.Stamps(tensors) if cpu_kernel.available() else _PyStamps(tensors)


@dataclass
class _Twin:
    script: Callable
    form: str  # 'frozen' or 'scripted'
    generation: int
    fingerprint: Tuple[int, ...]
    hook_dicts: List[dict]
    layers: List[DeployedStripeConv2d]  # the kernel layers, whose packed weights
    stamps: object  # ... were made from these weights and biases (checked before every call: _stamps)


_TWINS: weakref.WeakKeyDictionary[nn.Module, _Twin] = weakref.WeakKeyDictionary()


class DeployedGraphModule(fx.GraphModule):
    """``fx.GraphModule`` whose plain inference calls run its TorchScript twin (see the module docstring)."""

    __jit_unused_properties__ = [*fx.GraphModule.__jit_unused_properties__, "forward_form"]

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling() or kwargs or self.training:  # (before _TWINS: dynamo must not guard it)
            return super().__call__(*args, **kwargs)
        twin = _TWINS.get(self)
        if twin is not None and _usable(self, twin, args):
            if not twin.stamps.current():  # a weight or bias was written since the twin was made
                twin = _remade(self, twin)
            if twin is not None:
                return twin.script(*args)
        return super().__call__(*args, **kwargs)

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)
        twin = _TWINS.get(self)
        if twin is not None:
            attach_twin(res, freeze=twin.form == "frozen")
        return res

    @property
    def forward_form(self) -> str:
        """``'frozen'`` / ``'scripted'`` (the TorchScript twin runs plain inference calls) or ``'eager'``."""
        twin = _TWINS.get(self)
        return "eager" if twin is None else twin.form


def _usable(gm: nn.Module, twin: _Twin, args) -> bool:
    """Whether the twin computes what the eager forward would for this call (cheapest checks first: at batch 1 on
    ResNet56 each microsecond here is 0.1% of the call)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _in_onnx_export():
        return False
    for a in args:
        if not isinstance(a, torch.Tensor) or not a.is_cpu or a.dtype is not torch.float32:
            return False
    if any(twin.hook_dicts) or any(_GLOBAL_HOOKS):
        return False
    if twin.generation != _GENERATION[0]:  # something registered a module or tensor somewhere: is it ours?
        if _fingerprint(gm) != twin.fingerprint:
            _TWINS.pop(gm, None)
            return False
        twin.generation = _GENERATION[0]
    if torch.is_autocast_enabled("cpu"):
        return False  # autocast: the eager forward (its layers handle the mixed dtypes)
    if torch.is_grad_enabled() and (any(a.requires_grad for a in args) or twin.stamps.requires_grad()):
        return False  # the eager forward refuses it: the kernel has no backward
    return True


def _remade(gm: nn.Module, twin: _Twin) -> _Twin | None:
    """The twin made again after a write to a weight or bias, its layers packed again first. A frozen graph's
    tensor constants are values: freezing pools equal ones into one (when it freezes and again when it first runs
    the graph), so two layers that held equal tensors (timm's zero-initialised last BatchNorms fold to zero convs)
    read one of them, and only a graph frozen from the current values is sure to read every layer's own."""
    _TWINS.pop(gm, None)
    with torch.inference_mode(False), torch.no_grad():
        for layer in twin.layers:
            layer.refresh()
        attach_twin(gm, freeze=twin.form == "frozen")
    return _TWINS.get(gm)


@functools.cache
def _onnx_flags() -> Callable[[], bool]:
    """A cheap test of 'an ONNX export is running': torch's own two flags, read directly.
    ``torch.onnx.is_in_onnx_export()`` imports both modules on every call (about 8 us, most of this check at batch
    1 on ResNet56); where they moved (another torch), that function itself."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

        if isinstance(GLOBALS.in_onnx_export, bool) and isinstance(_flags._is_onnx_exporting, bool):
            return lambda: GLOBALS.in_onnx_export or _flags._is_onnx_exporting
    except (ImportError, AttributeError):
        pass
    return torch.onnx.is_in_onnx_export


def _in_onnx_export() -> bool:
    return _onnx_flags()()


def _bump(*_args) -> None:
    _GENERATION[0] += 1


def _install_hooks() -> None:
    if not _HOOKS_INSTALLED[0]:
        _module.register_module_module_registration_hook(_bump)
        _module.register_module_parameter_registration_hook(_bump)
        _module.register_module_buffer_registration_hook(_bump)
        _HOOKS_INSTALLED[0] = True


def _fingerprint(gm: nn.Module) -> Tuple[int, ...]:
    """Identity of every submodule, parameter and buffer (what the twin holds references to)."""
    ids: List[int] = []
    for m in gm.modules():
        ids.append(id(m))
        ids.extend(id(t) for t in m._parameters.values())
        ids.extend(id(t) for t in m._buffers.values())
    return tuple(ids)


def _shares_state(frozen: torch.jit.ScriptModule, gm: nn.Module) -> bool:
    """True if every tensor constant of ``frozen``'s graph is (a view of) a parameter or buffer of ``gm``: freezing
    then derived nothing (no folded or transposed copy that an in-place change of the weights would leave stale)."""
    own = {t.untyped_storage().data_ptr() for t in list(gm.parameters()) + list(gm.buffers()) if t.numel()}
    for node in frozen.graph.nodes():
        if node.kind() == "prim::Constant" and isinstance(node.output().type(), torch._C.TensorType):
            value = node.output().toIValue()
            if value is not None and value.numel() and value.untyped_storage().data_ptr() not in own:
                return False
    return True


def attach_twin(gm: DeployedGraphModule, freeze: bool = True) -> str:
    """Give ``gm`` (eval mode, CPU) its TorchScript twin; returns the form (``'frozen'``, ``'scripted'``) or why
    there is none (``'eager: ...'``). Frozen only where freezing derived no tensor (:func:`_shares_state`).

    The weights' stamps are checked before each call (:func:`_stamps`), not by the kernel's op: freezing
    pools tensor constants of equal value into one (when it freezes and again when it first runs the graph), so
    two layers whose weights are equal (zero-initialised last BatchNorms fold to zero convs) read one constant,
    and a check in the kernel would compare one layer's stamp with another's weight."""
    if not isinstance(gm, DeployedGraphModule):
        return "eager: not a torch.fx trace"
    was_training = gm.training
    gm.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notices
            script = torch.jit.script(gm)
            form = "scripted"
            if freeze:
                frozen = torch.jit.freeze(script, optimize_numerics=False)
                if _shares_state(frozen, gm):
                    script, form = frozen, "frozen"
    except Exception as err:  # noqa: BLE001 - any scripting failure: the eager forward stays
        return f"eager: torch.jit.script failed ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    finally:
        gm.train(was_training)
    _install_hooks()
    hook_dicts = [d for m in _called_modules(gm) for d in (m._forward_hooks, m._forward_pre_hooks,
                                                           m._backward_hooks, m._backward_pre_hooks)]
    layers = [m for m in gm.modules() if isinstance(m, DeployedStripeConv2d)]
    _TWINS[gm] = _Twin(script, form, _GENERATION[0], _fingerprint(gm), hook_dicts, layers, _stamps(layers))
    return form


def _called_modules(gm: fx.GraphModule) -> List[nn.Module]:
    """The modules whose hooks the eager forward runs: ``gm``, the modules its graph calls and everything inside
    them (containers that only hold called modules are never called: their hooks never run)."""
    seen: dict = {id(gm): gm}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            for m in gm.get_submodule(node.target).modules():
                seen.setdefault(id(m), m)
    return list(seen.values())


def detach_twin(gm: nn.Module) -> None:
    """Drop ``gm``'s TorchScript twin (its forward stays eager)."""
    _TWINS.pop(gm, None)

"""Running a model on example inputs and swapping its submodules: the helpers every subpackage shares."""

from __future__ import annotations

import copy
from typing import Callable, Iterable, List

import torch
import torch.nn as nn
from torch.nn.utils import parametrize


def run_model(model: nn.Module, inputs):
    """Call ``model`` on example inputs given as a tensor, a tuple/list of args, or a dict of kwargs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@torch.no_grad()
def run_with_hooks(model: nn.Module, modules: Iterable[nn.Module], hook: Callable, inputs) -> None:
    """One eval-mode forward of ``inputs`` with ``hook`` as a forward hook on ``modules`` (train mode and
    hooks restored afterwards)."""
    handles = [m.register_forward_hook(hook) for m in modules]
    was_training = model.training
    try:
        run_model(model.eval(), inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def flat_outputs(output) -> List[torch.Tensor]:
    """The tensors of a model output (tensor, tuple/list or dict, nested)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in flat_outputs(o)]
    return []


def probe_inputs(example_inputs) -> List:
    """The example inputs and a seeded random batch of the same shapes (float tensors only)."""
    gen = torch.Generator().manual_seed(0)

    def randomize(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x)
        if isinstance(x, (tuple, list)):
            return type(x)(randomize(v) for v in x)
        if isinstance(x, dict):
            return {k: randomize(v) for k, v in x.items()}
        return x

    return [example_inputs, randomize(example_inputs)]


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also gives each parametrized module of the copy its own class: deepcopy shares
    the class torch.nn.utils.parametrize creates, and removing a parametrization deletes the property from
    that class - i.e. from the original model too."""
    trial = copy.deepcopy(model)
    for module in trial.modules():
        if parametrize.is_parametrized(module):
            cls = type(module)
            namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
            module.__class__ = type(cls.__name__, cls.__bases__, namespace)
    return trial


def swap_module(model: nn.Module, old: nn.Module, new: nn.Module) -> nn.Module:
    """Put ``new`` wherever ``old`` is a child of a module of ``model`` (a module may be registered under several
    parents), as ``torch.ao``'s ``swap_module`` does: ``new`` gets ``old``'s forward pre-hooks and hooks, its
    train/eval mode, and the device of its parameters. Returns ``new``."""
    for hooks in ("_forward_pre_hooks", "_forward_hooks"):
        for key, hook in getattr(old, hooks).items():
            getattr(new, hooks)[key] = hook
    new.train(old.training)
    reference = next(iter(old.parameters()), None)
    reference = next(iter(old.buffers()), None) if reference is None else reference
    if reference is not None:
        new.to(reference.device)
    for parent in model.modules():
        for key, child in parent._modules.items():
            if child is old:
                parent._modules[key] = new
    return new

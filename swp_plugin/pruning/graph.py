"""Building torch-pruning's DependencyGraph with a time limit, and running a model on example inputs."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Callable, Dict, Iterable, Iterator, List

import torch
import torch.nn as nn
import torch_pruning as tp


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


@contextlib.contextmanager
def time_limit(seconds: float | None, what: str = "DepGraph work") -> Iterator[None]:
    """Raise ``TimeoutError`` in the block after ``seconds`` (main thread only; elsewhere no limit).

    Nests: inside another ``time_limit`` the sooner deadline wins, and the outer one keeps running.
    """
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return
    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    if outer_left and outer_left <= seconds:  # the enclosing limit fires first
        yield
        return

    def _raise(signum, frame):
        raise TimeoutError(f"{what} took longer than {seconds:g} s")

    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-3))


def build_graph(model: nn.Module, example_inputs, options: Dict, timeout: float | None = None
                ) -> tp.DependencyGraph:
    """``tp.DependencyGraph().build_dependency(model, example_inputs, **options)`` within ``timeout`` seconds
    (:func:`time_limit`), with autograd on (the graph is traced through it) also under ``torch.no_grad()``.

    torch-pruning's tracing registers forward hooks, puts the model in eval mode and removes the hooks only when
    the traced forward succeeds; here the model keeps its mode, and hooks left behind by a failed or timed-out
    build are removed (else they would stay on the user's model).
    """
    hooks = {m: _hook_keys(m) for m in model.modules()}
    was_training = model.training
    try:
        with time_limit(timeout), torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs, **options)
    finally:
        for module, keys in hooks.items():
            for table in _HOOK_TABLES:
                for key in [k for k in getattr(module, table) if k not in keys]:
                    del getattr(module, table)[key]
        model.train(was_training)


_HOOK_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _hook_keys(module: nn.Module) -> set:
    return {key for table in _HOOK_TABLES for key in getattr(module, table)}

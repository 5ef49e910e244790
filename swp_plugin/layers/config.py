"""Process-wide switches of the stripe layers, in the spirit of timm's ``layers/config.py``.

``SWP_STRIPE_BACKEND`` (``auto``, ``dense``, ``stripe``, ``cpp`` or ``triton``) is read once, at import, as the
default that ``StripeConv2d(backend='auto')`` layers use (deterministic runs: ``SWP_STRIPE_BACKEND=dense``).
:func:`set_backend` changes it for the process or sets the backend of every stripe layer of one model;
:func:`use_backend` changes it for a block.

:func:`kernel_cache_limit` / :func:`set_kernel_cache_limit`: how many bytes of freed outputs and scratch buffers the
compiled CPU kernel keeps for reuse (default 256 MB, ``SWP_KERNEL_CACHE_MB`` at import; 0 keeps none).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch.nn as nn

BACKENDS = ("auto", "stripe", "dense", "cpp", "triton")


def _checked(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


_default = {"backend": _checked(os.environ.get("SWP_STRIPE_BACKEND", "auto") or "auto", "SWP_STRIPE_BACKEND")}


def default_backend() -> str:
    """What a ``StripeConv2d(backend='auto')`` layer runs: ``'auto'`` (its own per-shape choice) or a forced one."""
    return _default["backend"]


def set_backend(model: nn.Module | None, name: str) -> None:
    """``model=None``: the process-wide default of ``'auto'`` layers; else every ``StripeConv2d`` of ``model``
    gets ``backend=name``."""
    _checked(name, "backend")
    if model is None:
        _default["backend"] = name
        return
    from .stripe_conv import StripeConv2d  # this module is imported by stripe_conv

    for module in model.modules():
        if isinstance(module, StripeConv2d):
            module.backend = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, ``'auto'`` layers run backend ``name`` (the process default is restored after)."""
    previous = default_backend()
    set_backend(None, name)
    try:
        yield
    finally:
        _default["backend"] = previous


def kernel_cache_limit() -> int:
    """Most bytes of freed kernel outputs and scratch buffers the compiled CPU kernel keeps for reuse."""
    from .kernels import cpu  # (lazy: importing this module never builds the kernel)

    return cpu.cache_limit()


def set_kernel_cache_limit(nbytes: int) -> int:
    """Keep at most ``nbytes`` of freed kernel blocks (0: none); returns the previous limit. Blocks freed to the C
    library can go back to the system and fault in again, page by page, at their next use; the cache keeps the
    blocks a deployed model's calls reuse (one model at batch 8 and 224 pixels needs some tens of MB)."""
    from .kernels import cpu

    return cpu.set_cache_limit(nbytes)


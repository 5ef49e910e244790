"""The compiled CPU stripe kernel: ``build`` (safe build and load), ``cpu`` (plan, autograd wrapper)."""

from . import build, cpu

__all__ = ["build", "cpu"]

"""Saving a pruned (or deployed) model as tensors plus a plain description of its structure: no pickled code,
atomic writes, and a loader that treats every file as untrusted input (see docs/reliability.md).

``save(model, path)`` / ``load(path, fresh_model)``; the file opens with ``torch.load(path, weights_only=True)``.
Whole-module ``torch.save(model)`` works too, but loading it runs pickled code:
``torch.load(path, weights_only=False)`` - only for files you trust.

* :mod:`.files`: atomic writes, the safe read, format versions, the content digest, :class:`CheckpointError`;
* :mod:`.schema`: what a structure entry, a tensor and the metadata may be;
* :mod:`.loader`: :func:`save` and :func:`load`.
"""

from ..layers.structure import SHAPE_ATTRIBUTES, describe
from .files import FORMAT, CheckpointError, PickledCheckpointError, atomic_save, check_writable, digest, read
from .loader import load, save
from .schema import model_spec

__all__ = ["FORMAT", "SHAPE_ATTRIBUTES", "CheckpointError", "PickledCheckpointError", "atomic_save",
           "check_writable", "describe", "digest", "load", "model_spec", "read", "save"]

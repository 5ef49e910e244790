"""The file itself: atomic writes, a safe read (``weights_only``), format versions, a content digest, errors.

A ``swp_plugin.save`` file is a ``torch.save`` zip archive of a dict of plain Python and tensors:
``{"format", "structure", "state_dict", "metadata"[, "deploy"], "digest"}``. ``digest`` is a SHA-256 of the
structure, metadata and every tensor's bytes: a file damaged on disk or edited without the loader's knowledge is
refused (torch's zip reader does not check its records' CRCs).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Dict, Union

import torch

PathLike = Union[str, os.PathLike]

#: written by this version; files of every version up to it are read
FORMAT = "swp_plugin/2"
VERSION = 2
#: top-level keys of a file (``deploy`` only for a deployed model, ``digest`` from version 2 on)
KEYS = {"format", "structure", "state_dict", "metadata", "deploy", "digest"}


class CheckpointError(ValueError):
    """A file the loader refuses: the message names the file, the field and what to do."""

    def __init__(self, path: PathLike, field: str | None, problem: str) -> None:
        self.path, self.field = os.fspath(path), field
        super().__init__(f"{self.path}: {field + ': ' if field else ''}{problem}")


class PickledCheckpointError(CheckpointError):
    """The file holds pickled Python objects (a whole-module ``torch.save(model)``): loading it runs code."""


def check_writable(path: PathLike) -> None:
    """Raise ``PermissionError`` / ``FileNotFoundError`` naming ``path`` now if it cannot be written (before long
    work whose result would be lost)."""
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist")
    if Path(path).is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder")
    try:
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=f".{Path(path).name}.", suffix=".probe")
    except OSError as err:
        raise PermissionError(f"cannot write {path}: the folder {folder} is not writable ({err.strerror})") from None
    probe.close()


def atomic_save(obj, path: PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same folder (flushed and fsynced), then
    ``os.replace``: ``path`` holds the previous file or the complete new one, never a part (a process killed
    mid-save leaves at most a ``.<name>.*.tmp`` file behind)."""
    path = Path(path).resolve() if Path(path).is_symlink() else Path(path)  # a link: replace what it points to
    if not path.resolve().parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {path.resolve().parent} does not exist")
    handle, temporary = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(temporary, path.stat().st_mode & 0o777)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    try:  # the rename itself durable
        folder = os.open(path.resolve().parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:
        pass


def digest(checkpoint: Dict) -> str:
    """SHA-256 of a checkpoint's structure, metadata, deploy record and tensors (not of its ``digest``)."""
    h = hashlib.sha256()
    plain = {k: checkpoint.get(k) for k in ("format", "structure", "metadata", "deploy")}
    h.update(json.dumps(plain, sort_keys=True, default=str).encode())
    state = checkpoint.get("state_dict", {})
    for key in sorted(state):
        tensor = state[key]
        h.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _open(path: PathLike):
    size = os.path.getsize(path)  # FileNotFoundError names the path
    if size == 0:
        raise CheckpointError(path, None, "is empty (0 bytes): an interrupted save or copy? Save the model again")
    with open(path, "rb") as f:
        head = f.read(4)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if head == b"PK\x03\x04" or head[:1] == b"\x80":  # a torch.save archive, or a legacy pickle
            raise PickledCheckpointError(
                path, None, "holds pickled Python objects (a whole-module torch.save(model) file?), not a "
                "swp_plugin.save file; loading it runs code: use torch.load(path, weights_only=False) only if you "
                "trust it, then write it with swp_plugin.save(model, path)") from None
        raise CheckpointError(path, None, f"is not a swp_plugin.save file (not a torch.save archive: "
                              f"{_kind(head)}, {size} bytes)") from None
    except Exception as err:  # the archive reader's errors: damaged, truncated, another kind of file
        if head == b"PK\x03\x04":
            raise CheckpointError(path, None, f"is damaged or truncated (the archive does not open: "
                                  f"{str(err).splitlines()[0].split('. ')[0][:160]}); save the model again") from None
        raise CheckpointError(path, None, f"is not a swp_plugin.save file (not a torch.save archive: "
                              f"{_kind(head)}, {size} bytes)") from None


def _kind(head: bytes) -> str:
    return "a text file" if head.isascii() and head.decode("ascii").strip().isprintable() else "another kind of file"


def read(path: PathLike) -> dict:
    """The checkpoint dict of a :func:`~swp_plugin.save` file (opened with ``weights_only=True``), its layout
    and digest checked; else :class:`CheckpointError` (a ``ValueError``) naming the file and the field."""
    checkpoint = _open(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("format"), str):
        raise CheckpointError(path, None, f"is not a swp_plugin.save file (format {FORMAT!r}); for a whole-module "
                              "torch.save file use torch.load(path, weights_only=False) if you trust it")
    name, _, version = checkpoint["format"].partition("/")
    if name != "swp_plugin" or not version.isdigit():
        raise CheckpointError(path, "format", f"{checkpoint['format']!r} is not a swp_plugin.save format "
                              f"(expected {FORMAT!r})")
    if int(version) > VERSION:
        raise CheckpointError(path, "format", f"{checkpoint['format']!r} was written by a newer swp_plugin (this "
                              f"one reads swp_plugin/1 to {FORMAT}): upgrade swp_plugin to load it")
    unknown = sorted(map(str, set(checkpoint) - KEYS))
    if unknown:
        raise CheckpointError(path, unknown[0], f"unknown key (a file has {sorted(KEYS)})")
    for key, kind in (("structure", dict), ("state_dict", dict), ("metadata", dict), ("deploy", dict)):
        if key in checkpoint and not isinstance(checkpoint[key], kind):
            raise CheckpointError(path, key, f"must be a {kind.__name__}, got {type(checkpoint[key]).__name__}")
    for key in ("structure", "state_dict"):
        if key not in checkpoint:
            raise CheckpointError(path, key, "missing: the file is incomplete or not written by swp_plugin.save")
    for key, value in checkpoint["state_dict"].items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(path, f"state_dict[{key!r}]", f"must be a tensor, got {type(value).__name__}")
    if int(version) >= 2:
        if not isinstance(checkpoint.get("digest"), str):
            raise CheckpointError(path, "digest", "missing: every swp_plugin/2 file has one")
        if digest(checkpoint) != checkpoint["digest"]:
            raise CheckpointError(path, "digest", "the content does not match its SHA-256: the file was damaged "
                                  "or edited; save the model again (or, for a file you edited on purpose, set "
                                  "checkpoint['digest'] = swp_plugin.persistence.digest(checkpoint))")
    return checkpoint

"""Fuzz the loader: random mutations of saved plain, stripe-pruned and deployed models, in one process.

    python -m swp_plugin.testing.loader_fuzz --cases 300 --seed 0    # what the default test suite runs
    python -m swp_plugin.testing.loader_fuzz --cases 2000 --seed 1   # under `make sanitize` (ASan + UBSan)

A case takes one of the three saved files and damages it: its bytes (truncated, a byte changed, bytes appended:
the file's digest no longer matches) or its content, re-saved with a matching digest as an attacker would (a
tensor's values - NaN, Inf, huge, out-of-range or reordered stripe indexes -, shape or dtype, a structure entry's
keys and values, the deploy record, the top-level keys, the format). Then ``swp_plugin.load(file, fresh_model)``
must either raise :class:`~swp_plugin.persistence.CheckpointError` naming the file, or give a model that is what
the file says: its tensors equal the file's, and its computations agree with each other (the stripe layers'
``cpp``, ``stripe`` and ``dense`` backends; the deployed kernel and its PyTorch fallback). Any other exception,
a crash or a disagreement is a failure. Exit status 1 if any case failed (each printed with its case).
"""

from __future__ import annotations

import argparse
import copy
import io
import random
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn

from ..deployment import deploy
from ..layers.config import use_backend
from ..layers.kernels import cpu as cpu_kernel
from ..layers.stripe_conv import StripeConv2d
from ..persistence import CheckpointError, digest, load, save
from .exactness import random_stripe_model

#: outputs of two computations of one model agree within this (relative to max|y|, float32)
TOLERANCE = 1e-4


class FuzzNet(nn.Module):
    """Conv-BN-ReLU, a residual block, a strided conv with GroupNorm, a linear head: ``(N, 3, 12, 12) -> (N, 4)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.norm = nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.GroupNorm(2, 6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(self.norm(self.conv3(y)).mean((2, 3)))


def _fresh() -> nn.Module:
    torch.manual_seed(1)
    model = FuzzNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def saved_files(folder: Path) -> Dict[str, Tuple[Path, torch.Tensor]]:
    """``kind -> (file, input)`` for a plain, a stripe-pruned and (where the kernel runs) a deployed model."""
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    models = {"plain": _fresh(), "stripe": random_stripe_model(_fresh(), keep=0.5, seed=0)}
    if cpu_kernel.available():
        stripe = copy.deepcopy(models["stripe"])
        models["deployed"] = deploy(stripe, x, choices={n: "kernel" for n, m in stripe.named_modules()
                                                        if isinstance(m, (StripeConv2d, nn.Conv2d))})
    files = {}
    for kind, model in models.items():
        save(model, folder / f"{kind}.pt")
        files[kind] = (folder / f"{kind}.pt", x)
    return files


# ---------------------------------------------------------------------------------------------- mutations
def _tensor_values(rng: random.Random, ck: Dict) -> str:
    state = ck["state_dict"]
    key = rng.choice(sorted(k for k, v in state.items() if v.numel()))
    t = state[key].clone()
    flat = t.view(-1)
    i = rng.randrange(flat.numel())
    if t.is_floating_point():
        value = rng.choice([float("nan"), float("inf"), -float("inf"), 1e30, -1.0, 0.0, rng.gauss(0, 3)])
    else:
        n = flat.numel()
        choices = [-1, 10**9, -10**9, 2**62, int(flat.max()) + 1, rng.randrange(0, 64)]
        if n > 1:
            j = min(n - 1, i + 1)
            choices += [int(flat[j])]  # a duplicate / order break
        value = rng.choice(choices)
    flat[i] = value
    state[key] = t
    return f"{key}[{i}] = {value}"


def _tensor_shape(rng: random.Random, ck: Dict) -> str:
    state = ck["state_dict"]
    key = rng.choice(sorted(state))
    t = state[key]
    how = rng.choice(["grow", "shrink", "rank", "empty", "scalar"])
    if how == "grow" and t.dim():
        d = rng.randrange(t.dim())
        t = torch.cat([t, t.narrow(d, 0, 1) if t.shape[d] else t], d)
    elif how == "shrink" and t.dim() and t.shape[0] > 1:
        t = t[: t.shape[0] - 1]
    elif how == "rank":
        t = t.reshape(-1) if t.dim() != 1 else t.reshape(1, -1)
    elif how == "empty":
        t = t.new_zeros((0,) * max(1, t.dim()))
    else:
        t = t.reshape(-1)[:1].reshape(()) if t.numel() else t.new_zeros(())
    state[key] = t.clone()
    return f"{key}: {how} -> {tuple(t.shape)}"


def _tensor_dtype(rng: random.Random, ck: Dict) -> str:
    state = ck["state_dict"]
    key = rng.choice(sorted(state))
    dtype = rng.choice([torch.float64, torch.float16, torch.int32, torch.int64, torch.bool, torch.uint8])
    state[key] = state[key].to(dtype)
    return f"{key}: {dtype}"


def _structure(rng: random.Random, ck: Dict) -> str:
    structure = ck["deploy"]["structure"] if "deploy" in ck and rng.random() < 0.5 else ck["structure"]
    if not structure:
        return "no structure"
    name = rng.choice(sorted(structure))
    entry = structure[name]
    how = rng.choice(["add", "delete", "value", "type", "stripe"])
    if how == "add":
        key, value = rng.choice([("eps", 100.0), ("stride", [2, 2]), ("momentum", 0.5), ("weight", 1), ("x", None)])
        entry[key] = value
        return f"{name}: + {key}={value}"
    if how == "delete":
        key = rng.choice(sorted(entry))
        del entry[key]
        return f"{name}: - {key}"
    if how == "stripe":
        entry["stripe"] = not entry.get("stripe")
        return f"{name}: stripe flipped"
    key = rng.choice(sorted(entry))
    value = rng.choice([0, -1, 10**9, 2.5, "x", [1], [3, 3], None, True, 1, 2, [1, 1], "same"])
    if how == "type":
        value = rng.choice(["Conv2d", "Linear", "BatchNorm2d", 3])
        key = "type"
    entry[key] = value
    return f"{name}: {key}={value!r}"


def _deploy_record(rng: random.Random, ck: Dict) -> str:
    if "deploy" not in ck:
        return _top_level(rng, ck)
    record = ck["deploy"]
    how = rng.choice(["choice", "unknown-layer", "example", "dtype", "shapes", "flag", "key"])
    if how == "choice" and record["choices"]:
        name = rng.choice(sorted(record["choices"]))
        record["choices"][name] = rng.choice(["dense", "kernel", "cpp", 1])
        return f"choices[{name}] = {record['choices'][name]!r}"
    if how == "unknown-layer":
        record["choices"][rng.choice(["fc", "bn1", "nope", ""])] = "kernel"
        return "choice for a layer that is no conv"
    if how == "example":
        record["example"] = rng.choice([[[[10**6, 3, 10**4, 10**4], "float32"]], [[[-1, 3], "float32"]], [], "x",
                                        [[[2, 3, 12, 12], "float32"]] * 20, [[[1, 3, 7, 7], "float32"]]])
        return f"example = {str(record['example'])[:60]}"
    if how == "dtype":
        record["example"] = [[[2, 3, 12, 12], rng.choice(["int64", "complex64", "float16", "os.system"])]]
        return f"example dtype {record['example'][0][1]}"
    if how == "shapes":
        key = rng.choice(sorted(record["shapes"]))
        record["shapes"][key] = rng.choice([[10**9, 8, 3, 3], [], [1], [-3], "x", [8, 3, 3, 3, 3]])
        return f"shapes[{key}] = {record['shapes'][key]!r}"
    if how == "flag":
        key = rng.choice(["fuse", "dense_convs"])
        record[key] = rng.choice([not record[key], "yes", None])
        return f"{key} = {record[key]!r}"
    record[rng.choice(["extra", "structure", "choices"])] = rng.choice([None, 1, {}])
    return "deploy record key changed"


def _top_level(rng: random.Random, ck: Dict) -> str:
    how = rng.choice(["format", "delete", "add", "state-key", "state-value"])
    if how == "format":
        ck["format"] = rng.choice(["swp_plugin/99", "swp_plugin/x", "other/1", 2, "swp_plugin/1"])
        return f"format = {ck['format']!r}"
    if how == "delete":
        key = rng.choice(sorted(k for k in ck if k != "digest"))
        del ck[key]
        return f"- {key}"
    if how == "add":
        ck[rng.choice(["extra", "code"])] = "print('hi')"
        return "+ top-level key"
    state = ck["state_dict"]
    key = rng.choice(sorted(state))
    if how == "state-key":
        state[key + ".extra" if rng.random() < 0.5 else "ghost"] = state.pop(key)
        return f"state key {key} renamed"
    state[key] = rng.choice([1.5, "x", [1, 2], None])
    return f"state[{key}] = non-tensor"


CONTENT: List[Callable[[random.Random, Dict], str]] = [
    _tensor_values, _tensor_values, _tensor_values, _tensor_shape, _tensor_dtype, _structure, _structure,
    _deploy_record, _top_level]


def _bytes(rng: random.Random, data: bytes) -> Tuple[bytes, str]:
    how = rng.choice(["truncate", "flip", "append", "empty", "text"])
    if how == "truncate":
        n = rng.randrange(len(data))
        return data[:n], f"truncated to {n} bytes"
    if how == "flip":
        i = rng.randrange(len(data))
        return data[:i] + bytes([data[i] ^ rng.randrange(1, 256)]) + data[i + 1:], f"byte {i} changed"
    if how == "append":
        return data + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))), "bytes appended"
    if how == "empty":
        return b"", "empty"
    return b"format: swp_plugin/2\nnot a model\n", "plain text"


# ---------------------------------------------------------------------------------------------- oracle
def _agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return True  # a huge (finite) weight may overflow: nothing to compare
    return float((a - b).abs().max()) <= TOLERANCE * max(1.0, float(a.abs().max()))


@torch.no_grad()
def check_loaded(model: nn.Module, state: Dict[str, torch.Tensor], x: torch.Tensor) -> str | None:
    """None if ``model`` is what ``state`` says and its computations agree; else what is wrong."""
    own = model.state_dict()
    for key, value in state.items():
        if key in own and not torch.equal(own[key], value.to(own[key].dtype)):
            return f"{key} differs from the file's"
    stripes = [m for m in model.modules() if isinstance(m, StripeConv2d)]
    if stripes:
        outputs = {}
        for backend in ("dense", "stripe") + (("cpp",) if cpu_kernel.available() else ()):
            for m in stripes:
                m.backend = backend
            outputs[backend] = model(x)
        if not all(_agree(outputs["dense"], y) for y in outputs.values()):
            return f"backends disagree: {sorted(outputs)}"
    if hasattr(model, "deploy_source") and cpu_kernel.available():
        kernel = model(x)
        cpu_kernel.set_enabled(False)
        try:
            fallback = model(x)
        finally:
            cpu_kernel.set_enabled(True)
        if not _agree(kernel, fallback):
            return "the deployed kernel and its PyTorch fallback disagree"
    model(x)
    return None


def run_case(rng: random.Random, files: Dict[str, Tuple[Path, torch.Tensor]], folder: Path) -> Tuple[str, str]:
    """One mutation and its check: ``(description, outcome)``; outcome ``'refused'``, ``'loaded'`` or raises
    ``AssertionError`` with what went wrong."""
    kind = rng.choice(sorted(files))
    path, x = files[kind]
    target = folder / "mutated.pt"
    if rng.random() < 0.3:
        data, what = _bytes(rng, path.read_bytes())
        target.write_bytes(data)
        state = None
    else:
        ck = torch.load(path, weights_only=True)
        what = rng.choice(CONTENT)(rng, ck)
        if "state_dict" in ck and isinstance(ck["state_dict"], dict) and all(
                isinstance(v, torch.Tensor) for v in ck["state_dict"].values()):
            ck["digest"] = digest(ck)
            state = ck["state_dict"]
        else:
            state = None
        buffer = io.BytesIO()
        torch.save(ck, buffer)
        target.write_bytes(buffer.getvalue())
    description = f"{kind}: {what}"
    try:
        model = load(target, _fresh())
    except CheckpointError as err:
        if not str(err).startswith(str(target)):
            raise AssertionError(f"{description}: the error does not name the file: {err}") from None
        return description, "refused"
    except Exception as err:
        raise AssertionError(f"{description}: {type(err).__name__} instead of a clear error: "
                             f"{str(err)[:300]}") from err
    if state is None:  # damaged bytes that still load: must be the original model
        state = torch.load(path, weights_only=True)["state_dict"]
    problem = check_loaded(model, state, x)
    if problem:
        raise AssertionError(f"{description}: loaded, but {problem}")
    return description, "loaded"


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    counts = {"refused": 0, "loaded": 0}
    failures = []
    with tempfile.TemporaryDirectory() as tmp, use_backend("dense"):
        folder = Path(tmp)
        files = saved_files(folder)
        for case in range(args.cases):
            rng = random.Random(args.seed * 1_000_003 + case)
            try:
                _, outcome = run_case(rng, files, folder)
                counts[outcome] += 1
            except AssertionError as err:
                failures.append(f"case {case}: {err}")
                print(f"FAIL case {case}: {err}")
                traceback.print_exc(limit=3)
    print(f"{'ok' if not failures else 'FAILED'}: {args.cases} cases, {len(failures)} failed, {counts['refused']} "
          f"refused, {counts['loaded']} loaded ({', '.join(sorted(files))}; kernel "
          f"{'loaded' if cpu_kernel.available() else 'unavailable'})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

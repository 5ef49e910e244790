"""Fuzz ``StripeConv2d`` against the masked dense convolution (float64 reference), in one process.

    python -m swp_plugin.testing.fuzz --cases 300 --seed 0          # what the default test suite runs
    MALLOC_CHECK_=3 python -m swp_plugin.testing.fuzz --cases 3000  # the slow test / the sanitizer run

Each seeded case draws a layer and an input: channels 1..~100, kernels 1..7 (non-square), strides and
dilations 1..3, explicit / ``'same'`` / ``'valid'`` / timm dynamic-same padding, every padding mode, images
1x1..64x64 (widths around the kernel's narrow/wide switch at 32 and its tile sizes), batch 1..9,
contiguous / channels-last / non-contiguous inputs, kept stripes from none to all, 1 or 2 threads. For every
backend (``dense``, ``stripe``, ``cpp`` where available, ``auto``) it checks the inference output and, in
training mode, the output and the gradients of the input, the stripe weights and the bias; with ``cpp``, also
the deployed layer (``DeployedStripeConv2d``) with an epilogue of the case (bias, residual, ReLU). All cases run in
this one process, so that heap damage done by one case shows in a later one (a process per case hides it).
Exit status 1 if any case failed (each failure printed with its case).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import List, Tuple

import torch
import torch.nn as nn
from timm.layers.conv2d_same import Conv2dSame

from ..layers.deployed import DeployedStripeConv2d
from ..layers.kernels import cpu as cpu_kernel
from ..layers.stripe_conv import StripeConv2d

#: max|y - y_ref| / max(|y_ref|, 1) allowed in float32 (sums of up to ~5000 products). The weight and bias
#: gradients sum over every image and output pixel (no bound on the length, and the sum may cancel: seed 5 case
#: 161, a bias gradient of 680 terms near zero, had 2.3e-5): for them the scale is the sum of the absolute values
#: of the terms, the float summation's error bound (dropping one term of average size still fails the check up to
#: ~50000 terms)
TOLERANCE = 2e-5
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
EPILOGUES = ("none", "relu", "residual", "residual+relu")


@dataclass
class Case:
    """One fuzz case (every field drawn by :func:`draw`)."""

    cin: int
    cout: int
    kernel: Tuple[int, int]
    stride: Tuple[int, int]
    dilation: Tuple[int, int]
    padding: object  # (ph, pw), "same", "valid" or "dynamic" (timm Conv2dSame)
    padding_mode: str
    size: Tuple[int, int]
    batch: int
    bias: bool
    keep: float  # fraction of stripes kept; 0: none, 1: all, -1: exactly one
    layout: str  # contiguous, channels_last, strided
    threads: int
    seed: int
    #: the deployed layer's epilogue (``cpp``): act(conv + bias [+ residual]); drawn from the seed alone, so
    #: that the layers drawn stay those of earlier versions
    epilogue: str = "none"


def _channels(rng: random.Random) -> int:
    return max(1, min(100, int(math.exp(rng.uniform(0, math.log(100))))))


def draw(rng: random.Random, seed: int) -> Case:
    """A random case whose dense convolution is valid (output at least 1x1, padding modes within bounds)."""
    while True:
        kernel = (rng.choice([1, 1, 3, rng.randint(1, 7)]), rng.choice([1, 1, 3, rng.randint(1, 7)]))
        stride = (rng.randint(1, 3), rng.randint(1, 3))
        dilation = (rng.randint(1, 3), rng.randint(1, 3))
        kind = rng.choice(["explicit", "explicit", "same", "valid", "dynamic"])
        mode = rng.choice(PADDING_MODES) if kind in ("explicit", "same") else "zeros"
        if kind == "same":
            stride = (1, 1)
        padding = ((rng.randint(0, kernel[0]), rng.randint(0, kernel[1])) if kind == "explicit"
                   else kind)
        width = rng.choice([rng.randint(1, 64), rng.randint(28, 36), rng.randint(1, 8)])
        size = (rng.choice([rng.randint(1, 64), rng.randint(1, 12)]), width)
        keep = rng.choice([0.0, 1.0, -1.0, rng.random(), rng.random()])
        case = Case(_channels(rng), _channels(rng), kernel, stride, dilation, padding, mode, size,
                    rng.randint(1, 9), rng.random() < 0.5, keep,
                    rng.choice(["contiguous", "contiguous", "channels_last", "strided"]), rng.choice([1, 2]), seed)
        if case.cin * case.cout * kernel[0] * kernel[1] * size[0] * size[1] * case.batch > 1e7:
            continue  # keep the float64 reference and the pure-PyTorch backend quick
        try:
            conv = dense_conv(case)
            with torch.no_grad():
                y = conv(torch.zeros(1, case.cin, *size))
        except (RuntimeError, ValueError):
            continue  # invalid geometry for the dense conv itself
        if y.numel():
            case.epilogue = random.Random(seed).choice(EPILOGUES)
            _widen(case, seed)
            return case


def _widen(case: Case, seed: int) -> None:
    """About one case in six gets 256-700 input channels where that stays quick: the kernel's packed input
    panels (1x1 convs of >= 256 channels) and blocks of input channels (> 384). Drawn from a stream of its own, so
    the other fields stay those of earlier versions."""
    rng = random.Random(f"wide-{seed}")
    if rng.random() < 1 / 6:
        cin = rng.randint(256, 700)
        cost = cin * case.cout * case.kernel[0] * case.kernel[1] * case.size[0] * case.size[1] * case.batch
        if cost <= 1e7:
            case.cin = cin


def dense_conv(case: Case) -> nn.Conv2d:
    """The float32 dense conv of ``case`` (random weights), as ``nn.Conv2d`` or timm ``Conv2dSame``."""
    if case.padding == "dynamic":
        return Conv2dSame(case.cin, case.cout, case.kernel, case.stride, dilation=case.dilation, bias=case.bias)
    return nn.Conv2d(case.cin, case.cout, case.kernel, case.stride, case.padding, case.dilation, bias=case.bias,
                     padding_mode=case.padding_mode)


def _mask(case: Case, gen: torch.Generator) -> torch.Tensor:
    shape = (case.cout, *case.kernel)
    if case.keep < 0:
        mask = torch.zeros(shape, dtype=torch.bool)
        mask.view(-1)[int(torch.randint(mask.numel(), (1,), generator=gen))] = True
        return mask
    return torch.rand(shape, generator=gen) < case.keep if 0 < case.keep < 1 else torch.full(shape, bool(case.keep))


def _input(case: Case, gen: torch.Generator) -> torch.Tensor:
    n, (h, w) = case.batch, case.size
    if case.layout == "strided":
        return torch.randn(n, case.cin, h, w + 3, generator=gen)[..., 1 : w + 1]
    x = torch.randn(n, case.cin, h, w, generator=gen)
    return x.contiguous(memory_format=torch.channels_last) if case.layout == "channels_last" else x


def _err(a: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """max|a - ref| / max(|scale|, 1); ``scale`` defaults to ``ref``."""
    if a.shape != ref.shape:
        return float("inf")
    if not a.numel():
        return 0.0
    scale = ref if scale is None else scale
    return float((a.double() - ref).abs().max() / max(float(scale.abs().max()), 1.0))


def _abs_grads(case: Case, x: torch.Tensor, g: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias gradients (float64) of a conv of ``case``'s geometry for the input |x| and output gradient
    |g|: per entry, the sum of the absolute values of its gradient's terms (neither depends on the weights)."""
    conv = dense_conv(case).double()
    (conv(x.detach().double().abs()) * g.abs()).sum().backward()
    return conv.weight.grad, conv.bias.grad if case.bias else None


def run_case(case: Case, backends: List[str]) -> List[str]:
    """Failures of ``case`` (empty: it passed) for each backend."""
    gen = torch.Generator().manual_seed(case.seed)
    torch.manual_seed(case.seed)
    conv = dense_conv(case)
    mask = _mask(case, gen)
    with torch.no_grad():
        conv.weight.mul_(mask[:, None])
    x = _input(case, gen)
    ref = dense_conv(case).double()
    ref.load_state_dict(conv.state_dict())
    xr = x.detach().double().requires_grad_()
    y_ref = ref(xr)
    g = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    (y_ref * g).sum().backward()
    abs_w, abs_b = _abs_grads(case, x, g)
    failures = []
    torch.set_num_threads(case.threads)
    for backend in backends:
        layer = StripeConv2d.from_dense(conv, mask, backend=backend)
        try:
            with torch.inference_mode():
                err = _err(layer.eval()(x), y_ref.detach())
            if not err <= TOLERANCE:
                failures.append(f"{backend}: inference output err {err:.3g}")
            layer.train()
            xg = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
            y = layer(xg)
            (y * g.to(y.dtype)).sum().backward()
            order = _stripe_order(layer, case.kernel[1])
            stripes = (order[0], slice(None), order[1], order[2])
            checks = {"train output": (y, y_ref.detach(), None), "grad input": (xg.grad, xr.grad, None),
                      "grad weight": (layer.weight.grad, ref.weight.grad[stripes], abs_w[stripes])}
            if case.bias:
                checks["grad bias"] = (layer.bias.grad, ref.bias.grad, abs_b)
            for what, (got, want, scale) in checks.items():
                err = _err(got, want, scale) if got is not None else float("inf")
                if not err <= TOLERANCE:
                    failures.append(f"{backend}: {what} err {err:.3g}")
        except Exception as error:  # reported with the case
            failures.append(f"{backend}: {type(error).__name__}: {str(error)[:300]}\n{traceback.format_exc()[-800:]}")
    if "cpp" in backends:
        failures += _deployed_failures(case, conv, mask, x, y_ref.detach(), gen)
    return failures


def _deployed_failures(case: Case, conv: nn.Module, mask: torch.Tensor, x: torch.Tensor, y_ref: torch.Tensor,
                       gen: torch.Generator) -> List[str]:
    """The deployed layer (the kernel's epilogue: bias, residual, ReLU stored by the kernel) against the
    reference ``y_ref`` (float64) with the same epilogue."""
    residual = "residual" in case.epilogue
    act = "relu" if "relu" in case.epilogue else "none"
    try:
        layer = DeployedStripeConv2d.from_stripe(StripeConv2d.from_dense(conv, mask), act=act, residual=residual)
        res = torch.randn(y_ref.shape, generator=gen) if residual else None
        want = y_ref + res.double() if residual else y_ref
        want = torch.relu(want) if act == "relu" else want
        with torch.inference_mode():
            err = _err(layer(x, res), want)
        return [] if err <= TOLERANCE else [f"deployed ({case.epilogue}): output err {err:.3g}"]
    except Exception as error:  # reported with the case
        return [f"deployed ({case.epilogue}): {type(error).__name__}: {str(error)[:300]}\n"
                f"{traceback.format_exc()[-800:]}"]


def _stripe_order(layer: StripeConv2d, kw: int):
    """``(o, i, j)`` of the layer's stripes in its stored order."""
    return layer.stripe_out, layer.stripe_pos // kw, layer.stripe_pos % kw


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", default="dense,stripe,cpp,auto")
    parser.add_argument("--max-failures", type=int, default=20)
    parser.add_argument("--slow", type=float, default=float("inf"), help="print cases that take longer (s)")
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b != "cpp" or cpu_kernel.available()]
    rng = random.Random(args.seed)
    start, failed = time.time(), 0
    for index in range(args.cases):
        case = draw(rng, args.seed * 100003 + index)
        began = time.time()
        failures = run_case(case, backends)
        if time.time() - began > args.slow:
            print(f"slow case {index} ({time.time() - began:.1f} s): {asdict(case)}", flush=True)
        if failures:
            failed += 1
            print(f"FAILED case {index}: {asdict(case)}\n  " + "\n  ".join(failures), flush=True)
            if failed >= args.max_failures:
                break
    print(f"{'ok' if not failed else 'FAILED'}: {args.cases} cases, {failed} failed, backends {','.join(backends)}, "
          f"cpp kernel {'loaded' if cpu_kernel.available() else 'unavailable'}, {time.time() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Fixed costs around the stripe kernel that decide small-layer and batch-1 latency, side by side in one run.

* max pooling of timm resnet18's stem output (64 x 112 x 112, 3x3 stride 2, batch 1 and 8): PyTorch's
  ``F.max_pool2d`` against ``SeparableMaxPool2d`` and ``NativeMaxPool2d`` (``swp_plugin/layers/pooling.py``);
* the deployed model's pre-call check (``DeployedGraphModule``: hooks, flags, generation) and its check of the
  kernel layers' weight and bias stamps (the kernel's ``Stamps``, one call) on ResNet56 at 20% kept, back to back
  and right after a call of the twin (as it runs: the call leaves the checks' data and code out of the caches),
  against the twin's whole call and the deployed model's;
* one call of the kernel's op on a 1-stripe 16-channel layer (1x1 and 32x32 images), on 1 and 2 threads: the
  per-call cost that no MACs explain (from Python, so it includes Python's op call).

Usage (from the repository root, on a quiet machine)::

    python benchmarks/overheads.py     # prints a table, writes benchmarks/results/overheads.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Dict

import torch
import torch.nn.functional as F

import swp_plugin
from swp_plugin.deployment import forward as twin_forward
from swp_plugin.layers.kernels import cpu as cpu_kernel
from swp_plugin.layers.pooling import NativeMaxPool2d, SeparableMaxPool2d
from swp_plugin.models import resnet56
from swp_plugin.testing import calibrate_bn, random_stripe_model

ROOT = Path(__file__).resolve().parent.parent


def per_call_us(fn: Callable[[], object], budget_s: float = 0.5) -> float:
    """Median over rounds of the mean time per call (microseconds)."""
    for _ in range(3):
        fn()
    rounds = []
    end = time.perf_counter() + budget_s
    while time.perf_counter() < end or len(rounds) < 5:
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        rounds.append((time.perf_counter() - t0) / 10 * 1e6)
    return sorted(rounds)[len(rounds) // 2]


def pooling() -> Dict[str, float]:
    out = {}
    for batch in (1, 8):
        x = torch.randn(batch, 64, 112, 112)
        forms = {"torch": lambda x=x: F.max_pool2d(x, 3, 2, 1), "separable": SeparableMaxPool2d(3, 2, 1)}
        if cpu_kernel.available():
            forms["native"] = NativeMaxPool2d(3, 2, 1)
        for name, f in forms.items():
            call = f if name == "torch" else (lambda f=f, x=x: f(x))
            out[f"pool b{batch} {name} (us)"] = per_call_us(call)
    return out


def after_call_us(fn: Callable[[], object], call: Callable[[], object], calls: int = 300) -> float:
    """Median time of ``fn`` (microseconds), each timed right after a ``call()``."""
    times = []
    for _ in range(calls):
        call()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return sorted(times)[len(times) // 2]


def twin_check() -> Dict[str, float]:
    torch.manual_seed(0)
    model = random_stripe_model(resnet56().eval(), 0.2)
    x = torch.randn(1, 3, 32, 32)
    calibrate_bn(model, torch.randn(8, 3, 32, 32))
    deployed = swp_plugin.deploy(model.eval(), x)
    twin = twin_forward._TWINS.get(deployed)
    if twin is None:
        return {}
    check = lambda: twin_forward._usable(deployed, twin, (x,))  # noqa: E731
    return {"resnet56 b1 pre-call check (us)": per_call_us(check),
            "resnet56 b1 pre-call check after a call (us)": after_call_us(check, lambda: twin.script(x)),
            "resnet56 b1 stamps check (us)": per_call_us(twin.stamps.current),
            "resnet56 b1 stamps check after a call (us)": after_call_us(twin.stamps.current, lambda: twin.script(x)),
            "resnet56 b1 twin call (us)": per_call_us(lambda: twin.script(x)),
            "resnet56 b1 deployed call (us)": per_call_us(lambda: deployed(x))}


def op_call() -> Dict[str, float]:
    if not cpu_kernel.available():
        return {}
    plan = cpu_kernel.make_plan(torch.tensor([0]), torch.tensor([4]), 16, (3, 3), (1, 1), (1, 1), 1, 1)
    packed, bias = cpu_kernel.pack(torch.randn(1, 16), plan), torch.zeros(16)
    out = {}
    for size in (1, 32):
        x = torch.randn(1, 16, size, size)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out[f"op, 1 stripe, {size}x{size}, {threads} thread(s) (us)"] = per_call_us(
                lambda x=x, s=size: torch.ops.swp_stripe.forward(x, packed, plan.panels, plan.phases, bias, None, 16,
                                                                 s, s, 1, 1, 4096, 1))
    return out


def main() -> None:
    torch.set_num_threads(2)
    with torch.no_grad():
        results = {**pooling(), **twin_check(), **op_call()}
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value:10.1f}")
    path = ROOT / "benchmarks" / "results" / "overheads.json"
    path.write_text(json.dumps({"threads": 2, "results": results}, indent=1))
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

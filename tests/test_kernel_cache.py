"""The compiled kernel's block cache: outputs and scratch buffers reuse freed blocks (no page faults per call),
within a limit that ``swp_plugin.config`` sets; cached blocks never change a result."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from swp_plugin import StripeConv2d
from swp_plugin.deployment import DeployedStripeConv2d
from swp_plugin.layers import config
from swp_plugin.layers.kernels import cpu as cpu_kernel

needs_cpp = pytest.mark.skipif(not cpu_kernel.available(), reason=f"no compiled kernel: {cpu_kernel.build_error()}")


def _layer_call(in_channels: int = 16, out_channels: int = 24, size: int = 20, stride: int = 1):
    """A random 3x3 stripe layer deployed on the kernel (ReLU fused): ``fn(x) -> y`` and its dense reference
    ``ref(x)``."""
    torch.manual_seed(in_channels * 100 + size)
    conv = nn.Conv2d(in_channels, out_channels, 3, stride, 1)
    mask = torch.rand(out_channels, 3, 3) < 0.4
    with torch.no_grad():
        conv.weight.mul_(mask[:, None])
    layer = DeployedStripeConv2d(StripeConv2d.from_dense(conv, mask), act="relu")

    def fn(x):
        with torch.no_grad():
            return layer(x)

    def ref(x):
        with torch.no_grad():
            return torch.relu(conv(x))

    return fn, ref


@pytest.fixture
def limit():
    previous = config.kernel_cache_limit()
    yield
    config.set_kernel_cache_limit(previous)


@needs_cpp
def test_a_freed_output_block_is_reused_by_the_next_call(limit):
    fn, _ = _layer_call()
    x = torch.randn(2, 16, 20, 20)
    config.set_kernel_cache_limit(64 << 20)
    y = fn(x)
    ptr = y.data_ptr()
    del y
    assert cpu_kernel.cached_bytes() >= 2 * 24 * 20 * 20 * 4
    assert fn(x).data_ptr() == ptr
    config.set_kernel_cache_limit(0)  # everything kept is given back at once
    assert cpu_kernel.cached_bytes() == 0
    y = fn(x)
    del y
    assert cpu_kernel.cached_bytes() == 0


@needs_cpp
def test_of_blocks_of_one_size_the_most_recently_freed_is_reused(limit):
    """Of several free blocks that fit, the one freed last (still in the CPU caches) serves the next call."""
    fn, ref = _layer_call()
    x = torch.randn(2, 16, 20, 20)
    config.set_kernel_cache_limit(0)  # start from an empty cache
    config.set_kernel_cache_limit(64 << 20)
    outputs = [fn(x) for _ in range(3)]
    ptrs = [y.data_ptr() for y in outputs]
    assert len(set(ptrs)) == 3
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        for i in order:
            outputs[i] = None
        for i in reversed(order):  # each call takes the block freed last of those left
            outputs[i] = fn(x)
            assert outputs[i].data_ptr() == ptrs[i]
            torch.testing.assert_close(outputs[i], ref(x), rtol=1e-4, atol=1e-4)


@needs_cpp
@pytest.mark.parametrize("stride", [1, 2])
def test_outputs_in_reused_blocks_are_exact(limit, stride):
    """A reused block holds the last call's values (NaN here): every output float is written anyway."""
    config.set_kernel_cache_limit(64 << 20)
    fn, ref = _layer_call(stride=stride, size=21)
    x = torch.randn(3, 16, 21, 21)
    for _ in range(3):
        y = fn(x)
        torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-4)
        y.fill_(float("nan"))
        del y


@needs_cpp
def test_an_output_from_the_cache_is_an_ordinary_tensor(limit):
    """Resizable (its storage grows with the cache's allocator), serialisable, shareable."""
    fn, ref = _layer_call()
    x = torch.randn(1, 16, 20, 20)
    y = fn(x)
    expected = ref(x)
    buffer = io.BytesIO()
    torch.save(y, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer), expected, rtol=1e-4, atol=1e-4)
    y.resize_(4, 24, 20, 20)
    torch.testing.assert_close(y[:1], expected, rtol=1e-4, atol=1e-4)
    assert y.clone().share_memory_().is_shared()


def test_the_cache_limit_is_checked_and_read_from_the_environment(limit):
    for bad in (-1, 1.5, "64", True):
        with pytest.raises(ValueError, match="cache limit"):
            config.set_kernel_cache_limit(bad)
    previous = config.set_kernel_cache_limit(1 << 20)
    assert config.set_kernel_cache_limit(previous) == 1 << 20
    code = "import swp_plugin.layers.config as c; print(c.kernel_cache_limit())"
    env = {**os.environ, "SWP_KERNEL_CACHE_MB": "3"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.split() == [str(3 << 20)], out.stderr[-2000:]
    env["SWP_KERNEL_CACHE_MB"] = "lots"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0 and "SWP_KERNEL_CACHE_MB must be a whole number" in out.stderr

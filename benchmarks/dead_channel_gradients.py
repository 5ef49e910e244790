"""Why the timm contract's set-up failed on repvit_m0_9 with zero-initialised BatchNorm weights (docs/coverage.md,
"The timm contract, per family"): the largest gradient after the contract's one regularized backward, per set-up.

    OMP_NUM_THREADS=1 python benchmarks/dead_channel_gradients.py [--model repvit_m0_9]

Set-ups (random init, the contract's 64x64 input, random skeleton with 50% dead stripes): ``contract-old`` (30%
dead filters, timm's zero-init BatchNorm weights kept), ``mask-first`` (the same, dead filters killed, so their
BatchNorms masked, before the forward), ``no-dead-filters``, ``unzeroed`` (the contract now:
``unzero_norm_weights`` first), ``coherent`` (unzeroed, no random dead filters; every producer of one stage-2
residual channel dead, as a trained net reaches it); ``+beta``: every BatchNorm bias ``0.1 * N(0, 1)`` as well (a
trained net's are not exactly zero either). Also the largest ratio input-grad / output-grad of a train-mode
BatchNorm over its zero-variance channels (``weight / sqrt(eps)``).
"""

from __future__ import annotations

import argparse
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from swp_plugin.pruning import StripePruner
from swp_plugin.testing.contract import contract_input, create_model
from swp_plugin.testing.exactness import randomize_skeletons, unzero_norm_weights

SETUPS = ("contract-old", "mask-first", "no-dead-filters", "unzeroed", "unzeroed+beta", "coherent", "coherent+beta")


def _bn_gain_hooks(model: nn.Module, gains: Dict[str, float]) -> None:
    """Record, per BatchNorm, max over zero-variance channels of max|grad in| / max|grad out|."""
    def hook(name: str):
        def forward_hook(module, inputs, out):
            dead = inputs[0].detach().var(dim=(0, 2, 3), unbiased=False) < 1e-12
            if not dead.any() or not out.requires_grad:
                return
            grads: Dict[str, torch.Tensor] = {}
            out.register_hook(lambda g: grads.__setitem__("out", g.abs().amax(dim=(0, 2, 3))))
            inputs[0].register_hook(lambda g: gains.__setitem__(name, float(
                (g.abs().amax(dim=(0, 2, 3))[dead] / grads["out"][dead].clamp_min(1e-30)).max())))
        return forward_hook
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(hook(name))


def largest_gradient(model_name: str, setup: str) -> Tuple[float, str, float]:
    """(max |grad| over the parameters after backward + regularize, its parameter, largest BatchNorm gain)."""
    torch.manual_seed(0)
    model, x = create_model(model_name), contract_input(64)
    pruner = StripePruner(model, x[:1], ignored_layers=[model.get_classifier()])
    if setup.startswith(("unzeroed", "coherent")):
        unzero_norm_weights(model)
    if setup.endswith("+beta"):
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    bias = m.parametrizations.bias.original if hasattr(m, "parametrizations") and "bias" in \
                        m.parametrizations else m.bias
                    bias.copy_(0.1 * torch.randn(m.num_features, generator=gen))
    coherent = setup.startswith("coherent")
    randomize_skeletons(pruner, dead_stripes=0.5, dead_filters=0.0 if coherent or setup == "no-dead-filters" else 0.3)
    if coherent:
        with torch.no_grad():
            for name, fs in pruner.skeletons.items():
                if name.startswith("stages.2.") and name.endswith(("channel_downsample.c", "conv2.c")):
                    fs[5] = 0
    if setup == "mask-first" or coherent:
        for name in pruner.state.names:
            fs = pruner.state.skeleton(name)
            pruner.state.kill(name, fs.alive & fs.skeleton.ne(0))
    gains: Dict[str, float] = {}
    _bn_gain_hooks(model, gains)
    model.train()
    F.cross_entropy(model(x), torch.arange(x.shape[0]) % 10).backward()
    pruner.regularize(model)
    value, where = max((float(p.grad.abs().max()), n) for n, p in model.named_parameters() if p.grad is not None)
    return value, where, max(gains.values(), default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="repvit_m0_9")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for setup in SETUPS:
        value, where, gain = largest_gradient(args.model, setup)
        print(f"{setup:16s} max|grad| {value:9.2e}  at {where}   largest BN gain {gain:.1f}", flush=True)


if __name__ == "__main__":
    main()

"""Test tooling shipped with the plug-in (used by the tests, the benchmarks and the sanitizer run).

* :mod:`.exactness`: random sparse skeletons, trained-like BatchNorm weights, one regularized step, BatchNorm
  calibration, relative error;
* :mod:`.fuzz`: ``python -m swp_plugin.testing.fuzz``, random ``StripeConv2d`` layers against the masked dense
  convolution, every backend, forward and gradients, in one process;
* :mod:`.loader_fuzz`: ``python -m swp_plugin.testing.loader_fuzz``, random mutations of saved plain, stripe-pruned
  and deployed models: each is refused with a clear error or loads faithfully, in one process;
* :mod:`.sweep`: ``python -m swp_plugin.testing.sweep``, many models pruned and fine-tuned a step in one process.
"""

from .exactness import (
    calibrate_bn,
    outputs_around_step,
    random_stripe_model,
    randomize_skeletons,
    regularized_step,
    rel_err,
    unzero_norm_weights,
)

__all__ = ["calibrate_bn", "outputs_around_step", "random_stripe_model", "randomize_skeletons", "regularized_step",
           "rel_err", "unzero_norm_weights"]

"""Fast stripe-convolution kernels and the backend micro-benchmark of ``StripeConv2d``.

``cpu``: the compiled CPU kernel (built at first use, optional); ``select``: the side-by-side timer.
"""

from . import cpu, select

__all__ = ["cpu", "select"]

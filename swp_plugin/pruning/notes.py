"""What ``StripePruner`` left in place and why, as structured records (``pruner.notes``)."""

from __future__ import annotations

from dataclasses import dataclass

#: a weight-standardised conv was replaced by a plain conv with a standardisation parametrization
STANDARDIZED = "standardized"
#: a channel group was not removed (torch-pruning could not build or prune it exactly); stripes still pruned
CLEANUP_SKIPPED = "cleanup-skipped"
#: a conv was not converted to ``StripeConv2d`` (grouped, or a forward that is not a plain convolution)
KEPT_DENSE = "kept-dense"


@dataclass(frozen=True)
class Note:
    """``kind`` (one of the constants above), the ``layer`` it concerns ('' for the whole model), ``text``."""

    kind: str
    layer: str
    text: str

    def __str__(self) -> str:
        return f"{self.layer}: {self.text}" if self.layer else self.text

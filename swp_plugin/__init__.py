"""swp_plugin: Stripe-Wise Pruning ("Pruning Filter in Filter", NeurIPS 2020) for torch-pruning.

    from swp_plugin import StripePruner, StripeConv2d, StripeImportance, count_ops_and_params
"""

from .deployment import DeployedStripeConv2d, deploy
from .layers import StripeConv2d
from .measure import count_ops_and_params, report
from .persistence import load, save
from .pruning import StripeConvPruningFunc, StripeImportance, StripePruner, customized_pruners, torch_pruning_kwargs
from .skeleton import ChannelMask, FilterSkeleton, attach_skeletons, detach_skeletons

__version__ = "0.1.0"

__all__ = [
    "ChannelMask",
    "DeployedStripeConv2d",
    "FilterSkeleton",
    "StripeConv2d",
    "StripeConvPruningFunc",
    "StripeImportance",
    "StripePruner",
    "attach_skeletons",
    "count_ops_and_params",
    "customized_pruners",
    "deploy",
    "detach_skeletons",
    "load",
    "report",
    "save",
    "torch_pruning_kwargs",
]

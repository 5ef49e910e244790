"""Orchestration on torch-pruning: the pruner, the importance, the pruning function of StripeConv2d."""

from .channels import plan_channel_removal
from .functions import StripeConvPruningFunc, customized_pruners, torch_pruning_kwargs
from .importance import StripeImportance, StripeScores
from .pruner import StripePruner

__all__ = ["StripeConvPruningFunc", "StripeImportance", "StripePruner", "StripeScores", "customized_pruners",
           "plan_channel_removal", "torch_pruning_kwargs"]

"""Deprecated location: use :mod:`swp_plugin.recipes.baselines` (moved with the other example/benchmark recipes)."""

import warnings

from .recipes.baselines import *  # noqa: F401,F403

warnings.warn("swp_plugin.baselines moved to swp_plugin.recipes.baselines; the old name will be removed",
              DeprecationWarning, stacklevel=2)

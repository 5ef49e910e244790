"""Deprecated location: use :mod:`swp_plugin.recipes.training` (moved with the other example/benchmark recipes)."""

import warnings

from .recipes.training import *  # noqa: F401,F403

warnings.warn("swp_plugin.training moved to swp_plugin.recipes.training; the old name will be removed",
              DeprecationWarning, stacklevel=2)

"""Deprecated location: use :mod:`swp_plugin.recipes.continual` (moved with the other example/benchmark recipes)."""

import warnings

from .recipes.continual import *  # noqa: F401,F403

warnings.warn("swp_plugin.continual moved to swp_plugin.recipes.continual; the old name will be removed",
              DeprecationWarning, stacklevel=2)

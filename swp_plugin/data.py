"""Deprecated location: use :mod:`swp_plugin.recipes.data` (moved with the other example/benchmark recipes)."""

import warnings

from .recipes.data import *  # noqa: F401,F403

warnings.warn("swp_plugin.data moved to swp_plugin.recipes.data; the old name will be removed",
              DeprecationWarning, stacklevel=2)

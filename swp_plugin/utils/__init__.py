"""Low-level helpers shared by every subpackage (they import nothing else of swp_plugin)."""

from .modules import copy_model, flat_outputs, probe_inputs, run_model, run_with_hooks, swap_module
from .timeout import time_limit
from .timing import fastest, fastest_in_script, synchronized

__all__ = ["copy_model", "fastest", "fastest_in_script", "flat_outputs", "probe_inputs", "run_model",
           "run_with_hooks", "swap_module", "synchronized", "time_limit"]

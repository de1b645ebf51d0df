"""fxsketch: train PyTorch models in less memory by rewriting their torch.fx graph.

Output. A library call (``optimize``, ``plan``, ``measure``) writes nothing to stdout or stderr
at default settings. What the planner notes and decides goes to the logging module, under the
logger "fxsketch" and its children: "fxsketch.api", each optimize/plan call's one-line summary
and the plan's notes at INFO, every decision at DEBUG; "fxsketch.measurement", each measure()
at INFO; "fxsketch.pipeline" and "fxsketch.calibrate", the stages at DEBUG. The package adds
only a ``NullHandler``, so nothing is shown until the application configures logging, e.g.
``logging.basicConfig(level=logging.INFO)``. The calibration progress bar shows only when
stderr is a terminal (``progress=None``, the default), or always with ``progress=True``.
``warnings.warn`` is kept for what the user must act on; nothing in fxsketch needs it today:
what cannot be done raises (:mod:`fxsketch.errors`), and what the planner chose or could not
measure is a note on the plan (``plan.notes``) and an INFO record.
"""
import logging

from .api import optimize, plan
from .config import Config
from .errors import BudgetError, ConfigError, FxsketchError, InputError, TraceError, UnsupportedError
from .measurement import Measurement, measure
from .ops.aop import reset_aop_memory
from .monitor import NoiseReport, grad_noise
from .report import Decision, MemoryPlan, Option

__all__ = ["optimize", "plan", "measure", "Config", "MemoryPlan", "Decision", "Option", "Measurement", "grad_noise", "NoiseReport",
           "FxsketchError", "BudgetError", "ConfigError", "InputError", "TraceError", "UnsupportedError",
           "reset_aop_memory"]
__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())  # handlers are the application's to add

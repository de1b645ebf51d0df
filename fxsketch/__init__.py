"""fxsketch: train PyTorch models in less memory by rewriting their torch.fx graph."""
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

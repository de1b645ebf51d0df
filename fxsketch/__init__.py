"""fxsketch: train PyTorch models in less memory by rewriting their torch.fx graph."""
from .api import optimize, plan
from .config import Config
from .passes.solve import BudgetError
from .measure import Measurement, measure
from .plan import Decision, MemoryPlan, Option

__all__ = ["optimize", "plan", "measure", "Config", "BudgetError", "Measurement", "MemoryPlan", "Decision", "Option"]
__version__ = "0.1.0"

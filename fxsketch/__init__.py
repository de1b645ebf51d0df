"""fxsketch: train PyTorch models in less memory by rewriting their torch.fx graph."""
from .api import plan
from .measure import Measurement, measure
from .plan import Decision, MemoryPlan, Option

__all__ = ["plan", "measure", "Measurement", "MemoryPlan", "Decision", "Option"]
__version__ = "0.1.0"

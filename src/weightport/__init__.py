"""weightport: convert transformer checkpoints between frameworks, streaming and verified."""

from .api import convert, inspect, plan_conversion, support_matrix
from .errors import WeightportError

__version__ = "0.1.0"
__all__ = ["WeightportError", "convert", "inspect", "plan_conversion", "support_matrix", "__version__"]

"""lokr_diffusers: LoKr (Low-Rank Kronecker product) adapters for diffusers pipelines."""

from .config import LoKrConfig
from .functional import LoKrPlan, factorization, plan_lokr
from .layers import Conv1d, Conv2d, Linear, LoKrLayer
from .model import LoKrModel, lokr_layers
from .pipeline import add_lokr

__version__ = "0.1.0"

__all__ = [
    "Conv1d",
    "Conv2d",
    "Linear",
    "LoKrConfig",
    "LoKrLayer",
    "LoKrModel",
    "LoKrPlan",
    "add_lokr",
    "factorization",
    "lokr_layers",
    "plan_lokr",
]

"""lokr_diffusers: LoKr (Low-Rank Kronecker product) adapters for diffusers pipelines."""

from .config import LoKrConfig
from .convert import convert_lokr_file
from .export import save_lokr_weights
from .functional import LoKrPlan, factorization, plan_lokr
from .hooks import attach as _attach
from .io import lokr_state_dict
from .layers import Conv1d, Conv2d, Linear, LoKrLayer
from .model import LoKrModel, lokr_layers
from .pipeline import add_lokr

_attach()  # pipe.load_lokr_weights & co., and LoKr files through pipe.load_lora_weights

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
    "convert_lokr_file",
    "factorization",
    "lokr_layers",
    "lokr_state_dict",
    "plan_lokr",
    "save_lokr_weights",
]

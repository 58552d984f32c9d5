"""LoKr layers: a wrapper around an nn.Linear / nn.Conv1d / nn.Conv2d `base_layer`.

    adapter.py      one adapter's record (plan, scale, r, alpha, rows, dropout) and PEFT-style views
    base_weight.py  how fused adapters get into the base weight and out: plain or quantized
    base.py         storage and transitions: the adapters, the LayerState, `commit`
    forward.py      the forward dispatcher: merged (W + ΔW, reused at inference) or bypass, per adapter
    linear.py       Linear (with the training Functions), conv.py: Conv1d, Conv2d

Adapters live in ParameterDicts keyed by adapter name, named like PEFT's (`lokr_w1["default"]`);
what is active, fused or disabled is one `state.LayerState` (docs/adapters.md).
"""

from .adapter import Adapter, check_adapter_name
from .base import ForwardMode, LayerCore
from .conv import Conv1d, Conv2d
from .forward import LoKrLayer, Strengths
from .linear import Linear

__all__ = ["Adapter", "Conv1d", "Conv2d", "ForwardMode", "LayerCore", "Linear", "LoKrLayer", "Strengths",
           "check_adapter_name"]

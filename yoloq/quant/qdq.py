"""The deploy-time description of one quantizer, shared by every quantizer type.

pytorch-quantization's TensorQuantizer, PACT and LSQ+ all reduce to this at export time:
y = DQ(Q(x - offset; scale, zero_point)) + offset. TensorRT takes only zero_point == 0 and
offset == None; onnxruntime also takes an integer zero_point.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class QDQSpec:
    scale: torch.Tensor                       # > 0; scalar (per-tensor) or [C] (per-channel)
    axis: Optional[int] = None                # None = per-tensor; channel axis otherwise
    zero_point: Optional[torch.Tensor] = None # int8 zero point (onnxruntime only); None = 0
    offset: Optional[torch.Tensor] = None     # LSQ+ beta, exported as Sub/Add around the Q/DQ
    enabled: bool = True

    def __post_init__(self):
        if not torch.all(self.scale > 0):
            raise ValueError("QDQSpec: every scale must be > 0 (fix dead channels before export)")

"""BitNet backbone: our pre-norm transformer with every linear layer a BitLinear (b1.58).

Same blocks, masks, rotary positions and static KV cache as `TransformerBackbone`; only the linear
layers differ (ternary weights, 8-bit activations, straight-through gradients; see `bitlinear.py`).
BitLinear quantises per token, so step-by-step decoding computes what a full forward computes.
"""
from __future__ import annotations

from typing import Any

from vall_e.models.bitlinear import swap_linear
from vall_e.utils.errors import UserError

from .base import BackboneShape
from .transformer import TransformerBackbone


class BitNetBackbone(TransformerBackbone):
    """`TransformerBackbone` whose attention and FFN linears are BitLinear."""

    def __init__(self, shape: BackboneShape, **options: Any):
        if shape.experts != 1:
            raise UserError(f"model.experts={shape.experts}: the bitnet backbone has no experts; use mixtral or retnet")
        super().__init__(shape, **options)
        self.n_bitlinear = swap_linear(self.layers, "bitnet")

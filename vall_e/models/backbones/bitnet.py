"""BitNet backbone: our pre-norm transformer with every linear layer a BitLinear (b1.58).

Same blocks, masks, rotary positions and static KV cache as `TransformerBackbone`; only the linear
layers differ (ternary weights, 8-bit activations, straight-through gradients; see `bitlinear.py`).
BitLinear quantises per token, so step-by-step decoding computes what a full forward computes.
"""
from __future__ import annotations

from typing import Any

from vall_e.models.bitlinear import swap_linear
from vall_e.utils.errors import UserError

from .transformer import TransformerBackbone


class BitNetBackbone(TransformerBackbone):
    """`TransformerBackbone` whose attention and FFN linears are BitLinear."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_layers: int,
        ffn_mult: int = 4,
        dropout: float = 0.0,
        experts: int = 1,
        max_positions: int = 8192,
        **extra: Any,
    ):
        if experts != 1:
            raise UserError(f"model.experts={experts}: the bitnet backbone has no experts; use mixtral or retnet")
        super().__init__(d_model, n_heads, n_layers, ffn_mult, dropout, experts, max_positions, **extra)
        self.n_bitlinear = swap_linear(self.layers, "bitnet")

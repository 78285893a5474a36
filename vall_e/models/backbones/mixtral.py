"""Mixtral backbone: transformers' `MixtralModel` (sparse MoE, top-2 routing) with our masks.

Same mask, position and cache handling as the Llama backbone (`HFBackbone`). In training mode the
router load-balancing loss (transformers' `load_balancing_loss_func`, counted over real tokens
only, padding excluded) times `router_aux_loss_coef` is returned as `aux_loss`, so `VALLE` only
has to add it to the loss. Attention is full (no sliding window): our sequences are short enough,
and a window would make long prompts silently forget the text.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers import MixtralConfig, MixtralModel
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from .base import BackboneOutput, BackboneShape, Mask
from .llama import HFBackbone


class MixtralBackbone(HFBackbone):
    """transformers' Mixtral: `experts` SwiGLU experts of ffn_mult*d per layer, top-2 (or top-1) routing."""

    def __init__(self, shape: BackboneShape, experts_per_token: int = 2, router_aux_loss_coef: float = 0.001,
                 hidden_act: str = "silu", attn_implementation: str = "sdpa", **extra: Any):
        super().__init__()
        if shape.experts < 1:
            raise ValueError(f"experts must be >= 1, got {shape.experts}")
        self.top_k = min(experts_per_token, shape.experts)
        self.config = self._config(MixtralConfig, shape, hidden_act, attn_implementation,
                                   num_local_experts=shape.experts, num_experts_per_tok=self.top_k,
                                   router_aux_loss_coef=router_aux_loss_coef, sliding_window=None, **extra)
        self.model = MixtralModel(self.config)
        self._finish_init()

    def forward(self, x: Tensor, mask: Mask, cache: Any = None, use_cache: bool = False) -> BackboneOutput:
        S = x.shape[1]
        out, cache = self._run(x, mask, cache, use_cache, output_router_logits=self.training)
        aux = None
        if self.training:
            valid = mask.valid[:, -S:]  # the router saw [B * S] rows, batch-major
            lb = load_balancing_loss_func(
                tuple(out.router_logits), self.config.num_local_experts, self.top_k, valid
            )
            aux = self.config.router_aux_loss_coef * lb
        return BackboneOutput(hidden=out.last_hidden_state, cache=cache, aux_loss=aux)

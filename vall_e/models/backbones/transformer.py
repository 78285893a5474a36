"""Our own pre-norm transformer backbone: fused QKV, `scaled_dot_product_attention`, rotary positions.

Why our own: it is small, has no dependency beyond torch, takes per-sample causal/bidirectional
masks (one batch mixes AR and NAR samples), and decodes incrementally with a static KV cache.

Rotary phases come from `Mask.positions` (the count of valid tokens before each token), so left or
right padding never shifts a sample's positions: a padded batch computes what each sample would
compute alone.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .base import Backbone, BackboneOutput, Mask
from .kv_cache import KVCache


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embeddings (GPT-NeoX "rotate half" layout)."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions Long[B, S] -> cos, sin [B, 1, S, Dh] (broadcast over heads)."""
        angles = positions.float()[..., None] * self.inv_freq.float()  # [B, S, Dh/2]
        angles = torch.cat([angles, angles], dim=-1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i + Dh/2}) of x [B, H, S, Dh] by the position angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None, is_causal: bool,
                cache: KVCache | None, layer_idx: int) -> Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B, H, S, Dh]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, S, D))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, ffn_mult * d_model)
        self.down = nn.Linear(ffn_mult * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.dropout(F.gelu(self.up(x))))


class Block(nn.Module):
    """Pre-norm residual block: x + Attn(LN(x)), then x + FFN(LN(x)), dropout on both branches."""

    def __init__(self, d_model: int, n_heads: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, dropout)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, ffn_mult, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None, is_causal: bool,
                cache: KVCache | None = None, layer_idx: int = 0) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, attn_mask, is_causal, cache, layer_idx))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class TransformerBackbone(Backbone):
    """`n_layers` pre-norm blocks and a final LayerNorm; no embeddings, no head."""

    def __init__(self, d_model: int, n_heads: int, n_layers: int, ffn_mult: int = 4, dropout: float = 0.0,
                 experts: int = 1, max_positions: int = 8192, rope_base: float = 10000.0) -> None:
        super().__init__()
        if experts != 1:
            raise ValueError("the transformer backbone has no mixture of experts (use mixtral or retnet)")
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"d_model {d_model} must split into {n_heads} heads of even size")
        self.d_model, self.n_heads, self.n_layers = d_model, n_heads, n_layers
        self.head_dim = d_model // n_heads
        self.max_positions = max_positions
        self.rotary = RotaryEmbedding(self.head_dim, rope_base)
        self.layers = nn.ModuleList(Block(d_model, n_heads, ffn_mult, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.gradient_checkpointing = False  # set by the trainer: recompute blocks in backward
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02), residual output projections scaled down by sqrt(2 * n_layers)."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * self.n_layers) if name.endswith(("out.weight", "down.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def new_cache(self, batch_size: int, max_length: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        return KVCache(self.n_layers, batch_size, self.n_heads, max_length, self.head_dim, device, dtype)

    def forward(self, x: Tensor, mask: Mask, cache: KVCache | None = None, use_cache: bool = False) -> BackboneOutput:
        """x [B, S, D]; mask.valid [B, past + S] where past = cache.length (0 without a cache)."""
        B, S, _ = x.shape
        if use_cache and cache is None:
            raise ValueError("pass cache=backbone.new_cache(batch, max_length, device, dtype) to decode incrementally")
        past = cache.length if cache is not None else 0
        if mask.valid.shape != (B, past + S):
            raise ValueError(f"mask.valid has shape {tuple(mask.valid.shape)}, expected {(B, past + S)}")

        cos, sin = self.rotary(mask.positions(S), x.dtype)
        attn_mask, is_causal = None, False
        if cache is not None:  # no host sync while decoding: always pass the mask
            attn_mask = mask.attention_bias(S)
        elif not bool(mask.valid.all()):
            attn_mask = mask.attention_bias(S)
        elif bool(mask.causal.all()):
            is_causal = True  # fast path: plain causal, no padding
        elif mask.causal.any():
            attn_mask = mask.attention_bias(S)
        # else: all bidirectional and no padding -> no mask at all

        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, cos, sin, attn_mask, is_causal, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn_mask, is_causal, cache, i)
        if cache is not None:
            cache.advance(S)
        return BackboneOutput(hidden=self.norm(x), cache=cache, aux_loss=None)

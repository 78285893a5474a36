"""The one interface every backbone implements, and the mask/position helpers they share.

A backbone maps input embeddings [B, S, D] to hidden states [B, S, D]. It never sees token ids,
the head or any configuration object: `VALLE` builds the sequence and owns the output head.

Masks are given per sample, so one batch can mix AR samples (causal attention) and NAR samples
(bidirectional attention), with padding anywhere (right padding in training, left padding in
batched inference). Positions are derived from the validity mask, so padding never shifts a
sample's rotary phase: position of a token = number of valid tokens before it.

Incremental decoding: `forward(x, mask, cache)` with `cache` from an earlier call continues the
sequence. `mask.valid` then covers the cached keys plus the new ones ([B, past + S]). A step-by-step
decode must give the same hidden states as one full forward (tests check 1e-4 in fp32).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Mask:
    """Per-sample attention pattern.

    causal: Bool[B]      True = AR sample (causal), False = NAR sample (bidirectional).
    valid:  Bool[B, K]   True = a real token, False = padding, over all keys: K = past + S.
    text:   Bool[B, K]   True = a text (phoneme) token; only backbones with text heads read it.
    block:  Bool[S, S]   a tree of the S new tokens instead of a chain (Medusa's tree verification):
                         block[i, j] = new token j is new token i or one of its ancestors. A causal
                         query sees the cached keys and its ancestors among the new ones, and its
                         position is the valid cached keys plus its valid ancestors. None = a chain.
    """

    causal: Tensor
    valid: Tensor
    text: Tensor | None = None
    text_pos: Tensor | None = None  # Float[B, K]: rotary positions of the text heads (None = the shared ones)
    block: Tensor | None = None

    def positions(self, seq_len: int) -> Tensor:
        """Long[B, seq_len]: positions of the last `seq_len` keys (the current queries)."""
        if self.block is not None:
            past = self.valid[:, :-seq_len].sum(-1, keepdim=True)
            return (past + (self.block[None] & self.valid[:, None, -seq_len:]).sum(-1) - 1).clamp_min(0)
        pos = self.valid.long().cumsum(-1) - 1
        return pos.clamp_min(0)[:, -seq_len:]

    def attention_bias(self, seq_len: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """Bool[B, 1, S, K] `allowed` matrix for the current S queries against all K keys.

        Causal samples see keys at or before their own index; NAR samples see every valid key.
        A padded query row is allowed to see itself so softmax never sees an all-masked row.
        """
        B, K = self.valid.shape
        device = self.valid.device
        q_idx = torch.arange(K - seq_len, K, device=device)[:, None]  # [S, 1]
        k_idx = torch.arange(K, device=device)[None, :]  # [1, K]
        causal_ok = (k_idx <= q_idx)[None]  # [1, S, K]
        if self.block is not None:  # a tree of new tokens: each sees its ancestors among them
            causal_ok = torch.cat([causal_ok[:, :, :K - seq_len], self.block.to(device)[None]], -1)
        allowed = torch.where(self.causal[:, None, None], causal_ok, torch.ones_like(causal_ok))
        allowed = allowed & self.valid[:, None, :]
        allowed = allowed | (q_idx == k_idx)[None]  # every row keeps itself
        return allowed[:, None]

    def text_head_bias(self, seq_len: int) -> Tensor:
        """Bool[B, 1, S, K] `allowed` matrix of the text heads: a text query sees what
        `attention_bias` allows; every other query (prompt, response) sees only the valid text keys.
        A row with nothing allowed (padding, or no text at all) keeps itself."""
        if self.text is None:
            raise ValueError("text heads need mask.text (which tokens are text)")
        B, K = self.valid.shape
        normal = self.attention_bias(seq_len)[:, 0]  # [B, S, K]
        text_keys = (self.text & self.valid)[:, None, :]  # [B, 1, K]
        q_is_text = self.text[:, K - seq_len:, None]  # [B, S, 1]
        allowed = torch.where(q_is_text, normal, text_keys.expand(B, seq_len, K))
        q_idx = torch.arange(K - seq_len, K, device=self.valid.device)[:, None]
        own = (q_idx == torch.arange(K, device=self.valid.device)[None, :])[None]  # [1, S, K]
        allowed = allowed | (own & ~allowed.any(-1, keepdim=True))
        return allowed[:, None]


@dataclass(frozen=True)
class BackboneShape:
    """The arguments every backbone takes; each backbone's own options are keyword arguments beside it.

    d_model: width; n_heads, n_layers; ffn_mult: feed-forward width as a multiple of d_model;
    kv_heads: key/value heads (grouped-query attention; 0 = n_heads, plain multi-head attention);
    dropout (training: on both residual branches and inside the FFN); attention_dropout (training:
    on the attention probabilities, which on the CPU forces attention off its fused kernel: 0 by
    default, as in the reference's transformer); experts: mixture-of-experts count (1 = a plain FFN; backbones without experts
    refuse more); max_positions: the longest sequence (text + prompt + response).
    """

    d_model: int
    n_heads: int
    n_layers: int
    ffn_mult: int = 4
    dropout: float = 0.0
    experts: int = 1
    max_positions: int = 8192
    kv_heads: int = 0
    attention_dropout: float = 0.0


def check_kv_heads(n_heads: int, kv_heads: int, text_heads: int = 0) -> int:
    """The key/value head count (0 = n_heads), checked: it must divide n_heads, and text heads must
    fill whole groups (their keys are rotated by their own positions, so they cannot share a kv head
    with ordinary heads)."""
    kv = kv_heads or n_heads
    if not 1 <= kv <= n_heads or n_heads % kv:
        raise ValueError(f"kv_heads {kv_heads}: must divide n_heads {n_heads}")
    if text_heads % (n_heads // kv):
        raise ValueError(f"text_heads {text_heads} must be a multiple of n_heads / kv_heads = {n_heads // kv}")
    return kv


@dataclass
class BackboneOutput:
    hidden: Tensor  # [B, S, D]
    cache: Any = None  # opaque to callers; pass back in for the next step
    aux_loss: Tensor | None = None  # e.g. MoE router load-balancing loss (already weighted)
    # per layer [B, text_heads, S, N]: the text heads' attention over the first N keys (the text, in
    # training's right-padded layout); only when asked for (guided attention)
    text_attention: list[Tensor] | None = None


class Backbone(nn.Module):
    """Base class: subclasses implement `forward` and `new_cache`."""

    d_model: int

    def forward(self, x: Tensor, mask: Mask, cache: Any = None, use_cache: bool = False) -> BackboneOutput:
        raise NotImplementedError

    def new_cache(self, batch_size: int, max_length: int, device: torch.device, dtype: torch.dtype) -> Any:
        """An empty cache for incremental decoding (preallocated where the backbone can)."""
        raise NotImplementedError

"""RetNet backbone: multi-scale retention (Sun et al. 2023), written here (torchscale pulls a CUDA torch).

Retention of head h with decay gamma_h = 1 - 2^(-5-h), for a query at position n:

    o_n = sum_m  gamma_h^|p_n - p_m| (q_n . k_m) v_m / sqrt(sum_m gamma_h^|p_n - p_m|)

over the keys m the query may see (all earlier valid keys for an AR sample, all valid keys for a NAR
sample), where p are per-sample positions (number of valid tokens before), so padding is invisible.
q and k carry rotary phases of p. Each head's output is layer-normed (no affine), gated by
swish(W_g x) and projected back to d. The 1/sqrt(sum of decays) row normalisation is torchscale's;
it only matters through the group norm's epsilon but keeps magnitudes bounded. torchscale also
divides by max(1, sum |q.k|), which a recurrent form cannot track; it is left out so the parallel and
recurrent forms are exactly the same function (the group norm makes it redundant anyway).

Recurrent form: the state of head h after c valid tokens is
    S = sum_{p_m < c} gamma^(c - p_m) k_m^T v_m  (and the matching scalar sum of decays),
so a new chunk of queries at positions p_n >= c adds gamma^(p_n - c) q_n S to its in-chunk retention.
Every forward is this chunkwise form: without a cache it is the plain parallel form, a prompt goes
in as one chunk (its state is produced for the cache), then one token per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .base import Backbone, BackboneOutput, BackboneShape, Mask
from .transformer import RotaryEmbedding, apply_rotary


@dataclass
class RetNetCache:
    """Recurrent state per layer: `states` [B, H, dk, dv] and `scales` [B, H] (fp32, whatever the
    model's dtype, so long decodes do not accumulate rounding), `length` keys seen (padding included)."""

    states: list[Tensor]
    scales: list[Tensor]
    length: int = 0

    def reorder(self, index: Tensor) -> "RetNetCache":
        """Keep/reorder batch rows (beam search, dropping finished samples): row i <- old row index[i]."""
        self.states = [s.index_select(0, index) for s in self.states]
        self.scales = [s.index_select(0, index) for s in self.scales]
        return self


class MultiScaleRetention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, value_dim: int, rotary_base: float = 10000.0):
        super().__init__()
        if d_model % n_heads or value_dim % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"d_model {d_model} and value dim {value_dim} must split into {n_heads} heads of even size")
        self.h, self.dk, self.dv = n_heads, d_model // n_heads, value_dim // n_heads
        self.rotary = RotaryEmbedding(self.dk, rotary_base)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, value_dim)
        self.g_proj = nn.Linear(d_model, value_dim)
        self.out_proj = nn.Linear(value_dim, d_model)

    def _heads(self, t: Tensor, dim: int) -> Tensor:
        B, S, _ = t.shape
        return t.view(B, S, self.h, dim).transpose(1, 2)

    def forward(
        self,
        x: Tensor,  # [B, S, d]
        pos: Tensor,  # [B, S] long
        allowed: Tensor,  # [B, S, S] bool, in-chunk pattern
        chunk_valid: Tensor,  # [B, S] bool
        past_count: Tensor,  # [B] long: valid tokens in the state
        state: tuple[Tensor, Tensor] | None,  # ([B, H, dk, dv], [B, H]) fp32
        want_state: bool,
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        B, S, _ = x.shape
        cos, sin = self.rotary(pos, x.dtype)
        q = apply_rotary(self._heads(self.q_proj(x), self.dk), cos, sin)
        k = apply_rotary(self._heads(self.k_proj(x), self.dk), cos, sin) * self.dk**-0.5
        v = self._heads(self.v_proj(x), self.dv)
        # log decay per head, made here in fp32: a buffer would be rounded by model.to(bfloat16)
        heads = torch.arange(self.h, device=x.device, dtype=torch.float32)
        lg = torch.log1p(-torch.exp2(-5.0 - heads))[None, :, None]  # [1, H, 1]

        dist = (pos[:, :, None] - pos[:, None, :]).abs().float()  # [B, S, S]
        decay = torch.exp(dist[:, None] * lg[..., None]) * allowed[:, None]  # [B, H, S, S]
        out = ((q @ k.transpose(-1, -2)) * decay.to(q.dtype)) @ v  # [B, H, S, dv]
        den = decay.sum(-1)  # [B, H, S]
        if state is not None:
            S_prev, scale_prev = state
            ahead = (pos - past_count[:, None]).clamp_min(0).float()  # [B, S]
            w = torch.exp(ahead[:, None] * lg)  # [B, H, S]
            out = out + (w[..., None] * (q.float() @ S_prev)).to(out.dtype)
            den = den + w * scale_prev[..., None]
        out = out / den.clamp_min(1e-6).sqrt()[..., None].to(out.dtype)

        new_state = None
        if want_state:
            count = past_count + chunk_valid.sum(-1)  # [B]
            to_end = (count[:, None] - pos).clamp_min(0).float()  # [B, S]
            wk = torch.exp(to_end[:, None] * lg) * chunk_valid[:, None]  # [B, H, S]
            kv = torch.einsum("bhs,bhsk,bhsv->bhkv", wk, k.float(), v.float())
            carry = torch.exp((count - past_count).float()[:, None] * lg[..., 0])  # [B, H]
            if state is None:
                new_state = (kv, wk.sum(-1))
            else:
                new_state = (carry[..., None, None] * state[0] + kv, carry * state[1] + wk.sum(-1))

        out = F.layer_norm(out, (self.dv,))  # group norm: one group per head, no affine
        out = out.transpose(1, 2).reshape(B, S, self.h * self.dv)
        return self.out_proj(F.silu(self.g_proj(x)) * out), new_state


class FeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


class MoEFeedForward(nn.Module):
    """Top-k routed experts with a Switch-style load-balancing loss over valid tokens.

    No capacity limit, so every token is computed whatever the batch holds: padding can never
    change a real token's output, and step-by-step decoding routes exactly like a full forward.
    """

    def __init__(self, d_model: int, hidden: int, dropout: float, experts: int, top_k: int = 2):
        super().__init__()
        self.n_experts, self.top_k = experts, min(top_k, experts)
        self.gate = nn.Linear(d_model, experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(d_model, hidden, dropout) for _ in range(experts))

    def forward(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        B, S, D = x.shape
        flat = x.reshape(-1, D)
        probs = torch.softmax(self.gate(flat).float(), dim=-1)  # [N, E]
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        top_p = top_p / top_p.sum(-1, keepdim=True)
        y = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(top_i == e)
            if tok.numel():
                y.index_add_(0, tok, expert(flat[tok]) * top_p[tok, slot, None].to(flat.dtype))
        m = valid.reshape(-1, 1).float()
        n = m.sum().clamp_min(1.0)
        routed = F.one_hot(top_i, self.n_experts).sum(1).float()  # [N, E]
        frac_tokens = (routed * m).sum(0) / (n * self.top_k)
        frac_probs = (probs * m).sum(0) / n
        aux = self.n_experts * (frac_tokens * frac_probs).sum()  # 1.0 when perfectly balanced
        return y.view(B, S, D), aux


class RetNetLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, value_dim: int, hidden: int, dropout: float, experts: int,
                 top_k: int, rotary_base: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.retention = MultiScaleRetention(d_model, n_heads, value_dim, rotary_base)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = MoEFeedForward(d_model, hidden, dropout, experts, top_k) if experts > 1 else FeedForward(d_model, hidden, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, pos, allowed, chunk_valid, past_count, state, want_state):
        h, new_state = self.retention(self.norm1(x), pos, allowed, chunk_valid, past_count, state, want_state)
        x = x + self.dropout(h)
        aux = None
        if isinstance(self.ffn, MoEFeedForward):
            h, aux = self.ffn(self.norm2(x), chunk_valid)
        else:
            h = self.ffn(self.norm2(x))
        return x + self.dropout(h), new_state, aux


class RetNetBackbone(Backbone):
    """Pre-norm RetNet: `n_layers` x (retention + FFN, or a top-2 MoE FFN when experts > 1), final LayerNorm.

    Options: value_factor (value dim = value_factor * d, default 2), top_k (2), aux_loss_coef (0.001,
    as the reference's XMoE: coef x sum over layers), rotary_base (10000).
    """

    def __init__(self, shape: BackboneShape, value_factor: int = 2, top_k: int = 2, aux_loss_coef: float = 0.001,
                 rotary_base: float = 10000.0):
        super().__init__()
        d_model = shape.d_model
        self.d_model, self.n_heads, self.n_layers = d_model, shape.n_heads, shape.n_layers
        self.value_dim = value_factor * d_model
        self.aux_loss_coef = aux_loss_coef
        self.layers = nn.ModuleList(
            RetNetLayer(d_model, shape.n_heads, self.value_dim, shape.ffn_mult * d_model, shape.dropout, shape.experts,
                        top_k, rotary_base)
            for _ in range(shape.n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.gradient_checkpointing = False  # set by the trainer: recompute layers in backward

    def new_cache(self, batch_size: int, max_length: int, device: torch.device, dtype: torch.dtype) -> RetNetCache:
        """Zero states (the state has a fixed size: max_length is not needed). Kept in fp32."""
        dk, dv = self.d_model // self.n_heads, self.value_dim // self.n_heads
        return RetNetCache(
            states=[torch.zeros(batch_size, self.n_heads, dk, dv, device=device) for _ in self.layers],
            scales=[torch.zeros(batch_size, self.n_heads, device=device) for _ in self.layers],
        )

    def forward(self, x: Tensor, mask: Mask, cache: RetNetCache | None = None, use_cache: bool = False) -> BackboneOutput:
        B, S, _ = x.shape
        K = mask.valid.shape[1]
        past = K - S
        if mask.valid.shape[0] != B or mask.causal.shape[0] != B:
            raise ValueError(f"mask batch {mask.valid.shape[0]} does not match input batch {B}")
        seen = cache.length if cache is not None else 0
        if past != seen:
            raise ValueError(f"mask.valid covers {K} keys; expected past {seen} + new {S}")
        if cache is None and use_cache:
            cache = self.new_cache(B, K, x.device, x.dtype)
        pos = mask.positions(S)
        allowed = mask.attention_bias(S)[:, 0, :, past:]  # [B, S, S]: the chunk's own keys
        chunk_valid = mask.valid[:, past:]
        past_count = mask.valid[:, :past].sum(-1)
        aux_total = None
        for i, layer in enumerate(self.layers):
            state = (cache.states[i], cache.scales[i]) if cache is not None and past > 0 else None
            args = (x, pos, allowed, chunk_valid, past_count, state, cache is not None)
            if self.gradient_checkpointing and self.training and cache is None:
                x, new_state, aux = checkpoint(layer, *args, use_reentrant=False)
            else:
                x, new_state, aux = layer(*args)
            if cache is not None:
                cache.states[i], cache.scales[i] = new_state
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        if cache is not None:
            cache.length = K
        aux_loss = self.aux_loss_coef * aux_total if (aux_total is not None and self.training) else None
        return BackboneOutput(hidden=self.norm(x), cache=cache, aux_loss=aux_loss)

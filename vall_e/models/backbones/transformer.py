"""Our own pre-norm transformer backbone: fused QKV, `scaled_dot_product_attention`, rotary positions.

Why our own: it is small, has no dependency beyond torch, takes per-sample causal/bidirectional
masks (one batch mixes AR and NAR samples), and decodes incrementally with a static KV cache.

Rotary phases come from `Mask.positions` (the count of valid tokens before each token), so left or
right padding never shifts a sample's positions: a padded batch computes what each sample would
compute alone.

Speed (the AR decode step runs once per 13 ms of audio): cos/sin come from a cached table, q and k
are rotated in one pass, the attention mask is turned into an additive bias once per forward (not
in each layer), a one-token step builds its mask from the validity row alone, and eval skips the
dropout calls. A one-token step in eval without autograd takes `_decode_one`, a functional path with
no module calls (optionally a compiled graph, `compile_decode`); a few new tokens on a cache (a Medusa
verification pass) take `_decode_block`, the same structure for several rows. See benchmarks/README.md
for the measurements.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from vall_e.config.model import FFN_KINDS
from vall_e.utils.errors import UserError

from ..rows_linear import decode_linear
from .base import Backbone, BackboneOutput, BackboneShape, Mask, check_kv_heads
from .kv_cache import KVCache


# The one-query decode step's attention backends, in order (set as `decode_backends` on the GPU path):
# a masked single query on cuDNN's attention measured ~45 ms a step on an H100, so it is left out;
# flash takes no mask, so the memory-efficient kernel comes first.
DECODE_SDPA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
# A cached forward of 2..BLOCK_ROWS causal tokens in eval (a Medusa verification pass) takes `_decode_block`.
BLOCK_ROWS = 8
STATIC_CAPACITY_STEP = 256  # a static cache's capacity is rounded up to this: one graph serves many lengths


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embeddings (GPT-NeoX "rotate half" layout).

    `lookup` gathers rows of a table computed once per device and dtype (grown on demand), so a
    decode step does one gather instead of recomputing angles, cos and sin. `forward` computes them
    directly. Both give identical values (the same fp32 product, cos/sin, then the cast).
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions Long[B, S] -> cos, sin [B, 1, S, Dh] (broadcast over heads)."""
        angles = positions.float()[..., None] * self.inv_freq.float()  # [B, S, Dh/2]
        angles = torch.cat([angles, angles], dim=-1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def signed(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Float positions [B, S] -> cos, signed sin [B, S, Dh] (the layout `lookup` returns)."""
        angles = positions.float()[..., None] * self.inv_freq.float()
        return torch.cat([angles.cos(), angles.cos()], -1).to(dtype), torch.cat([-angles.sin(), angles.sin()], -1).to(dtype)

    def lookup(self, positions: Tensor, n_positions: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions Long[B, S], all < n_positions -> cos, signed sin [B, S, Dh] from the cached table.

        The sin half that multiplies -x2 is stored negated, so `rotate` needs no negation or cat.
        """
        key = (positions.device, dtype)
        table = self._tables.get(key)
        if table is None or table[0].shape[0] < n_positions:
            size = max(1024, 1 << (max(1, n_positions) - 1).bit_length())
            cos, sin = self.forward(torch.arange(size, device=positions.device)[None], dtype)
            cos, sin = cos[0, 0], sin[0, 0]
            half = sin.shape[-1] // 2
            table = self._tables[key] = (cos, torch.cat([-sin[:, :half], sin[:, half:]], dim=-1))
        return F.embedding(positions, table[0]), F.embedding(positions, table[1])


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i + Dh/2}) of x [..., Dh] by the position angles (cos/sin broadcast to x)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """`apply_rotary` in three ops: x * cos + roll(x, Dh/2) * signed_sin, where roll(x) = [x2, x1] and
    signed_sin = [-sin, sin] (from `RotaryEmbedding.lookup`): the same products, one op for the rest."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)


class Attention(nn.Module):
    """Multi-head self-attention with rotary positions. The first `text_heads` heads may be given
    their own mask (`text_mask`): in VALL-E, prompt and response tokens read only the text through
    them (see `Mask.text_head_bias`), which hands every frame the phonemes without having to learn
    to pick them out of the audio first.

    kv_heads < n_heads is grouped-query attention: each key/value head serves n_heads / kv_heads
    query heads, so the KV cache (what a batched decode step reads besides the weights) shrinks by
    that factor. The fused projection's rows are [q (n_heads), k (kv_heads), v (kv_heads)] heads."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, text_heads: int = 0, kv_heads: int = 0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.kv_heads = kv_heads or n_heads
        self.head_dim = d_model // n_heads
        self.text_heads = text_heads
        self.qkv = nn.Linear(d_model, d_model + 2 * self.kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None, is_causal: bool,
                cache: KVCache | None, layer_idx: int, text_mask: Tensor | None = None,
                sink: list[Tensor] | None = None, sink_keys: int = 0) -> Tensor:
        """cos/signed sin [B, 1 or H, 1, S, Dh] (see `rotate`); attn_mask an additive float bias [B, 1, S, K] or None.
        text_mask: the text heads' bias [B, 1, S, K]. sink: gets the text heads' attention over the
        first `sink_keys` keys, [B, text_heads, S, sink_keys] (for a guided-attention loss)."""
        B, S, D = x.shape
        H, Hkv, Dh = self.n_heads, self.kv_heads, self.head_dim
        if Hkv == H:
            qkv = self.qkv(x).view(B, S, 3, H, Dh).transpose(1, 3)  # [B, H, 3, S, Dh]
            q, k = rotate(qkv[:, :, :2], cos, sin).unbind(2)  # q and k rotated together
            v = qkv[:, :, 2]
        else:  # grouped: q heads, then kv heads; kv head j serves q heads j*g .. j*g + g - 1
            qkv = self.qkv(x).view(B, S, H + 2 * Hkv, Dh).transpose(1, 2)  # [B, H + 2 Hkv, S, Dh]
            cos, sin = cos[:, :, 0], sin[:, :, 0]  # [B, 1 or H, S, Dh]
            if cos.shape[1] > 1:  # per-head phases (text heads): kv head j rotates like q head j*g
                g = H // Hkv
                cos, sin = torch.cat([cos, cos[:, ::g]], 1), torch.cat([sin, sin[:, ::g]], 1)
            qk = rotate(qkv[:, : H + Hkv], cos, sin)
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv:]
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        p = self.dropout if self.training else 0.0
        gqa = {"enable_gqa": True} if Hkv != H else {}
        if text_mask is None or not self.text_heads:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=p, **gqa)
        else:
            t, tk = self.text_heads, self.text_heads * Hkv // H  # text query heads, and the kv heads they read
            y = torch.cat([
                F.scaled_dot_product_attention(q[:, :t], k[:, :tk], v[:, :tk], attn_mask=text_mask, dropout_p=p, **gqa),
                F.scaled_dot_product_attention(q[:, t:], k[:, tk:], v[:, tk:], attn_mask=attn_mask,
                                               is_causal=is_causal, dropout_p=p, **gqa)], dim=1)
            if sink is not None:
                n = sink_keys
                kt = k[:, :tk, :n].repeat_interleave(H // Hkv, 1) if Hkv != H else k[:, :t, :n]
                scores = q[:, :t] @ kt.transpose(-1, -2) * self.head_dim ** -0.5 + text_mask[..., :n]
                sink.append(scores.softmax(-1).nan_to_num(0.0))
        return self.out(y.transpose(1, 2).reshape(B, S, D))


def gelu_small(x: Tensor) -> Tensor:
    """Exact (erf) GELU in plain elementwise ops, for a decode step's few rows.

    F.gelu sends contiguous fp32 input to oneDNN, whose fixed per-call cost (and an OpenMP region
    that stalls when another process holds the second core) dwarfs the work on a few thousand
    elements; these single-threaded ops cost far less (benchmarks/README.md, "Measurements behind
    code choices"). Equal to F.gelu within float rounding.
    """
    half = x * 0.5
    return torch.addcmul(half, half, torch.erf(x * 0.7071067811865476))


class _SwiGLUDown(torch.autograd.Function):
    """down(dropout(silu(gate) * up)) for training, saving only the gate/up projection and the dropout
    mask: the [.., hidden] product and its activation are recomputed in backward (two elementwise ops)
    instead of being stored, which halves what a SwiGLU FFN keeps per layer for backward (the largest
    share of a training step's activations once attention runs on its fused kernel)."""

    @staticmethod
    def forward(ctx, gate_up: Tensor, weight: Tensor, p: float) -> Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        h = F.silu(gate) * up
        keep = None
        if p > 0:
            keep = torch.empty_like(h, dtype=torch.bool).bernoulli_(1 - p)
            h = h.masked_fill_(~keep, 0.0).mul_(1 / (1 - p))
        ctx.p = p
        ctx.save_for_backward(gate_up, weight, keep)
        return F.linear(h, weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        gate_up, weight, keep = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        # under autocast the forward's product ran in the autocast dtype (the gradient's): so does this
        dh = (grad @ weight.to(grad.dtype)).to(gate_up.dtype)  # [.., hidden]
        grad_w = None
        if ctx.needs_input_grad[1]:
            h = silu * up
            if keep is not None:
                h = h.masked_fill_(~keep, 0.0).mul_(1 / (1 - ctx.p))
            grad_w = (grad.reshape(-1, grad.shape[-1]).t() @ h.reshape(-1, h.shape[-1]).to(grad.dtype)).to(weight.dtype)
        if keep is not None:
            dh = dh.masked_fill_(~keep, 0.0).mul_(1 / (1 - ctx.p))
        d_up = dh * silu
        d_gate = dh.mul_(up).mul_(sig * (1 + gate * (1 - sig)))  # d silu / d gate = sig (1 + gate (1 - sig))
        return torch.cat([d_gate, d_up], dim=-1), grad_w, None


class FeedForward(nn.Module):
    """Position-wise FFN of hidden width ffn_mult * d_model.

    "swiglu" (the default): down(silu(gate(x)) * up(x)), gate and up fused in one matrix, no biases
    (as LLaMA; 12 d^2 parameters, which puts the `full` preset at ~227M like the reference's ~220M).
    "gelu": down(gelu(up(x))), the original transformer's 8 d^2 (the `full` preset is then ~177M).
    """

    def __init__(self, d_model: int, ffn_mult: int, dropout: float, kind: str = "swiglu") -> None:
        super().__init__()
        if kind not in FFN_KINDS:
            raise ValueError(f"ffn {kind!r}: choose one of {', '.join(FFN_KINDS)}")
        self.kind = kind
        hidden = ffn_mult * d_model
        if kind == "swiglu":
            self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
            self.down = nn.Linear(hidden, d_model, bias=False)
        else:
            self.up = nn.Linear(d_model, hidden)
            self.down = nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "swiglu" and torch.is_grad_enabled() and type(self.down) is nn.Linear:
            return _SwiGLUDown.apply(self.gate_up(x), self.down.weight, self.dropout.p if self.training else 0.0)
        if self.kind == "swiglu":
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = self.up(x)
            h = gelu_small(h) if x.shape[1] == 1 else F.gelu(h)  # one-token decode step: see gelu_small
        return self.down(self.dropout(h) if self.training else h)


class Block(nn.Module):
    """Pre-norm residual block: x + Attn(LN(x)), then x + FFN(LN(x)), dropout on both branches."""

    def __init__(self, d_model: int, n_heads: int, ffn_mult: int, dropout: float, ffn: str = "swiglu",
                 text_heads: int = 0, kv_heads: int = 0, attention_dropout: float = 0.0) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, attention_dropout, text_heads, kv_heads)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, ffn_mult, dropout, ffn)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None, is_causal: bool,
                cache: KVCache | None = None, layer_idx: int = 0, text_mask: Tensor | None = None,
                sink: list[Tensor] | None = None, sink_keys: int = 0) -> Tensor:
        h = self.attn(self.attn_norm(x), cos, sin, attn_mask, is_causal, cache, layer_idx, text_mask, sink, sink_keys)
        x = x + (self.dropout(h) if self.training else h)  # eval: skip the no-op dropout calls
        h = self.ffn(self.ffn_norm(x))
        return x + (self.dropout(h) if self.training else h)


class TransformerBackbone(Backbone):
    """`n_layers` pre-norm blocks and a final LayerNorm; no embeddings, no head.

    text_heads: how many heads of every layer are text heads (see `Attention`; needs `mask.text`).
    Set `collect_text_attention` to get their attention over the text in `BackboneOutput` while
    training (for the guided-attention loss), or `report_text_attention` to get it in any mode
    (diagnostics: `VALLE.text_alignment`)."""

    def __init__(self, shape: BackboneShape, rope_base: float = 10000.0, ffn: str = "swiglu",
                 text_heads: int = 0) -> None:
        super().__init__()
        d_model, n_heads, n_layers = shape.d_model, shape.n_heads, shape.n_layers
        if shape.experts != 1:
            raise ValueError("the transformer backbone has no mixture of experts (use mixtral or retnet)")
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"d_model {d_model} must split into {n_heads} heads of even size")
        if not 0 <= text_heads < n_heads:
            raise ValueError(f"text_heads {text_heads}: must be in 0..{n_heads - 1} (n_heads - 1)")
        self.kv_heads = check_kv_heads(n_heads, shape.kv_heads, text_heads)
        self.d_model, self.n_heads, self.n_layers, self.text_heads = d_model, n_heads, n_layers, text_heads
        self.collect_text_attention = False
        self.report_text_attention = False
        self.head_dim = d_model // n_heads
        self.max_positions = shape.max_positions
        self.rotary = RotaryEmbedding(self.head_dim, rope_base)
        self._swap: dict[tuple[torch.device, torch.dtype], Tensor] = {}  # see _rotation
        self._compiled = self._compiled_static = None  # see compile_decode
        self.static_decode = False  # see decode_static
        self.decode_backends: list | None = None  # SDPA backends of the one-query decode step (None = torch's choice)
        self._static_pool: dict[tuple, KVCache] = {}
        self.layers = nn.ModuleList(Block(d_model, n_heads, shape.ffn_mult, shape.dropout, ffn, text_heads, self.kv_heads,
                                          shape.attention_dropout)
                                    for _ in range(n_layers))
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
        """A KV cache of `max_length` slots; with `static_decode` set, the static one (see
        `decode_static`), reused across decodes of the same shape so a captured graph keeps its addresses."""
        if not self.static_decode:
            return KVCache(self.n_layers, batch_size, self.kv_heads, max_length, self.head_dim, device, dtype)
        key = (batch_size, max_length, torch.device(device), dtype)
        cache = self._static_pool.get(key)
        if cache is None:
            if len(self._static_pool) >= 4:  # a few shapes at a time (batch sizes, length buckets)
                self._static_pool.pop(next(iter(self._static_pool)))
            cache = self._static_pool[key] = KVCache(self.n_layers, batch_size, self.kv_heads, max_length,
                                                     self.head_dim, device, dtype, static=True)
        cache.reset()
        return cache

    @staticmethod
    def _bias(allowed: Tensor, dtype: torch.dtype) -> Tensor:
        """Bool `allowed` -> additive bias (0 / -inf) in the activations' dtype, built once per forward:
        given a boolean mask, SDPA converts it again in every layer."""
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))

    def forward(self, x: Tensor, mask: Mask, cache: KVCache | None = None, use_cache: bool = False) -> BackboneOutput:
        """x [B, S, D]; mask.valid [B, past + S] where past = cache.length (0 without a cache)."""
        B, S, _ = x.shape
        if use_cache and cache is None:
            raise ValueError("pass cache=backbone.new_cache(batch, max_length, device, dtype) to decode incrementally")
        past = cache.length if cache is not None else 0
        K = past + S
        if mask.valid.shape != (B, K):
            raise ValueError(f"mask.valid has shape {tuple(mask.valid.shape)}, expected {(B, K)}")
        if self.text_heads and mask.text is None:
            raise ValueError("this backbone has text heads: pass mask.text (which tokens are text)")
        if S == 1 and cache is not None and not (self.training or torch.is_grad_enabled()):
            return self._decode_one(x, mask.valid, cache, mask.text, mask.text_pos)
        if (1 < S <= BLOCK_ROWS and cache is not None and past > 0 and not cache.static
                and not (self.training or torch.is_grad_enabled()) and bool(mask.causal.all())):
            return self._decode_block(x, mask.valid, cache, mask.text, mask.text_pos, mask.block)
        if cache is not None and cache.static and S == 1:
            raise ValueError("a static cache decodes through decode_static (eval, no autograd)")

        if S == 1:  # one new token: its position is the number of valid keys before it
            positions = (mask.valid.sum(-1, keepdim=True) - 1).clamp_min(0)
        else:
            positions = mask.positions(S)
        cos, sin = self.rotary.lookup(positions, K, x.dtype)
        cos, sin = cos[:, None, None], sin[:, None, None]  # [B, 1, 1, S, Dh]: every head, q and k
        if self.text_heads and mask.text_pos is not None:  # the text heads rotate by their own positions
            ct, st = self.rotary.signed(mask.text_pos[:, -S:], x.dtype)
            t, H, Dh = self.text_heads, self.n_heads, self.head_dim
            cos = torch.cat([ct[:, None, None].expand(B, t, 1, S, Dh), cos.expand(B, H - t, 1, S, Dh)], 1)
            sin = torch.cat([st[:, None, None].expand(B, t, 1, S, Dh), sin.expand(B, H - t, 1, S, Dh)], 1)

        attn_mask, is_causal = None, False
        if cache is not None and S == 1:
            # The one query is the last key, so causal and bidirectional agree: it sees every valid
            # key, and always itself. No host sync while decoding: always pass the mask.
            allowed = mask.valid.clone()
            allowed[:, -1] = True
            attn_mask = self._bias(allowed[:, None, None, :], x.dtype)
        elif cache is not None or not bool(mask.valid.all()):
            attn_mask = self._bias(mask.attention_bias(S), x.dtype)
        elif bool(mask.causal.all()):
            is_causal = True  # fast path: plain causal, no padding
        elif mask.causal.any():
            attn_mask = self._bias(mask.attention_bias(S), x.dtype)
        # else: all bidirectional and no padding -> no mask at all
        text_mask = self._bias(mask.text_head_bias(S), x.dtype) if self.text_heads else None
        sink, sink_keys = None, 0
        if self.text_heads and (self.collect_text_attention and self.training or self.report_text_attention):
            sink, sink_keys = [], int(mask.text.sum(-1).max())
        checkpointing = self.gradient_checkpointing and self.training and cache is None
        if checkpointing and sink is not None:
            raise UserError("guided attention does not work with gradient checkpointing yet: turn one of them off")

        for i, layer in enumerate(self.layers):
            if checkpointing:
                x = checkpoint(layer, x, cos, sin, attn_mask, is_causal, None, i, text_mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn_mask, is_causal, cache, i, text_mask, sink, sink_keys)
        if cache is not None:
            cache.advance(S)
        return BackboneOutput(hidden=self.norm(x), cache=cache, aux_loss=None, text_attention=sink)

    # ------------------------------------------------------------------ one-token decode step

    def _rotation(self, positions: Tensor, n_keys: int, dtype: torch.dtype) -> Tensor:
        """positions Long[B] -> R [B, Dh, Dh] with x @ R == rotate(x, cos, signed_sin) at each position.

        R[j, j] = cos[j] and R[(j + Dh/2) % Dh, j] = signed_sin[j], so one batched matmul rotates q and
        k of every head (x_j cos_j + x_{j +- Dh/2} sin_j plus exact zeros: the same value as `rotate`
        up to the rounding of one sum).
        """
        cos, sin = self.rotary.lookup(positions[:, None], n_keys, dtype)  # [B, 1, Dh]
        swap = self._swap.get((positions.device, dtype))
        if swap is None:  # the permutation x -> roll(x, Dh/2) as a matrix
            h = self.head_dim // 2
            eye = torch.eye(self.head_dim, device=positions.device, dtype=dtype)
            swap = self._swap[(positions.device, dtype)] = torch.cat([eye[h:], eye[:h]])
        return torch.diag_embed(cos[:, 0]) + swap * sin

    def _decode_one(self, x: Tensor, valid: Tensor, cache: KVCache, text: Tensor | None = None,
                    text_pos: Tensor | None = None) -> BackboneOutput:
        """One new token per sample against the cache, in eval without autograd: what `forward` computes.

        Why a separate path: a decode step does little arithmetic per op (one row per sample), so
        its time is dominated by per-op and per-module-call cost. This path calls the functional ops
        directly (no nn.Module calls for norms and plain linears), rotates q and k with one batched
        matmul, skips the [B, S, H, Dh] transposes (S = 1), and builds the positions, rotation and
        attention bias once for all layers. Tests check it against the full forward (1e-4, fp32).
        With `compile_decode`, the layers run as one compiled graph.
        """
        start = cache.length
        K = start + 1
        if K > cache.max_length:
            raise RuntimeError(f"KV cache full: {K} positions needed, capacity {cache.max_length}")
        positions = (valid.sum(-1) - 1).clamp_min(0)  # the number of valid keys before the new token
        rot = self._rotation(positions, K, x.dtype)
        # The one query is the last key, so causal and bidirectional agree: it sees every valid key
        # and always itself. No host sync while decoding: the bias is always passed.
        allowed = valid.clone()
        allowed[:, -1] = True
        bias = self._bias(allowed[:, None, None, :], x.dtype)
        if self.text_heads:  # the new token is not text: its text heads see the valid text keys only
            text_keys = text & valid
            text_keys[:, -1] |= ~text_keys.any(-1)
            t = self.text_heads
            B = x.shape[0]
            bias = torch.cat([self._bias(text_keys[:, None, None, :], x.dtype).expand(B, t, 1, K),
                              bias.expand(B, self.n_heads - t, 1, K)], dim=1)  # [B, H, 1, K]
        layers = self._decode_layers if self._compiled is None else self._compiled
        rot_t = None
        if self.text_heads and text_pos is not None:
            ct, st = self.rotary.signed(text_pos[:, -1:], x.dtype)  # [B, 1, Dh]
            rot_t = torch.diag_embed(ct[:, 0]) + self._swap[(x.device, x.dtype)] * st
        hidden = layers(x, rot, bias, cache.k_layers, cache.v_layers, start, rot_t)
        cache.advance(1)
        return BackboneOutput(hidden=hidden, cache=cache, aux_loss=None)

    def _decode_layers(self, x: Tensor, rot: Tensor, bias: Tensor, k_layers: list[Tensor], v_layers: list[Tensor],
                       start: int | Tensor, rot_t: Tensor | None = None) -> Tensor:
        """The blocks and the final norm for one token: x [B, 1, D], rot [B, Dh, Dh], bias [B, 1 or H, 1, start + 1],
        each layer's cache [B, Hkv, capacity, Dh] (slot `start` is written here). `start` as a Long[1]
        tensor is the static step: the bias spans the whole capacity and every shape is fixed."""
        B, _, D = x.shape
        H, Hkv, Dh = self.n_heads, self.kv_heads, self.head_dim
        g = H // Hkv  # query heads per kv head: the group's queries are one head's query rows
        if bias.shape[1] > 1:
            bias = bias.view(B, Hkv, g, bias.shape[-1])
        x = x.view(B, D)  # one row per sample: 2-D products skip matmul's reshapes
        for i, layer in enumerate(self.layers):
            attn = layer.attn
            qkv, qk = self._decode_qkv(layer, x, rot, rot_t)
            k_cache, v_cache = k_layers[i], v_layers[i]
            if isinstance(start, Tensor):  # static: write at the device-side slot, attend over every slot
                k_cache.index_copy_(2, start, qk[:, H:, None])
                v_cache.index_copy_(2, start, qkv[:, H + Hkv:, None])
                keys, values = k_cache, v_cache
            else:
                k_cache.narrow(2, start, 1).copy_(qk[:, H:, None])
                v_cache.narrow(2, start, 1).copy_(qkv[:, H + Hkv:, None])
                keys, values = k_cache.narrow(2, 0, start + 1), v_cache.narrow(2, 0, start + 1)
            y = F.scaled_dot_product_attention(qk[:, :H].view(B, Hkv, g, Dh), keys, values,
                                               attn_mask=bias)  # [B, Hkv, g, Dh]
            x = x + decode_linear(attn.out, y.reshape(B, D))
            h = _norm(layer.ffn_norm, x)
            x = x + (_ffn(layer.ffn, h) if type(layer.ffn) is FeedForward else layer.ffn(h[:, None])[:, 0])
        return _norm(self.norm, x)[:, None]

    # ------------------------------------------------------------------ a few-token decode block

    def _decode_block(self, x: Tensor, valid: Tensor, cache: KVCache, text: Tensor | None = None,
                      text_pos: Tensor | None = None, tree: Tensor | None = None) -> BackboneOutput:
        """P (2..BLOCK_ROWS) new causal tokens per sample against the cache, in eval without autograd:
        what `forward` computes, for a Medusa verification pass (speculative.py).

        Why: through `forward` such a pass cost 2-4x a one-token step (benchmarks/README.md, "Medusa
        decoding"); a pass must cost little more than a step to gain anything. This is `_decode_one`'s
        structure for B * P rows: functional ops, rotary by one batched matmul from the cached table,
        the masks built once for all layers (the cached keys' validity row, causal only within the
        block), and the batched-rows linears of `decode_linear`. x [B, P, D]; valid [B, past + P].
        Tests check it against the full forward (1e-5, fp32). `tree` (`Mask.block`): the P tokens are
        a tree, each seeing its ancestors among them (Medusa's tree verification), not a chain.
        """
        B, P, _ = x.shape
        start = cache.length
        K = start + P
        if K > cache.max_length:
            raise RuntimeError(f"KV cache full: {K} positions needed, capacity {cache.max_length}")
        dev = x.device
        if tree is None:
            block = torch.ones(P, P, dtype=torch.bool, device=dev).tril_()  # query j sees block keys <= j
            # positions: the number of valid keys before each new token
            positions = (valid[:, :start].sum(-1, keepdim=True) + valid[:, start:].long().cumsum(-1) - 1).clamp_min(0)
        else:  # a tree: query j sees its ancestors; its position counts the valid ones
            block = tree.to(dev)
            positions = (valid[:, :start].sum(-1, keepdim=True) + (block[None] & valid[:, None, start:]).sum(-1) - 1
                         ).clamp_min(0)
        rot = self._rotation(positions.reshape(B * P), K, x.dtype)  # [B * P, Dh, Dh]
        allowed = valid[:, None, :].expand(B, P, K).clone()  # [B, P, K]
        allowed[:, :, start:] = (allowed[:, :, start:] | torch.eye(P, dtype=torch.bool, device=dev)) & block
        bias = self._bias(allowed[:, None], x.dtype)  # [B, 1, P, K]
        rot_t = None
        if self.text_heads:  # the new tokens are not text: their text heads see the valid text keys only
            text_keys = (text & valid)[:, None, :].expand(B, P, K).clone()
            none = ~text_keys[:, 0].any(-1)  # no text at all: a row keeps itself
            text_keys[:, :, start:] |= none[:, None, None] & torch.eye(P, dtype=torch.bool, device=dev)
            t = self.text_heads
            bias = torch.cat([self._bias(text_keys[:, None], x.dtype).expand(B, t, P, K),
                              bias.expand(B, self.n_heads - t, P, K)], dim=1)  # [B, H, P, K]
            if text_pos is not None:
                ct, st = self.rotary.signed(text_pos[:, -P:].reshape(B * P, 1), x.dtype)  # [B * P, 1, Dh]
                rot_t = torch.diag_embed(ct[:, 0]) + self._swap[(dev, x.dtype)] * st
        g = self.n_heads // self.kv_heads  # a kv head's g query heads as g * P query rows
        if bias.shape[1] == 1:
            bias = bias.repeat(1, 1, g, 1) if g > 1 else bias
        else:
            bias = bias.reshape(B, self.kv_heads, g * P, K)
        hidden = self._block_layers(x, rot, bias, cache.k_layers, cache.v_layers, start, rot_t)
        cache.advance(P)
        return BackboneOutput(hidden=hidden, cache=cache, aux_loss=None)

    def _decode_qkv(self, layer: nn.Module, x: Tensor, rot: Tensor, rot_t: Tensor | None) -> tuple[Tensor, Tensor]:
        """One layer's projections for N decode rows x [N, D]: qkv [N, H + 2 Hkv, Dh] and the rotated q and k
        of every head [N, H + Hkv, Dh] (the text heads' queries rotated by their own positions)."""
        H, Hkv = self.n_heads, self.kv_heads
        qkv = decode_linear(layer.attn.qkv, _norm(layer.attn_norm, x)).view(x.shape[0], H + 2 * Hkv, self.head_dim)
        qk = torch.bmm(qkv[:, : H + Hkv], rot)
        if rot_t is not None:
            t = self.text_heads
            qk = torch.cat([torch.bmm(qkv[:, :t], rot_t), qk[:, t:]], 1)
        return qkv, qk

    def _block_layers(self, x: Tensor, rot: Tensor, bias: Tensor, k_layers: list[Tensor], v_layers: list[Tensor],
                      start: int, rot_t: Tensor | None = None) -> Tensor:
        """The blocks and the final norm for P tokens: x [B, P, D], rot [B * P, Dh, Dh], bias
        [B, 1 or Hkv, g * P, start + P] (g = n_heads / kv_heads query rows per kv head, head-major),
        each layer's cache [B, Hkv, capacity, Dh] (slots start .. start + P - 1 are written here)."""
        B, P, D = x.shape
        H, Hkv, Dh = self.n_heads, self.kv_heads, self.head_dim
        N, K = B * P, start + P
        x = x.reshape(N, D)  # one row per token: 2-D products, the batched-rows linears
        for i, layer in enumerate(self.layers):
            attn = layer.attn
            qkv, qk = self._decode_qkv(layer, x, rot, rot_t)
            k_cache, v_cache = k_layers[i], v_layers[i]
            k_cache.narrow(2, start, P).copy_(qk[:, H:].view(B, P, Hkv, Dh).transpose(1, 2))
            v_cache.narrow(2, start, P).copy_(qkv[:, H + Hkv:].view(B, P, Hkv, Dh).transpose(1, 2))
            q = qk[:, :H].view(B, P, H, Dh).transpose(1, 2).reshape(B, Hkv, -1, Dh)  # [B, Hkv, g * P, Dh]
            y = F.scaled_dot_product_attention(q, k_cache.narrow(2, 0, K), v_cache.narrow(2, 0, K), attn_mask=bias)
            x = x + decode_linear(attn.out, y.view(B, H, P, Dh).transpose(1, 2).reshape(N, D))
            h = _norm(layer.ffn_norm, x)
            x = x + (_ffn(layer.ffn, h) if type(layer.ffn) is FeedForward else layer.ffn(h[:, None])[:, 0])
        return _norm(self.norm, x).view(B, P, D)

    @staticmethod
    def static_capacity(n: int) -> int:
        """The static cache's capacity for `n` positions: rounded up to STATIC_CAPACITY_STEP."""
        return -(-n // STATIC_CAPACITY_STEP) * STATIC_CAPACITY_STEP

    def decode_static(self, x: Tensor, valid: Tensor, cache: KVCache, text: Tensor | None = None,
                      text_pos: Tensor | None = None) -> BackboneOutput:
        """The GPU decode path's step (as in gpt-fast): one new token per sample against a static
        cache, with every shape fixed by the cache's capacity and no host value that changes per step,
        so `compile_decode(static=True, mode="reduce-overhead")` can capture it as one CUDA graph.

        x [B, 1, D]; valid, text Bool[B, capacity] and text_pos Float[B, capacity] over every slot
        (the new token's slot, `cache.slot`, already filled in; later slots are not valid). Keys past
        the filled ones are masked, not sliced, so attention reads the whole capacity: cheap on a GPU,
        and what makes the step one fixed graph. Gives what `_decode_one` gives (tests: greedy codes equal).
        """
        if not cache.static:
            raise ValueError("decode_static needs a static cache (set static_decode before new_cache)")
        C, slot = cache.max_length, cache.slot
        if valid.shape[1] != C:
            raise ValueError(f"valid covers {valid.shape[1]} slots; the static cache has {C}")
        if cache.length >= C:
            raise RuntimeError(f"KV cache full: {cache.length + 1} positions needed, capacity {C}")
        own = torch.arange(C, device=x.device)[None] == slot  # [1, C]: the new token's slot
        positions = (valid.sum(-1) - 1).clamp_min(0)
        rot = self._rotation(positions, C, x.dtype)
        bias = self._bias((valid | own)[:, None, None, :], x.dtype)
        rot_t = None
        if self.text_heads:
            text_keys = text & valid
            text_keys = text_keys | (own & ~text_keys.any(-1, keepdim=True))
            B, t = x.shape[0], self.text_heads
            bias = torch.cat([self._bias(text_keys[:, None, None, :], x.dtype).expand(B, t, 1, C),
                              bias.expand(B, self.n_heads - t, 1, C)], dim=1)
            if text_pos is not None:
                ct, st = self.rotary.signed(text_pos.index_select(1, slot), x.dtype)  # [B, 1, Dh]
                rot_t = torch.diag_embed(ct[:, 0]) + self._swap[(x.device, x.dtype)] * st
        layers = self._decode_layers if self._compiled_static is None else self._compiled_static
        if self.decode_backends is None:
            hidden = layers(x, rot, bias, cache.k_layers, cache.v_layers, slot, rot_t)
        else:
            with sdpa_kernel(self.decode_backends):
                hidden = layers(x, rot, bias, cache.k_layers, cache.v_layers, slot, rot_t)
        cache.advance(1)
        return BackboneOutput(hidden=hidden, cache=cache, aux_loss=None)

    def compile_decode(self, static: bool = False, **options) -> None:
        """Run the one-token decode step's layers as a `torch.compile`d graph (keyword options go to
        torch.compile). Dynamic shapes, so one graph serves every cache length; on the CPU inductor's
        C++ wrapper, which saves the Python wrapper's per-kernel cost, a large share of a small model's
        step (benchmarks/README.md, "Measurements behind code choices"). The KV cache keeps each layer
        in its own buffer, so the compiled graph writes the new key and value in place. The first
        steps compile (minutes on a small CPU).

        With `static=True` it compiles the static step (`decode_static`) instead, with fixed shapes
        (one graph per batch size and capacity bucket), and sets `static_decode`; on a GPU pass
        `mode="reduce-overhead"` to capture it as a CUDA graph."""
        if static:
            self.static_decode = True
            options.setdefault("dynamic", False)
            self._compiled_static = torch.compile(self._decode_layers, **options)
            return
        options.setdefault("dynamic", True)
        if next(self.parameters()).device.type == "cpu":
            options["options"] = {"cpp_wrapper": True, **options.get("options", {})}
        self._compiled = torch.compile(self._decode_layers, **options)


def _norm(m: nn.Module, x: Tensor) -> Tensor:
    return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps) if type(m) is nn.LayerNorm else m(x)


def _ffn(m: FeedForward, x: Tensor) -> Tensor:
    """FeedForward.forward in eval for a decode step's rows, without the module calls."""
    if m.kind == "swiglu":
        gate, up = decode_linear(m.gate_up, x).chunk(2, dim=-1)
        return decode_linear(m.down, F.silu(gate).mul_(up))
    return decode_linear(m.down, gelu_small(decode_linear(m.up, x)))

"""Llama backbone: transformers' `LlamaModel` driven with embeddings, per-sample masks and positions.

transformers builds a causal mask itself unless it is handed a ready 4D mask, which it then uses
as-is (`masking_utils._preprocess_mask_arguments`). We always hand it one, built from `Mask`: causal
rows for AR samples, full rows for NAR samples, padding keys hidden. Positions come from
`Mask.positions`, so left or right padding never shifts a sample's rotary phase.

Caches: `new_cache` gives a transformers `StaticCache` (preallocated); with `use_cache=True` and no
cache a `DynamicCache` is created. With a static cache the keys span `max_cache_len`, so the mask is
padded with "not allowed" up to that length.

`HFBackbone` is shared with the Mixtral backbone.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache, LlamaConfig, LlamaModel, StaticCache
from transformers.cache_utils import Cache

from vall_e.utils.errors import UserError

from .base import Backbone, BackboneOutput, BackboneShape, Mask, check_kv_heads

_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
_ATTN = ("sdpa", "eager")


_LENGTH = "vall_e_length"  # keys held, kept on the cache as a Python int: no device sync per step


def _cache_length(cache: Cache) -> int:
    n = getattr(cache, _LENGTH, None)
    if n is None:  # a cache we did not create: ask it (a static cache answers with a tensor)
        n = cache.get_seq_length()
        n = int(n.item()) if isinstance(n, Tensor) else int(n)
    return n


class HFBackbone(Backbone):
    """Common driver for transformers decoder models (`model(inputs_embeds=..., attention_mask=4D)`)."""

    model: nn.Module
    config: Any

    def _config(self, config_cls: type, shape: BackboneShape, hidden_act: str, attn_implementation: str,
                **extra: Any) -> Any:
        """A transformers decoder config for `shape`: no vocabulary (we pass embeddings), our rotary
        settings, no special tokens, no cache of its own; `extra` adds the model's own fields."""
        if attn_implementation not in _ATTN:
            raise ValueError(f"attn_implementation must be one of {_ATTN}, got {attn_implementation!r}")
        self.d_model = shape.d_model
        return config_cls(
            vocab_size=1,
            hidden_size=shape.d_model,
            intermediate_size=shape.ffn_mult * shape.d_model,
            num_hidden_layers=shape.n_layers,
            num_attention_heads=shape.n_heads,
            num_key_value_heads=check_kv_heads(shape.n_heads, shape.kv_heads),
            hidden_act=hidden_act,
            max_position_embeddings=shape.max_positions,
            attention_dropout=shape.attention_dropout,
            rope_parameters=dict(_ROPE),
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            use_cache=False,
            attn_implementation=attn_implementation,
            **extra,
        )

    def _finish_init(self) -> None:
        # The word embedding is never used (we pass inputs_embeds); drop it so no parameter goes
        # without a gradient (DDP would complain) and no memory is spent on it.
        self.model.embed_tokens = None

    @property
    def gradient_checkpointing(self) -> bool:
        """Recompute each layer in backward (set by the trainer, like TransformerBackbone's flag)."""
        return self.model.is_activation_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            self.model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            self.model.activation_checkpointing_disable()

    def _attention_mask(self, mask: Mask, seq_len: int, kv_len: int, dtype: torch.dtype) -> Tensor:
        allowed = mask.attention_bias(seq_len)  # [B, 1, S, past + S]
        if kv_len > allowed.shape[-1]:  # static cache: keys span the whole buffer
            allowed = nn.functional.pad(allowed, (0, kv_len - allowed.shape[-1]), value=False)
        if self.config._attn_implementation == "sdpa":
            return allowed  # boolean, True = may attend
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    def _run(self, x: Tensor, mask: Mask, cache: Any, use_cache: bool, **kwargs) -> tuple[Any, Any]:
        B, S, _ = x.shape
        if mask.valid.shape[0] != B or mask.causal.shape[0] != B:
            raise ValueError(f"mask batch {mask.valid.shape[0]} does not match input batch {B}")
        if cache is None and use_cache:
            cache = _dynamic_cache(self.config)
            setattr(cache, _LENGTH, 0)
        past = _cache_length(cache) if cache is not None else 0
        if mask.valid.shape[1] != past + S:
            raise ValueError(f"mask.valid covers {mask.valid.shape[1]} keys; expected past {past} + new {S}")
        kv_len = past + S
        if cache is not None and isinstance(cache, StaticCache):  # keys span the whole buffer
            kv_len = int(cache.get_mask_sizes(S, 0)[0])
            if kv_len < past + S:
                raise ValueError(f"the cache holds {kv_len} positions; {past + S} are needed")
        attn = self._attention_mask(mask, S, kv_len, x.dtype)
        out = self.model(
            inputs_embeds=x,
            attention_mask=attn,
            position_ids=mask.positions(S),
            use_cache=cache is not None,
            **{_CACHE_KWARG: cache},
            **kwargs,
        )
        if cache is not None:
            setattr(cache, _LENGTH, past + S)
        return out, cache

    def new_cache(self, batch_size: int, max_length: int, device: torch.device, dtype: torch.dtype) -> Any:
        # A DynamicCache: transformers' StaticCache changed its key-length semantics between 5.x
        # releases (seen on 5.17 vs 5.24), and our masks must match the keys exactly.
        cache = _dynamic_cache(self.config)
        setattr(cache, _LENGTH, 0)
        return cache


def _dynamic_cache(config: Any) -> DynamicCache:
    try:
        return DynamicCache(config=config)
    except TypeError:  # older 5.x
        return DynamicCache()


# transformers renamed the model's cache argument within 5.x: pass it under the name it takes
_CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


class LlamaBackbone(HFBackbone):
    """transformers' Llama (RMSNorm, rotary, gated MLP of ffn_mult*d) with our masks."""

    def __init__(self, shape: BackboneShape, hidden_act: str = "gelu", attn_implementation: str = "sdpa",
                 **extra: Any):
        super().__init__()
        if shape.experts > 1:
            raise UserError(f"model.experts={shape.experts}: the llama backbone has no experts; use backbone mixtral")
        self.config = self._config(LlamaConfig, shape, hidden_act, attn_implementation, **extra)
        self.model = LlamaModel(self.config)
        self._finish_init()

    def forward(self, x: Tensor, mask: Mask, cache: Any = None, use_cache: bool = False) -> BackboneOutput:
        out, cache = self._run(x, mask, cache, use_cache)
        return BackboneOutput(hidden=out.last_hidden_state, cache=cache, aux_loss=None)

"""A static, preallocated key/value cache for incremental decoding with any attention backbone.

Why static: the AR decoder emits one token per step for hundreds of steps. Growing tensors with
`torch.cat` reallocates and copies the whole cache every step (quadratic traffic); a buffer
allocated once at the full length is written in place, so a step only touches the new slot.

Layout (all layers in one allocation):

    k, v: [n_layers, B, H, max_length, Dh]     one layer's view is [B, H, max_length, Dh]
    length: int                                  slots [0, length) hold valid keys

All samples share `length` (batched inference left-pads prompts so they end at the same slot;
which slots are padding is the attention mask's business, not the cache's).

Use from a backbone's forward, for the S new positions of this call:

    k_all, v_all = cache.update(layer_idx, k_new, v_new)   # writes at [length, length + S)
    ...attend with k_all, v_all  ([B, H, length + S, Dh] views, no copy)...
    cache.advance(S)                                        # once, after the last layer
"""
from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Per-layer key/value buffers of a fixed capacity, written in place.

    per_layer=True keeps each layer in its own allocation instead of one [n_layers, ...] tensor (a
    compiled decode step can only write a graph input in place when no other input aliases it);
    `k`/`v` then return stacked copies, and assigning them replaces every layer's buffer.
    """

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, max_length: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 per_layer: bool = False) -> None:
        self.per_layer = per_layer
        if per_layer:
            shape = (batch_size, n_heads, max_length, head_dim)
            self._k_layers = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
            self._v_layers = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        else:
            shape = (n_layers, batch_size, n_heads, max_length, head_dim)
            self.k = torch.zeros(shape, device=device, dtype=dtype)
            self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    # Per-layer views are made once per buffer (not per step): indexing `k[layer, :, :, a:b]` in every
    # layer of every step costs several tensor ops, a narrow of a stored view costs one.
    @property
    def k(self) -> Tensor:
        return torch.stack(self._k_layers) if self.per_layer else self._k

    @k.setter
    def k(self, value: Tensor) -> None:  # also when a caller reorders the buffer itself
        self._k = value
        self._k_layers = [value[i].clone() if self.per_layer else value[i] for i in range(value.shape[0])]

    @property
    def v(self) -> Tensor:
        return torch.stack(self._v_layers) if self.per_layer else self._v

    @v.setter
    def v(self, value: Tensor) -> None:
        self._v = value
        self._v_layers = [value[i].clone() if self.per_layer else value[i] for i in range(value.shape[0])]

    @property
    def k_layers(self) -> list[Tensor]:
        """Each layer's key buffer [B, H, max_length, Dh] (views of `k` unless per_layer)."""
        return self._k_layers

    @property
    def v_layers(self) -> list[Tensor]:
        return self._v_layers

    @property
    def max_length(self) -> int:
        return self._k_layers[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self._k_layers[0].shape[0]

    def update(self, layer: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Write `k_new`, `v_new` [B, H, S, Dh] at slots [length, length + S) of `layer`.

        Returns views of that layer's keys and values over [0, length + S). `length` is not moved:
        call `advance(S)` once every layer has been updated.
        """
        start, n = self.length, k_new.shape[2]
        if start + n > self.max_length:
            raise RuntimeError(f"KV cache full: {start + n} positions needed, capacity {self.max_length}")
        k, v = self._k_layers[layer], self._v_layers[layer]
        k.narrow(2, start, n).copy_(k_new)
        v.narrow(2, start, n).copy_(v_new)
        return k.narrow(2, 0, start + n), v.narrow(2, 0, start + n)

    def advance(self, n: int) -> None:
        """Mark `n` more slots as filled (after all layers were updated for this call)."""
        self.length += n

    def reorder(self, index: Tensor) -> None:
        """Keep/reorder batch rows (e.g. drop finished samples): row i becomes old row index[i]."""
        if self.per_layer:
            self._k_layers = [k.index_select(0, index) for k in self._k_layers]
            self._v_layers = [v.index_select(0, index) for v in self._v_layers]
        else:
            self.k = self.k.index_select(1, index)
            self.v = self.v.index_select(1, index)

    def reset(self) -> None:
        """Forget the contents (no reallocation); the buffers can be reused for a new prompt."""
        self.length = 0

"""A static, preallocated key/value cache for incremental decoding with any attention backbone.

Why static: the AR decoder emits one token per step for hundreds of steps. Growing tensors with
`torch.cat` reallocates and copies the whole cache every step (quadratic traffic); a buffer
allocated once at the full length is written in place, so a step only touches the new slot.

Layout: one key and one value buffer per layer,

    k_layers[i], v_layers[i]: [B, H, max_length, Dh]
    length: int                 slots [0, length) hold valid keys

Each layer has its own allocation (not views of one [n_layers, ...] tensor): a compiled decode step
can only write a graph input in place when no other input aliases it. All samples share `length`
(batched inference left-pads prompts so they end at the same slot; which slots are padding is the
attention mask's business, not the cache's).

`static=True` is the GPU decode path's cache (as in gpt-fast): the buffers are marked as static
addresses for torch.compile, so a decode step captured as a CUDA graph may write them in place, and
the write position is also kept on the device (`slot`, advanced in place), so a step needs no host
value that changes from step to step. `TransformerBackbone.decode_static` uses it.

Use from a backbone's forward, for the S new positions of this call:

    k_all, v_all = cache.update(layer_idx, k_new, v_new)   # writes at [length, length + S)
    ...attend with k_all, v_all  ([B, H, length + S, Dh] views, no copy)...
    cache.advance(S)                                        # once, after the last layer
"""
from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Per-layer key/value buffers of a fixed capacity, written in place."""

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, max_length: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 static: bool = False) -> None:
        shape = (batch_size, n_heads, max_length, head_dim)
        self.k_layers = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v_layers = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.length = 0
        self.static = static
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # == length, on the device
        if static:
            for t in self.k_layers + self.v_layers + [self.slot]:
                torch._dynamo.mark_static_address(t)

    @property
    def max_length(self) -> int:
        return self.k_layers[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.k_layers[0].shape[0]

    def update(self, layer: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Write `k_new`, `v_new` [B, H, S, Dh] at slots [length, length + S) of `layer`.

        Returns views of that layer's keys and values over [0, length + S). `length` is not moved:
        call `advance(S)` once every layer has been updated.
        """
        start, n = self.length, k_new.shape[2]
        if start + n > self.max_length:
            raise RuntimeError(f"KV cache full: {start + n} positions needed, capacity {self.max_length}")
        k, v = self.k_layers[layer], self.v_layers[layer]
        k.narrow(2, start, n).copy_(k_new)
        v.narrow(2, start, n).copy_(v_new)
        return k.narrow(2, 0, start + n), v.narrow(2, 0, start + n)

    def advance(self, n: int) -> None:
        """Mark `n` more slots as filled (after all layers were updated for this call)."""
        self.length += n
        if self.static:
            self.slot.add_(n)  # in place on the device: no host sync

    def reorder(self, index: Tensor) -> None:
        """Keep/reorder batch rows (e.g. beam search, dropping finished samples): row i becomes old row index[i]."""
        self.k_layers = [k.index_select(0, index) for k in self.k_layers]
        self.v_layers = [v.index_select(0, index) for v in self.v_layers]

    def reset(self) -> None:
        """Forget the contents (no reallocation); the buffers can be reused for a new prompt."""
        self.length = 0
        self.slot.zero_()

"""The `Codec` interface: audio <-> discrete codes [T, L], and a registry to build one from a spec.

Every codec (EnCodec through transformers, the offline WORLD codec, ...) exposes the same token
layout constants so the model never depends on which one produced its data.
"""
from __future__ import annotations

import abc
from typing import Any, Callable

from torch import Tensor


class Codec(abc.ABC):
    """Turns mono float audio at `sample_rate` into codes [T, n_levels] (values < n_codes) and back."""

    name: str = ""
    sample_rate: int = 24_000
    frame_rate: float = 75.0
    n_levels: int = 8
    n_codes: int = 1024

    @abc.abstractmethod
    def encode(self, wav: Tensor) -> Tensor:
        """wav: float32 [samples] at `sample_rate` -> LongTensor [T, n_levels]."""

    @abc.abstractmethod
    def decode(self, codes: Tensor) -> Tensor:
        """codes: [T, L] with L <= n_levels (missing levels are treated as absent) -> float32 [samples]."""

    def encode_batch(self, wavs: list[Tensor]) -> list[Tensor]:
        """Many clips; implementations batch where that is faster."""
        return [self.encode(w) for w in wavs]

    def decode_batch(self, codes: list[Tensor]) -> list[Tensor]:
        return [self.decode(c) for c in codes]

    def spec(self) -> dict[str, Any]:
        """A JSON-able description stored with datasets and exported models to rebuild this codec."""
        return {"name": self.name, "sample_rate": self.sample_rate, "frame_rate": self.frame_rate,
                "n_levels": self.n_levels, "n_codes": self.n_codes}

    def frames_for_seconds(self, seconds: float) -> int:
        return int(round(seconds * self.frame_rate))


_REGISTRY: dict[str, Callable[..., Codec]] = {}


def register_codec(name: str) -> Callable[[Callable[..., Codec]], Callable[..., Codec]]:
    def deco(factory: Callable[..., Codec]) -> Callable[..., Codec]:
        _REGISTRY[name] = factory
        return factory
    return deco


def registered_codecs() -> dict[str, Callable[..., Codec]]:
    return dict(_REGISTRY)

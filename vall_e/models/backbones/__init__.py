"""Backbone registry: name -> class, imported lazily so optional dependencies load only when used.

Every backbone class takes the same constructor arguments:
`(d_model, n_heads, n_layers, ffn_mult=4, dropout=0.0, experts=1, max_positions=8192, **extra)`.
"""
from __future__ import annotations

import importlib

from vall_e.utils.errors import UserError

from .base import Backbone, BackboneOutput, Mask

BACKBONES: dict[str, str] = {
    "transformer": "vall_e.models.backbones.transformer:TransformerBackbone",
    "llama": "vall_e.models.backbones.llama:LlamaBackbone",
    "mixtral": "vall_e.models.backbones.mixtral:MixtralBackbone",
    "retnet": "vall_e.models.backbones.retnet:RetNetBackbone",
    "bitnet": "vall_e.models.backbones.bitnet:BitNetBackbone",
}


def build_backbone(name: str, **kwargs) -> Backbone:
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    module, cls = BACKBONES[name].split(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)


__all__ = ["Backbone", "BackboneOutput", "Mask", "BACKBONES", "build_backbone"]

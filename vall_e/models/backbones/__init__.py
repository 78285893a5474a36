"""Backbone registry: name -> class, imported lazily so optional dependencies load only when used.

Every backbone class takes a `BackboneShape` (d_model, n_heads, n_layers, ffn_mult, dropout, experts,
max_positions) and its own keyword options.
"""
from __future__ import annotations

import dataclasses
import importlib

from vall_e.utils.errors import UserError

from .base import Backbone, BackboneOutput, BackboneShape, Mask

BACKBONES: dict[str, str] = {
    "transformer": "vall_e.models.backbones.transformer:TransformerBackbone",
    "llama": "vall_e.models.backbones.llama:LlamaBackbone",
    "mixtral": "vall_e.models.backbones.mixtral:MixtralBackbone",
    "retnet": "vall_e.models.backbones.retnet:RetNetBackbone",
    "bitnet": "vall_e.models.backbones.bitnet:BitNetBackbone",
}


_SHAPE_FIELDS = {f.name for f in dataclasses.fields(BackboneShape)}


def build_backbone(name: str, **kwargs) -> Backbone:
    """The backbone `name`: the keyword arguments that are `BackboneShape` fields make its shape, the
    rest are the backbone's own options."""
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    module, cls = BACKBONES[name].split(":")
    shape = BackboneShape(**{k: v for k, v in kwargs.items() if k in _SHAPE_FIELDS})
    options = {k: v for k, v in kwargs.items() if k not in _SHAPE_FIELDS}
    return getattr(importlib.import_module(module), cls)(shape, **options)


__all__ = ["Backbone", "BackboneOutput", "BackboneShape", "Mask", "BACKBONES", "build_backbone"]

"""Backbones: `build_backbone(name, ...)` builds one by its registry name, importing its module only
then, so optional dependencies load only when used.

The registry itself, `BACKBONES` (name -> "module:Class"), lives in `vall_e.config.model` beside the
model's other settings, so the configuration checks `model.backbone` against it without importing
torch; a new backbone is registered there. Every backbone class takes a `BackboneShape` (d_model,
n_heads, n_layers, ffn_mult, dropout, experts, max_positions) and its own keyword options.
"""
from __future__ import annotations

import dataclasses
import importlib

from vall_e.config.model import BACKBONES
from vall_e.utils.errors import UserError

from .base import Backbone, BackboneOutput, BackboneShape, Mask

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

"""Build a `Codec` from a spec (the `codec` config section, or the spec stored with a dataset/model).

Implementations are imported only when asked for, so `import vall_e.codecs` stays cheap and a
missing optional dependency only matters to the codec that needs it. Built codecs are cached per
spec, since loading a model is slow and many call sites share one.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from vall_e.codecs.base import Codec, register_codec, registered_codecs
from vall_e.utils.errors import UserError

__all__ = ["Codec", "register_codec", "registered_codecs", "build_codec", "codec_names", "spec_to_dict",
           "clear_codec_cache"]

# codec name -> module that registers it on import
_MODULES: dict[str, str] = {
    "encodec": "vall_e.codecs.encodec",
    "world": "vall_e.codecs.world",
}
_CACHE: dict[tuple[str, tuple[tuple[str, str], ...]], Codec] = {}


def codec_names() -> list[str]:
    return sorted(set(_MODULES) | set(registered_codecs()))


def spec_to_dict(spec_or_cfg: Any) -> dict[str, Any]:
    """A plain dict from a dict, a dataclass (CodecConfig) or any object with attributes."""
    if isinstance(spec_or_cfg, Mapping):
        return dict(spec_or_cfg)
    if dataclasses.is_dataclass(spec_or_cfg) and not isinstance(spec_or_cfg, type):
        return {f.name: getattr(spec_or_cfg, f.name) for f in dataclasses.fields(spec_or_cfg)}
    if hasattr(spec_or_cfg, "__dict__"):
        return {k: v for k, v in vars(spec_or_cfg).items() if not k.startswith("_")}
    raise TypeError(f"cannot build a codec from {type(spec_or_cfg).__name__}")


def _factory(name: str) -> Any:
    if name not in registered_codecs() and name in _MODULES:
        try:
            importlib.import_module(_MODULES[name])
        except ImportError as e:
            raise UserError(f"codec.name={name}: cannot import {_MODULES[name]} ({e})") from None
    factories = registered_codecs()
    if name not in factories:
        raise UserError(f"codec.name: unknown codec {name!r}; available: {', '.join(codec_names())}")
    return factories[name]


def _accepted_kwargs(factory: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """Keep the spec entries the factory takes (a stored spec also carries sample_rate, n_levels, ...)."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(spec)
    return {k: v for k, v in spec.items() if k in params and params[k].kind is not inspect.Parameter.VAR_POSITIONAL}


def build_codec(spec_or_cfg: Any, **overrides: Any) -> Codec:
    """The codec described by `spec_or_cfg` (`name` plus e.g. `model`, `bandwidth`, `codebooks`, `device`).

    Empty-string values are treated as unset. The same spec returns the same (cached) instance.
    """
    spec = {**spec_to_dict(spec_or_cfg), **overrides}
    name = str(spec.pop("name", "") or "encodec")
    spec = {k: v for k, v in spec.items() if not (isinstance(v, str) and v == "")}
    factory = _factory(name)
    kwargs = _accepted_kwargs(factory, spec)
    for pname, param in inspect.signature(factory).parameters.items():
        if param.default is inspect.Parameter.empty and param.kind in (
                inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY) and pname not in kwargs:
            raise UserError(f"codec.{pname}: required by the {name!r} codec but not set")
    bound = inspect.signature(factory).bind_partial(**kwargs)
    bound.apply_defaults()  # so an omitted default and the same value given explicitly share a cache entry
    key = (name, tuple(sorted((k, repr(v)) for k, v in bound.arguments.items())))
    if key not in _CACHE:
        _CACHE[key] = factory(**kwargs)
    return _CACHE[key]


def clear_codec_cache() -> None:
    _CACHE.clear()

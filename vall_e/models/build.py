"""`cfg.model` -> the VALLE network(s) to train.

kind "ar+nar" gives one network named "ar+nar"; kind "ar,nar" gives the reference's pair, named
"ar" and "nar". The names are the keys used in checkpoints and exported files.
"""
from __future__ import annotations

import logging
from typing import Any

from torch import nn

from vall_e.models.bitlinear import swap_linear
from vall_e.models.presets import resolve_dims
from vall_e.models.valle import VALLE, VALLEConfig
from vall_e.utils.errors import UserError

logger = logging.getLogger(__name__)


def model_names(kind: str) -> list[str]:
    if kind == "ar+nar":
        return ["ar+nar"]
    if kind == "ar,nar":
        return ["ar", "nar"]
    raise UserError(f"config key 'model.kind' is {kind!r}; choose one of ar+nar, ar,nar")


def valle_configs(model_cfg: Any, n_text_tokens: int | None = None, n_langs: int | None = None) -> dict[str, Any]:
    """One `VALLEConfig` per network. `n_text_tokens` / `n_langs` are what the data needs (the
    symbol map's size, the language count); the config must be at least that large."""
    m = model_cfg
    if n_text_tokens is not None and n_text_tokens > m.n_text_tokens:
        raise UserError(f"model.n_text_tokens={m.n_text_tokens} is too small for the symbol map "
                        f"({n_text_tokens} symbols); set it to at least {n_text_tokens}")
    if n_langs is not None and n_langs > m.n_langs:
        raise UserError(f"model.n_langs={m.n_langs} is too small for the data's {n_langs} languages")
    d, h, l = resolve_dims(m.size, m.d_model, m.n_heads, m.n_layers)
    common = dict(d_model=d, n_heads=h, n_layers=l, ffn_mult=m.ffn_mult, ffn=m.ffn, backbone=m.backbone, experts=m.experts,
                  n_levels=m.n_levels, n_codes=m.n_codes, n_text_tokens=m.n_text_tokens, n_langs=m.n_langs,
                  dropout=m.dropout, p_ar=(m.p_ar if m.p_ar and m.p_ar > 0 else None),
                  text_loss_weight=m.text_loss_weight, max_positions=m.max_positions, text_heads=m.text_heads,
                  guided_attention=m.guided_attention, guided_attention_sigma=m.guided_attention_sigma,
                  text_head_rate=m.text_head_rate, ar_group=m.ar_group)
    return {name: VALLEConfig(kind=name, **common) for name in model_names(m.kind)}


def freeze_params(model: nn.Module, prefixes: list[str], name: str = "") -> int:
    """Turn off gradients for parameters whose name starts with a prefix (a prefix may also start
    with the network's name, "nar.backbone..."). Returns how many tensors were frozen."""
    count = 0
    for pname, p in model.named_parameters():
        full = f"{name}.{pname}" if name else pname
        if any(pname.startswith(pre) or full.startswith(pre) for pre in prefixes):
            p.requires_grad_(False)
            count += 1
    return count


def build_models(model_cfg: Any, n_text_tokens: int | None = None, n_langs: int | None = None,
                 bnb_cfg: Any = None) -> dict[str, nn.Module]:
    """Build the network(s) described by `cfg.model`, with `cfg.bitsandbytes` layer swaps and
    `model.frozen_params` applied."""
    models: dict[str, nn.Module] = {}
    for name, vcfg in valle_configs(model_cfg, n_text_tokens, n_langs).items():
        model = VALLE(vcfg)
        if bnb_cfg is not None and getattr(bnb_cfg, "linear", False):
            kind = "bitnet" if getattr(bnb_cfg, "bitnet", False) else "bnb8"
            if kind == "bnb8" and not getattr(bnb_cfg, "enabled", False):
                raise UserError("bitsandbytes.linear needs bitsandbytes.enabled=true (or bitsandbytes.bitnet=true)")
            n = swap_linear(model.backbone, kind)
            logger.info("%s: %d linear layers replaced by %s", name, n, kind)
        models[name] = model
    prefixes = list(model_cfg.frozen_params or [])
    if prefixes:
        frozen = sum(freeze_params(m, prefixes, name) for name, m in models.items())
        if frozen == 0:
            raise UserError(f"model.frozen_params {prefixes}: no parameter name starts with these prefixes")
        logger.info("froze %d parameter tensors matching %s", frozen, prefixes)
    return models


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    """The JSON-able config a network was built from (stored in checkpoints and exports)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        raise TypeError(f"{type(model).__name__} has no `config` with to_dict()")
    return cfg.to_dict()

"""`cfg.model` -> the VALLE network(s) to train.

kind "ar+nar" gives one network named "ar+nar"; kind "ar,nar" gives the reference's pair, named
"ar" and "nar". The names are the keys used in checkpoints and exported files. What each network is
(its `VALLEConfig`) comes from `ModelConfig.networks()` in `vall_e.config.model`.
"""
from __future__ import annotations

import logging
from typing import Any

from torch import nn

from vall_e.config.model import ModelConfig
from vall_e.models.bitlinear import swap_linear
from vall_e.models.valle import VALLE
from vall_e.utils.errors import UserError

logger = logging.getLogger(__name__)


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


def freeze_all_but_medusa(model: nn.Module) -> int:
    """`trainer.medusa_only`: train only the Medusa heads on a trained AR (the backbone, embeddings and
    the other heads frozen). Returns how many tensors stay trainable."""
    heads = [p for n, p in model.named_parameters() if n.startswith("medusa_heads.")]
    if not heads:
        raise UserError("trainer.medusa_only needs Medusa heads to train: set model.medusa_heads (1-4)")
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("medusa_heads."))
    return len(heads)


def build_models(model_cfg: ModelConfig, n_text_tokens: int | None = None, n_langs: int | None = None,
                 bnb_cfg: Any = None) -> dict[str, nn.Module]:
    """Build the network(s) described by `cfg.model`, with `cfg.bitsandbytes` layer swaps and
    `model.frozen_params` applied. `n_text_tokens` / `n_langs`: what the data needs."""
    models: dict[str, nn.Module] = {}
    for name, vcfg in model_cfg.networks(n_text_tokens, n_langs).items():
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

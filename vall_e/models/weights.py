"""Network weights in safetensors files: several networks' state dicts in one flat file, and
loading them with a one-line error that names the file on any mismatch.

Training checkpoints (`vall_e.training.engines.checkpoint`) and the exported model file
(`vall_e.models.model_file`) both store their weights this way: keys "{network}.{parameter}"
("ar+nar.backbone...", or "ar." and "nar." for a pair), or plain parameter names for a lone network.
"""
from __future__ import annotations

import logging
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from vall_e.utils.errors import UserError

logger = logging.getLogger(__name__)

def flat_weights(state_dicts: dict[str, dict[str, Tensor]], prefix: bool = True) -> dict[str, Tensor]:
    """One flat CPU dict for safetensors: keys "{model}.{key}" (no prefix for a lone model when
    `prefix` is false). Tensors that share storage (tied weights) are copied so safetensors accepts them."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    lone = len(state_dicts) == 1 and not prefix
    for name, sd in state_dicts.items():
        for k, t in sd.items():
            if not isinstance(t, Tensor):
                continue
            key = k if lone else f"{name}.{k}"
            t = t.detach()
            ptr = t.untyped_storage().data_ptr() if t.numel() else None
            t = t.to("cpu", copy=t.device.type == "cpu" and ptr in seen).contiguous()
            if ptr is not None:
                seen.add(ptr)
            out[key] = t
    return out


def split_weights(flat: dict[str, Tensor], names: list[str], prefix: bool = True) -> dict[str, dict[str, Tensor]]:
    """Inverse of `flat_weights`."""
    if len(names) == 1 and not prefix:
        return {names[0]: dict(flat)}
    out: dict[str, dict[str, Tensor]] = {n: {} for n in names}
    for k, t in flat.items():
        name, _, rest = k.partition(".")
        if name not in out:
            raise UserError(f"weights: key {k!r} belongs to no model ({', '.join(names)})")
        out[name][rest] = t
    return out


def save_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    save_file(tensors, str(path), metadata=metadata)


def load_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata); a damaged file is a UserError naming it."""
    try:
        tensors: dict[str, Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a valid safetensors file (truncated or damaged): {first}") from None
    return tensors, meta


def _check_shapes(own: dict[str, Tensor], weights: dict[str, Tensor], source: str) -> None:
    for k, t in weights.items():
        if k in own and tuple(own[k].shape) != tuple(t.shape):
            raise UserError(f"{source}: weight {k!r} has shape {tuple(t.shape)}, the model expects "
                            f"{tuple(own[k].shape)} (different model config?)")


def _mismatch(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} weight(s) e.g. {missing[0]!r}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} weight(s) e.g. {unexpected[0]!r}")
    return "; ".join(parts)


def check_weights(model: nn.Module, weights: dict[str, Tensor], source: str) -> None:
    """`weights` fit `model` exactly (names and shapes), as strict loading needs; UserError otherwise.
    Loads nothing, so `model` may live on the meta device."""
    own = model.state_dict()
    _check_shapes(own, weights, source)
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        raise UserError(f"{source}: {_mismatch(missing, unexpected)}")


def load_model_weights(model: nn.Module, weights: dict[str, Tensor], strict: bool, source: str) -> None:
    """`load_state_dict` with a one-line UserError naming `source` on any mismatch."""
    _check_shapes(model.state_dict(), weights, source)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if strict and (missing or unexpected):
        raise UserError(f"{source}: {_mismatch(missing, unexpected)} (set trainer.strict_loading=false to load anyway)")
    if missing or unexpected:
        logger.warning("%s: %d missing and %d unexpected weights ignored", source, len(missing), len(unexpected))

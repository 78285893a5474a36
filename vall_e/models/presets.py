"""Model size presets: a name (or a scale factor, or a dict) -> (d_model, n_heads, n_layers).

FFN hidden width is always 4 x d_model (`VALLEConfig.ffn_mult`; SwiGLU by default, `model.ffn=gelu` for
the plain GELU FFN), so it is not part of a preset. Parameter counts (ar+nar, transformer, SwiGLU):
quarter ~19M, half ~63M, full ~227M, double ~428M.
"""
from __future__ import annotations

import math
from typing import Any

from vall_e.utils.errors import UserError

PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (64, 4, 2),  # tests
    "quarter": (256, 4, 12),
    "half": (512, 8, 12),
    "full": (1024, 16, 12),  # the paper's size
    "double": (1024, 16, 24),
}


def _from_scale(f: float) -> tuple[int, int, int]:
    """The reference's float form: floor(1024 f) / floor(16 f) / 12 (it crashed on `math`:
    docs/reference-differences.md #10).

    d_model is rounded down to a multiple of 2 x heads so heads split it evenly with an even head size.
    """
    heads = math.floor(16 * f)
    if not math.isfinite(f) or heads < 1:
        raise UserError(f"model.size {f}: a scale factor must be at least 1/16")
    d_model = math.floor(1024 * f) // (2 * heads) * (2 * heads)
    return d_model, heads, 12


def resolve_dims(size: Any = "full", d_model: int = 0, n_heads: int = 0, n_layers: int = 0) -> tuple[int, int, int]:
    """Dimensions for `size`; explicit non-zero `d_model`/`n_heads`/`n_layers` override the preset.

    `size` is a preset name, a scale factor (float, or a string such as "0.5"), or a dict with
    `d_model`/`dim`, `n_heads`/`heads`, `n_layers`/`layers` (the reference ignored
    dicts: docs/reference-differences.md #10).
    """
    if isinstance(size, dict):
        aliases = {"dim": "d_model", "heads": "n_heads", "layers": "n_layers"}
        given = {aliases.get(k, k): v for k, v in size.items() if k != "tokens"}
        unknown = set(given) - {"d_model", "n_heads", "n_layers"}
        if unknown:
            raise UserError(f"model.size: unknown key(s) {', '.join(sorted(unknown))} (use d_model, n_heads, n_layers)")
        d, h, l = PRESETS["full"]
        d, h, l = given.get("d_model", d), given.get("n_heads", h), given.get("n_layers", l)
    elif isinstance(size, str) and size in PRESETS:
        d, h, l = PRESETS[size]
    elif isinstance(size, (int, float)) and not isinstance(size, bool):
        d, h, l = _from_scale(float(size))
    elif isinstance(size, str):
        try:
            scale = float(size)
        except ValueError:
            raise UserError(f"model.size {size!r}: unknown preset; choose one of {', '.join(PRESETS)} "
                            "or a scale factor such as 0.5") from None
        d, h, l = _from_scale(scale)
    else:
        raise UserError(f"model.size {size!r}: expected a preset name, a number or a dict")

    d, h, l = d_model or d, n_heads or h, n_layers or l
    for key, value in (("d_model", d), ("n_heads", h), ("n_layers", l)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"model.{key} {value!r}: must be a positive integer")
    if d % h or (d // h) % 2:
        raise UserError(f"model.d_model {d} must split into {h} heads of even size")
    return d, h, l

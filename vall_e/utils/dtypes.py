"""The one map from dtype names (as users and files write them) to torch dtypes."""
from __future__ import annotations

import torch

from vall_e.utils.errors import UserError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The float dtypes by their canonical names."""
ALIASES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
FLOAT_DTYPES = tuple(DTYPES)


def canonical_dtype(name: str) -> str:
    """'bf16' -> 'bfloat16'; an unknown name is a `UserError`."""
    name = ALIASES.get(name, name)
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return name


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """A dtype name (or alias, or a torch.dtype) -> the torch.dtype."""
    return name if isinstance(name, torch.dtype) else DTYPES[canonical_dtype(name)]

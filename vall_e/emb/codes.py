"""The `.qnt.pt` file: codec codes [T, L] as int16 plus the codec spec that produced them.

Files are read with `torch.load(weights_only=True)`, so a crafted pickle cannot run code. The reader
also accepts the reference implementation's files (a bare int64 tensor [1, L, T]).
"""
from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vall_e.utils.errors import UserError
from vall_e.utils.io import atomic_path

# Codes in the reference's bare-tensor files come from EnCodec: 1024 codes per level.
REFERENCE_N_CODES = 1024
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def refusal_reason(e: Exception) -> str:
    """The useful line of `torch.load(weights_only=True)`'s refusal (what it would not load), without
    torch's advice to retry with `weights_only=False`, which would run the file's code."""
    for line in str(e).splitlines():
        line = line.strip()
        if line.startswith(("Trying to load unsupported", "Unsupported")):
            return line[:160]
    return "not plain tensor data"


def save_codes(path: str | os.PathLike, codes: Tensor, codec_spec: dict[str, Any]) -> Path:
    """Atomically write `{"codes": int16 [T, L], "codec": codec_spec}` to `path`."""
    path = Path(path)
    if codes.ndim != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
        raise ValueError(f"codes must be a non-empty [T, L] tensor, got shape {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"codes must be integers, got {codes.dtype}")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi > torch.iinfo(torch.int16).max:
        raise ValueError(f"code values must lie in [0, 32767], got [{lo}, {hi}]")
    payload = {"codes": codes.detach().to("cpu", torch.int16).contiguous().clone(), "codec": dict(codec_spec)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_codes(path: str | os.PathLike, *, n_codes: int | None = None,
               n_levels: int | None = None) -> tuple[Tensor, dict[str, Any] | None]:
    """Load and validate a codes file -> (LongTensor [T, L], codec spec or None for reference files).

    Values must lie in [0, n_codes); `n_codes` defaults to the stored spec's (1024 for reference files).
    `n_levels`, when given, is the number of levels the caller needs at least.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such codes file")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused to load: the file holds Python objects other than tensors, "
                        f"which could run code ({refusal_reason(e)})") from None
    except Exception as e:  # a damaged file fails anywhere in the unpickler (zipfile, struct, EOF, ...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: cannot read codes file, it is corrupt or truncated ({msg[:160]})") from None

    spec: dict[str, Any] | None = None
    if isinstance(obj, dict):
        if "codes" not in obj or not isinstance(obj["codes"], Tensor):
            raise UserError(f"{path}: not a codes file (a dict without a 'codes' tensor)")
        codes = obj["codes"]
        raw_spec = obj.get("codec")
        if raw_spec is not None and not isinstance(raw_spec, dict):
            raise UserError(f"{path}: the 'codec' entry must be a dict, got {type(raw_spec).__name__}")
        spec = raw_spec
    elif isinstance(obj, Tensor):
        codes = obj
    else:
        raise UserError(f"{path}: not a codes file (holds a {type(obj).__name__})")

    if codes.dtype not in _INT_DTYPES:
        raise UserError(f"{path}: codes must be integers, got {codes.dtype}")
    if codes.ndim == 3 and codes.shape[0] == 1:  # the reference's [1, L, T]
        codes = codes[0].t()
    elif codes.ndim != 2:
        raise UserError(f"{path}: codes must have shape [T, L] or [1, L, T], got {list(codes.shape)}")
    if codes.shape[0] == 0 or codes.shape[1] == 0:
        raise UserError(f"{path}: the codes are empty (shape {list(codes.shape)})")

    if n_codes is None:
        n_codes = _spec_int(spec, "n_codes", path) if spec and "n_codes" in spec else REFERENCE_N_CODES
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= n_codes:
        raise UserError(f"{path}: code values must lie in [0, {n_codes}), found [{lo}, {hi}]")
    want_levels = n_levels
    if spec and want_levels is None and "n_levels" in spec:
        want_levels = _spec_int(spec, "n_levels", path)
    if want_levels is not None and codes.shape[1] < want_levels:
        raise UserError(f"{path}: has {codes.shape[1]} code levels, {want_levels} needed")
    return codes.long().contiguous(), spec


def _spec_int(spec: dict[str, Any], key: str, path: Path) -> int:
    """A positive integer entry of a stored codec spec (the file may have been edited)."""
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{path}: the codec spec's {key!r} must be a positive integer, got {value!r}")
    return value


def load_codes(path: str | os.PathLike, *, n_codes: int | None = None, n_levels: int | None = None) -> Tensor:
    """Load a `.qnt.pt` file (ours or the reference's) as LongTensor [T, L]."""
    return read_codes(path, n_codes=n_codes, n_levels=n_levels)[0]

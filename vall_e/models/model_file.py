"""The exported model file: one `model.safetensors` that holds everything synthesis needs.

The weights, plus, in the safetensors metadata (JSON strings):

    format          "vall-e"            format_version  "1"
    models          {name: VALLEConfig.to_dict()}   ("ar+nar", or "ar" and "nar")
    symmap          the phoneme symbol map (JSON; its "@stress" entry, when present, is the stress mode
                    text is tokenized in for this model, see `vall_e.text.symmap`; a file without it,
                    as every file exported before the modes existed, is "merged")
    langmap         the language map (JSON)
    codec           the codec spec      stats   {step, samples, tokens, val_loss}
    dtype           the weights' dtype  checksum  sha256 over every tensor (names, dtypes, shapes, bytes)
    codec_tensors   (offline codec only) the fitted codebooks' metadata; their tensors are stored
                    under "__codec__." keys beside the weights

A lone network's keys are its plain `state_dict` keys; a pair's are prefixed "ar." and "nar.".
The reference exported a pickle (`fp32.pth`); a safetensors file cannot run code when loaded, and the
checksum turns a damaged or edited file into an error instead of a silently wrong model.
`python -m vall_e.export` writes it from a training checkpoint; `TTS.from_pretrained` reads it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from vall_e.codecs.rvq import ResidualVQ
from vall_e.models.valle import VALLE, VALLEConfig
from vall_e.models.vallex import VallexConfig, VallexModel
from vall_e.models.weights import flat_weights, load_model_weights, load_safetensors, save_safetensors, split_weights
from vall_e.text.phonemes import STRESS_MODES
from vall_e.text.symmap import STRESS_KEY
from vall_e.utils.dtypes import DTYPES
from vall_e.utils.errors import UserError
from vall_e.utils.io import atomic_path

FORMAT = "vall-e"
FORMAT_VERSION = 1


def tensor_checksum(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _as_json_text(value: Any) -> str:
    if value is None:
        return "{}"
    if isinstance(value, str):
        return value
    if hasattr(value, "to_json"):
        return value.to_json()
    return json.dumps(value, ensure_ascii=False)


CODEC_PREFIX = "__codec__."


def _embed_codec_tensors(tensors: dict[str, Tensor], codec: dict[str, Any] | None) -> dict[str, str] | None:
    """An offline codec's fitted codebooks travel inside the model file, so one file is enough."""
    if not codec or codec.get("name") != "world" or not codec.get("codebooks"):
        return None
    rvq_tensors, rvq_meta = ResidualVQ.load(codec["codebooks"]).to_tensors()
    tensors.update({CODEC_PREFIX + k: v for k, v in rvq_tensors.items()})
    return rvq_meta


def write_export(path: Path, state_dicts: dict[str, dict[str, Tensor]], configs: dict[str, dict[str, Any]],
                 symmap: Any = None, langmap: Any = None, codec: dict[str, Any] | None = None,
                 stats: dict[str, Any] | None = None, dtype: str = "float32",
                 extra: dict[str, str] | None = None) -> Path:
    """Write one self-contained model file (atomically). `extra`: more metadata strings (a converted
    checkpoint's text front end and source), returned by `read_export` as meta["extra"]."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if set(state_dicts) != set(configs):
        raise ValueError(f"weights for {sorted(state_dicts)} but configs for {sorted(configs)}")
    tensors = flat_weights(state_dicts, prefix=len(state_dicts) > 1)
    target = DTYPES[dtype]
    tensors = {k: (t.to(target) if t.is_floating_point() else t) for k, t in tensors.items()}
    codec_meta = _embed_codec_tensors(tensors, codec)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "models": json.dumps(configs),
        "symmap": _as_json_text(symmap),
        "langmap": _as_json_text(langmap),
        "codec": json.dumps(codec or {}),
        "stats": json.dumps(stats or {}),
        "dtype": dtype,
        "checksum": tensor_checksum(tensors),
    }
    if codec_meta is not None:
        metadata["codec_tensors"] = json.dumps(codec_meta)
    for key, value in (extra or {}).items():
        if key in metadata:
            raise ValueError(f"extra metadata key {key!r} is reserved")
        metadata[key] = value
    path = Path(path)
    with atomic_path(path) as tmp:
        save_safetensors(tmp, tensors, metadata)
    return path


def read_export(path: str | Path) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """(state dicts by network name, meta), verified. meta: format_version, models (configs), symmap and
    langmap (JSON text), codec, stats, dtype."""
    path = Path(path)
    tensors, md = load_safetensors(path)
    if md.get("format") != FORMAT:
        raise UserError(f"{path}: not a vall-e model file (no 'format: vall-e' metadata); export one with "
                        "`python -m vall_e.export yaml=...`")
    try:
        version = int(md.get("format_version", "0"))
        configs = json.loads(md["models"])
        meta = {"format_version": version, "models": configs, "symmap": md.get("symmap", "{}"),
                "langmap": md.get("langmap", "{}"), "codec": json.loads(md.get("codec", "{}")),
                "stats": json.loads(md.get("stats", "{}")), "dtype": md.get("dtype", "")}
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: damaged model metadata ({e})") from None
    if version > FORMAT_VERSION:
        raise UserError(f"{path}: format version {version} is newer than this vall-e understands ({FORMAT_VERSION})")
    if not isinstance(configs, dict) or not configs:
        raise UserError(f"{path}: damaged model metadata (no model configs)")
    for key in ("codec", "stats"):
        if not isinstance(meta[key], dict):
            raise UserError(f"{path}: damaged model metadata ('{key}' must be a JSON object)")
    check_maps(meta["symmap"], meta["langmap"], str(path))
    if md.get("checksum") != tensor_checksum(tensors):
        raise UserError(f"{path}: weights do not match the file's checksum (damaged or edited)")
    codec_tensors = {k[len(CODEC_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(CODEC_PREFIX)}
    if codec_tensors:
        try:
            meta["codec_tensors"] = (codec_tensors, json.loads(md.get("codec_tensors", "{}")))
        except ValueError as e:
            raise UserError(f"{path}: damaged codec metadata ({e})") from None
    known = {"format", "format_version", "models", "symmap", "langmap", "codec", "stats", "dtype", "checksum",
             "codec_tensors"}
    meta["extra"] = {k: v for k, v in md.items() if k not in known}
    names = list(configs)
    return split_weights(tensors, names, prefix=len(names) > 1), meta


def check_maps(symmap: Any, langmap: Any, source: str) -> None:
    """A stored symbol or language map must be a JSON object (checked in full where it is used)."""
    for name, text in (("symmap", symmap), ("langmap", langmap)):
        try:
            value = json.loads(_as_json_text(text))
        except ValueError as e:
            raise UserError(f"{source}: damaged {name} metadata ({e})") from None
        if not isinstance(value, dict):
            raise UserError(f"{source}: damaged {name} metadata (a JSON object expected, got {type(value).__name__})")
        if name == "symmap" and value.get(STRESS_KEY, STRESS_MODES[0]) not in STRESS_MODES:
            raise UserError(f"{source}: symmap metadata names an unknown stress mode {value[STRESS_KEY]!r} "
                            f"(this vall-e knows {' and '.join(STRESS_MODES)})")


def build_network(config: dict[str, Any]) -> nn.Module:
    """The untrained network a stored config describes: `VALLE` (`VALLEConfig.to_dict()`), or a
    converted VALL-E X / Amphion checkpoint's `VallexModel` (family "vallex")."""
    if isinstance(config, dict) and config.get("family") == "vallex":
        return VallexModel(VallexConfig.from_dict(config))
    return VALLE(VALLEConfig.from_dict(config))


def load_exported(path: str | Path, device: str | torch.device = "cpu", dtype: str | None = None,
                  model_factory: Callable[[dict[str, Any]], nn.Module] | None = None,
                  ) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """Rebuild the network(s) of an exported file, in eval mode. Returns (models by name, meta)."""
    state_dicts, meta = read_export(path)
    factory = model_factory or build_network
    models: dict[str, nn.Module] = {}
    for name, cfg in meta["models"].items():
        try:
            model = factory(cfg)
        except (TypeError, ValueError, UserError) as e:
            raise UserError(f"{path}: model config for {name!r} is not usable ({e})") from None
        load_model_weights(model, state_dicts[name], strict=True, source=str(path))
        if dtype is not None:
            if dtype not in DTYPES:
                raise UserError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
            model = model.to(DTYPES[dtype])
        models[name] = model.to(device).eval()
    return models, meta

"""Reading the published VALL-E X and Amphion VALL-E checkpoints, safely, into `VallexModel` weights.

The files are pickles written by `torch.save`. They are read with `torch.load(weights_only=True)`:
torch's restricted unpickler builds tensors and plain containers and refuses every other global
without calling it. VALL-E X's file also pickles one `pathlib.WindowsPath` (a path in its training
arguments); that single name is allowed, mapped to a harmless stand-in that keeps the path as text
(a real WindowsPath cannot be made on Linux). Any other global is refused with a one-line error
naming the file and the global.

Where the file is: a local path, or `hf://OWNER/REPO[/FILE]` (downloaded once with huggingface_hub
into its standard cache; known repositories need no file name).

Key names: the original module tree's `state_dict` names (lifeiteng's vall-e, which VALL-E X and
Amphion share) map to `VallexModel`'s names in `to_vallex_weights`; the architecture's sizes are read
from the tensors' shapes, the head count and NAR prompt mode from what is known of each checkpoint.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import Tensor

from vall_e.utils.errors import UserError
from vall_e.utils.hub import hub_file

from .vallex import VallexConfig, VallexModel

# Known hub repositories: file inside the repo, and what the weights do not tell
HUB_FILES = {
    "Plachta/VALL-E-X": {"file": "vallex-checkpoint.pt", "source": "vallex"},
    "amphion/valle_libritts": {"file": "checkpoint/final_epoch-0100_step-0837900_loss-3.883116/pytorch_model.bin",
                               "source": "amphion"},
}


class _PickledWindowsPath(PurePosixPath):
    """Stands in for `pathlib.WindowsPath` while unpickling: keeps the parts as a pure path."""

    def __new__(cls, *parts: Any) -> "_PickledWindowsPath":  # noqa: D102
        return PurePosixPath.__new__(cls, *[str(p).replace("\\", "/") for p in parts])


ALLOWED_EXTRA_GLOBALS = [(_PickledWindowsPath, "pathlib.WindowsPath")]


def load_pickled_checkpoint(path: str | Path) -> dict[str, Any]:
    """`torch.load(path, weights_only=True)` with `pathlib.WindowsPath` as the one extra allowed
    global. Nothing in the file is executed; a file needing anything else is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint file not found")
    try:
        with torch.serialization.safe_globals(ALLOWED_EXTRA_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as e:
        text = " ".join(str(e).split())
        m = re.search(r"(?:Unsupported global|Unsupported operand|GLOBAL) ?:? ?(\S+)", text)
        what = f"it needs {m.group(1)}" if m else text[:200]
        raise UserError(f"{path}: refused to load: the pickle asks for something other than tensors ({what}); "
                        "only tensors, plain containers and pathlib.WindowsPath are allowed") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: not a readable torch checkpoint ({first})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: a dict of tensors was expected, found {type(obj).__name__}")
    return obj


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def state_dict_of(obj: dict[str, Any], source: str) -> dict[str, Tensor]:
    """The model's tensors: `obj["model"]` (VALL-E X), `obj["state_dict"]`, or `obj` itself (Amphion)."""
    for key in ("model", "state_dict", "module"):
        if isinstance(obj.get(key), dict) and any(isinstance(v, Tensor) for v in obj[key].values()):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not any(k.startswith("ar_decoder.") for k in sd):
        raise UserError(f"{source}: no VALL-E weights found (no 'ar_decoder.*' tensors)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


# ---------------------------------------------------------------------------------- structure

def _need(sd: dict[str, Tensor], key: str, source: str) -> Tensor:
    if key not in sd:
        raise UserError(f"{source}: weight {key!r} is missing (not a VALL-E X / Amphion VALL-E checkpoint?)")
    return sd[key]


def infer_config(sd: dict[str, Tensor], source: str, n_heads: int | None = None,
                 nar_prompt_all_levels: bool = True) -> VallexConfig:
    """The architecture from the tensors' shapes (the head count and NAR prompt mode are not in the
    weights: n_heads defaults to d_model / 64, which is 16 for both published checkpoints)."""
    text = _need(sd, "ar_text_embedding.word_embeddings.weight", source)
    audio = _need(sd, "ar_audio_embedding.word_embeddings.weight", source)
    head = _need(sd, "ar_predict_layer.weight", source)
    n_text, d = text.shape
    n_codes = head.shape[0] - 1
    extra = audio.shape[0] - (n_codes + 1)
    if extra not in (0, 1):
        raise UserError(f"{source}: AR audio table has {audio.shape[0]} rows, expected {n_codes + 1} or {n_codes + 2}")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"ar_decoder\.layers\.(\d+)\.", k))}
    levels = {int(m.group(1)) for k in sd if (m := re.match(r"nar_audio_embeddings\.(\d+)\.", k))}
    if not layers or not levels:
        raise UserError(f"{source}: no AR layers or NAR tables found")
    lang = sd.get("ar_language_embedding.word_embeddings.weight")
    ffn = _need(sd, "ar_decoder.layers.0.linear1.weight", source).shape[0]
    n_levels = max(levels) + 1
    tied = all(torch.equal(sd.get(f"nar_predict_layers.{j}.weight", torch.empty(0)),
                           sd.get(f"nar_audio_embeddings.{j + 2}.word_embeddings.weight", torch.empty(1)))
               for j in range(n_levels - 2))
    try:
        return VallexConfig(d_model=d, n_heads=n_heads or max(1, d // 64), n_layers=max(layers) + 1,
                            n_text_tokens=n_text, n_langs=0 if lang is None else lang.shape[0], n_levels=n_levels,
                            n_codes=n_codes, prepend_bos=bool(extra), nar_prompt_all_levels=nar_prompt_all_levels,
                            tied_heads=tied, ffn_mult=ffn // d)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def key_map(c: VallexConfig) -> dict[str, str]:
    """Our parameter name -> the original module tree's name."""
    m = {
        "ar_text.weight": "ar_text_embedding.word_embeddings.weight",
        "ar_audio.weight": "ar_audio_embedding.word_embeddings.weight",
        "ar_text_pos.alpha": "ar_text_position.alpha",
        "ar_audio_pos.alpha": "ar_audio_position.alpha",
        "ar_norm.weight": "ar_decoder.norm.weight",
        "ar_norm.bias": "ar_decoder.norm.bias",
        "ar_head.weight": "ar_predict_layer.weight",
        "nar_text.weight": "nar_text_embedding.word_embeddings.weight",
        "nar_text_pos.alpha": "nar_text_position.alpha",
        "nar_audio_pos.alpha": "nar_audio_position.alpha",
        "nar_norm.weight": "nar_decoder.norm.norm.weight",
        "nar_norm.bias": "nar_decoder.norm.norm.bias",
        "nar_norm_proj.weight": "nar_decoder.norm.project_layer.weight",
        "nar_norm_proj.bias": "nar_decoder.norm.project_layer.bias",
    }
    if c.n_langs:
        m["ar_lang.weight"] = "ar_language_embedding.word_embeddings.weight"
        m["nar_lang.weight"] = "nar_language_embedding.word_embeddings.weight"
    for j in range(c.n_levels):
        m[f"nar_audio.{j}.weight"] = f"nar_audio_embeddings.{j}.word_embeddings.weight"
    for k in ([c.n_levels - 1] if c.tied_heads else range(1, c.n_levels)):
        m[f"nar_heads.{k}.weight"] = f"nar_predict_layers.{k - 1}.weight"
    parts = {"qkv.weight": "self_attn.in_proj_weight", "qkv.bias": "self_attn.in_proj_bias",
             "out.weight": "self_attn.out_proj.weight", "out.bias": "self_attn.out_proj.bias",
             "up.weight": "linear1.weight", "up.bias": "linear1.bias",
             "down.weight": "linear2.weight", "down.bias": "linear2.bias"}
    for i in range(c.n_layers):
        for ours, theirs in parts.items():
            m[f"ar_layers.{i}.{ours}"] = f"ar_decoder.layers.{i}.{theirs}"
            m[f"nar_layers.{i}.{ours}"] = f"nar_decoder.layers.{i}.{theirs}"
        for n in ("norm1", "norm2"):
            for p in ("weight", "bias"):
                m[f"ar_layers.{i}.{n}.{p}"] = f"ar_decoder.layers.{i}.{n}.{p}"
                m[f"nar_layers.{i}.{n}.{p}"] = f"nar_decoder.layers.{i}.{n}.norm.{p}"
                m[f"nar_layers.{i}.{n}_proj.{p}"] = f"nar_decoder.layers.{i}.{n}.project_layer.{p}"
    return m


def to_vallex_weights(sd: dict[str, Tensor], config: VallexConfig, source: str) -> dict[str, Tensor]:
    """Their state dict -> `VallexModel` weights (every tensor of theirs used once; tied copies checked)."""
    out = {ours: _need(sd, theirs, source) for ours, theirs in key_map(config).items()}
    stages = [_need(sd, f"nar_stage_embeddings.{k}.word_embeddings.weight", source) for k in range(config.n_levels - 1)]
    out["nar_stages"] = torch.cat(stages)
    used = set(key_map(config).values()) | {f"nar_stage_embeddings.{k}.word_embeddings.weight"
                                             for k in range(config.n_levels - 1)}
    if config.tied_heads:
        used |= {f"nar_predict_layers.{j}.weight" for j in range(config.n_levels - 2)}
    left = sorted(set(sd) - used)
    if left:
        raise UserError(f"{source}: {len(left)} weight(s) this model does not use, e.g. {left[0]!r} "
                        "(a prenet or another variant is not supported)")
    return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


def build_from_state_dict(sd: dict[str, Tensor], source: str, n_heads: int | None = None,
                          nar_prompt_all_levels: bool = True) -> VallexModel:
    config = infer_config(sd, source, n_heads, nar_prompt_all_levels)
    weights = to_vallex_weights(sd, config, source)
    with torch.device("meta"):
        model = VallexModel(config)
    model = model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:  # a mapping bug, not the user's
        raise RuntimeError(f"vallex weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


# ---------------------------------------------------------------------------------- where

def is_foreign_checkpoint(path: str | Path) -> bool:
    """True for what this module reads: `hf://...` or a `.pt` / `.pth` / `.bin` / `.ckpt` file."""
    s = str(path)
    return s.startswith("hf://") or Path(s).suffix.lower() in (".pt", ".pth", ".bin", ".ckpt")


def resolve(path: str | Path) -> tuple[Path, str]:
    """(local file, source kind "vallex" | "amphion" | "") for a path or an `hf://` address."""
    s = str(path)
    if not s.startswith("hf://"):
        p = Path(s)
        guess = "amphion" if p.suffix == ".bin" else ""
        return p, guess
    parts = s[len("hf://"):].strip("/").split("/")
    if len(parts) < 2:
        raise UserError(f"{s}: expected hf://OWNER/REPO[/FILE]")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    known = HUB_FILES.get(repo)
    if not filename:
        if known is None:
            raise UserError(f"{s}: unknown repository; name the file: hf://{repo}/FILE")
        filename = known["file"]
    local = hub_file(repo, filename, s)
    kind = (known or {}).get("source", "")
    if kind == "amphion" or filename.endswith(".bin"):  # Amphion keeps its settings and phone table at the root
        for extra in ("args.json", "symbols.dict"):
            try:
                hub_file(repo, extra, s)
            except UserError:  # reported where it is needed (read_symbols / defaults)
                pass
    return Path(local), kind


def amphion_settings(checkpoint: Path) -> dict[str, Any]:
    """n_heads and the NAR prompt mode from Amphion's `args.json` beside (or above) the weights."""
    for folder in (checkpoint.parent, checkpoint.parent.parent, checkpoint.parent.parent.parent):
        f = folder / "args.json"
        if f.is_file():
            try:
                model = json.loads(f.read_text(encoding="utf-8")).get("model", {})
            except (ValueError, UnicodeDecodeError) as e:
                raise UserError(f"{f}: not valid JSON ({e})") from None
            return {"n_heads": model.get("nhead"), "nar_prompt_all_levels": model.get("prefix_mode", 1) != 0}
    return {}


def load_vallex_model(path: str | Path, n_heads: int | None = None,
                      nar_prompt_all_levels: bool | None = None) -> tuple[VallexModel, Path, str]:
    """(model in eval mode, the local file, its source kind) from a path or hf:// address."""
    local, kind = resolve(path)
    obj = load_pickled_checkpoint(local)
    sd = state_dict_of(obj, str(local))
    if not kind:
        kind = "vallex" if "ar_language_embedding.word_embeddings.weight" in sd else "amphion"
    settings = amphion_settings(local) if kind == "amphion" else {}
    heads = n_heads or settings.get("n_heads")
    prompt_all = nar_prompt_all_levels if nar_prompt_all_levels is not None else settings.get(
        "nar_prompt_all_levels", True)
    return build_from_state_dict(sd, str(local), heads, prompt_all), local, kind


# ---------------------------------------------------------------------------------- test weights

def random_state_dict(config: VallexConfig, seed: int) -> dict[str, Tensor]:
    """Random weights in the original module tree's layout (their names, tied copies shared), for
    tests and fixtures: norms, biases, alphas and stage vectors all perturbed away from identity so
    no 1 or 0 can hide a wrong mapping. Deterministic for a seed (torch's CPU generator)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in VallexModel(config).state_dict().items()}
    out: dict[str, Tensor] = {}
    for ours, theirs in sorted(key_map(config).items()):
        shape = shapes[ours]
        if ours.endswith("alpha"):
            t = 0.5 + torch.rand(shape, generator=g)
        elif re.search(r"norm\d?\.weight$", ours) or ours in ("ar_norm.weight", "nar_norm.weight"):
            t = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif ours.endswith("bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        elif "_audio" in ours or "_text" in ours or "_lang" in ours:  # embedding tables
            t = 0.5 * torch.randn(shape, generator=g)
        else:  # projections
            t = torch.randn(shape, generator=g) / shape[-1] ** 0.5
        out[theirs] = t
    for k in range(config.n_levels - 1):
        out[f"nar_stage_embeddings.{k}.word_embeddings.weight"] = torch.randn(1, config.d_model, generator=g)
    if config.tied_heads:
        for j in range(config.n_levels - 2):
            out[f"nar_predict_layers.{j}.weight"] = out[f"nar_audio_embeddings.{j + 2}.word_embeddings.weight"]
    return out

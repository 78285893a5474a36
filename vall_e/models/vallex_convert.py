"""`python -m vall_e.convert SRC [OUT]`: a published VALL-E checkpoint -> one self-contained model.safetensors.

SRC is VALL-E X's `vallex-checkpoint.pt`, an Amphion VALL-E `pytorch_model.bin`, or an `hf://` address
(`hf://Plachta/VALL-E-X`, `hf://amphion/valle_libritts`; downloaded once into huggingface_hub's cache).
The pickle is read with `torch.load(weights_only=True)` (see `vall_e.models.vallex_checkpoint`), so
nothing in it runs; the output is a normal vall-e model file: the weights, the model config, the
text front end (VALL-E X's character table, or Amphion's symbol table), the codec spec (EnCodec 24 kHz
at 6 kbps) and the default vocoder (Vocos for VALL-E X, as the original decodes) in its metadata.
Later loads never touch a pickle:

    python -m vall_e.convert hf://Plachta/VALL-E-X vallex.safetensors
    python -m vall_e "Hello there." voice.wav out.wav --model vallex.safetensors --reference-text "What the voice says."

`TTS.from_pretrained` (and so `python -m vall_e --model`) also accepts SRC directly and converts it
in memory each time.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from vall_e.models.model_file import write_export
from vall_e.models.vallex_checkpoint import load_vallex_model
from vall_e.text.amphion import read_symbols
from vall_e.text.symmap import Symmap
from vall_e.text.vallex import VallexFrontend

logger = logging.getLogger(__name__)

ENCODEC_6K = {"name": "encodec", "model": "facebook/encodec_24khz", "bandwidth": 6.0}


def frontend_spec(kind: str, local: Path) -> dict[str, Any]:
    if kind == "vallex":
        return VallexFrontend().spec()
    return {"name": "amphion", "symbols": read_symbols(local)}


def load_foreign(src: str | Path, n_heads: int | None = None) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """(models, meta) like `vall_e.models.model_file.load_exported`, from a published checkpoint."""
    model, local, kind = load_vallex_model(src, n_heads=n_heads)
    extra = {"text_frontend": json.dumps(frontend_spec(kind, local), ensure_ascii=False),
             "vocoder": "vocos" if kind == "vallex" else "encodec",
             "source": json.dumps({"checkpoint": str(src), "kind": kind})}
    meta = {"symmap": Symmap().to_json(), "langmap": "{}", "codec": dict(ENCODEC_6K), "stats": {},
            "extra": extra, "models": {"ar+nar": model.config.to_dict()}}
    return {"ar+nar": model}, meta


def convert(src: str | Path, out: str | Path, dtype: str = "float32", n_heads: int | None = None,
            codec_model: str | None = None) -> Path:
    models, meta = load_foreign(src, n_heads=n_heads)
    if codec_model:  # e.g. a folder with facebook/encodec_24khz saved for offline use
        meta["codec"]["model"] = str(codec_model)
    model = models["ar+nar"]
    return write_export(Path(out), {"ar+nar": model.state_dict()}, meta["models"], meta["symmap"], meta["langmap"],
                        meta["codec"], {"converted_from": str(src)}, dtype, extra=meta["extra"])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vall_e.convert",
                                description="Convert a published VALL-E checkpoint (VALL-E X, Amphion) to model.safetensors.")
    p.add_argument("src", help="vallex-checkpoint.pt, pytorch_model.bin, or hf://OWNER/REPO[/FILE]")
    p.add_argument("out", nargs="?", default="model.safetensors", help="output file (default model.safetensors)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--codec-model", default=None,
                   help="EnCodec hub id or local folder stored as the codec (default facebook/encodec_24khz)")
    p.add_argument("--n-heads", type=int, default=None,
                   help="attention heads (not stored in the weights; default d_model / 64 = 16, or Amphion's args.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = convert(args.src, args.out, args.dtype, args.n_heads, args.codec_model)
    print(f"converted {args.src} -> {out}")
    return 0


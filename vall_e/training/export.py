"""`python -m vall_e.export yaml=... [--dtype float32|bfloat16|float16] [--out PATH]`

Writes `ckpt/{name}/model.safetensors` from the latest training checkpoint (the format is
`vall_e.models.model_file`'s), after checking that the file will load: the weights fit the stored
model configs and the symbol and language maps parse.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

import torch

from vall_e.config import parse_config
from vall_e.models.model_file import build_network, check_maps, write_export
from vall_e.utils.dtypes import DTYPES
from vall_e.models.weights import check_weights, split_weights
from vall_e.training.engines.checkpoint import find_checkpoint, load_checkpoint
from vall_e.utils.errors import UserError


def export_checkpoint(step_dir: Path, out: Path, dtype: str = "float32") -> Path:
    """Export a training checkpoint folder to `out`."""
    weights, state = load_checkpoint(step_dir)
    meta = state.get("meta") or {}
    configs = meta.get("models")
    if not configs:
        raise UserError(f"{step_dir / 'state.pt'}: has no model configs to export")
    names = list(configs)
    source = str(step_dir / "model.safetensors")
    per_model = split_weights(weights, names)
    # Check before writing that the file will load: the weights fit the configs, the maps parse.
    for name in names:
        try:
            with torch.device("meta"):  # shapes and names only: no memory, no init time
                model = build_network(configs[name])
        except (TypeError, ValueError, UserError) as e:
            raise UserError(f"{step_dir / 'state.pt'}: model config for {name!r} is not usable ({e})") from None
        check_weights(model, per_model.get(name, {}), source)
    check_maps(meta.get("symmap"), meta.get("langmap"), str(step_dir / "state.pt"))
    if not isinstance(meta.get("codec") or {}, dict):
        raise UserError(f"{step_dir / 'state.pt'}: the stored codec spec is not a mapping")
    stats = {k: state.get(k) for k in ("step", "samples", "tokens")}
    stats["val_loss"] = state.get("val_loss")
    return write_export(out, per_model, configs, meta.get("symmap"), meta.get("langmap"),
                        meta.get("codec"), stats, dtype)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vall_e.export",
                                     description="Export model.safetensors from the latest training checkpoint.")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights' dtype in the file")
    parser.add_argument("--out", default=None, help="output path (default ckpt/{name}/model.safetensors)")
    cfg, args = parse_config(argv, parser)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_dir = cfg.ckpt_dir / cfg.model.full_name
    step_dir = find_checkpoint(run_dir, cfg.trainer.load_tag)
    if step_dir is None:
        raise UserError(f"{run_dir}: no training checkpoint to export (no 'latest' file); train first")
    out = Path(args.out) if args.out else run_dir / "model.safetensors"
    export_checkpoint(step_dir, out, args.dtype)
    print(f"exported {step_dir} -> {out}")
    return 0

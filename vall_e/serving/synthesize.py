"""`python -m vall_e TEXT REFERENCES [OUT]`: synthesize speech in the voice of the reference audio.

Every flag of the reference implementation is here (`--ar-temp`, `--top-p`, `--beam-width`, ...),
plus min-p, repetition-aware sampling, a seed, a batch mode, and one numbered file per text line.
The generation flags come from `vall_e.generation.settings.OPTIONS`, like every front end's.
References are joined with `;`. The model comes from `--model model.safetensors` or a training run's
`--yaml` (or `yaml=`).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from vall_e.config import parse_config
from vall_e.generation.settings import add_generation_flags, settings_from_args
from vall_e.generation.tts import TTS
from vall_e.serving.options import add_engine_options
from vall_e.utils.audio import concat_with_pauses, save_audio
from vall_e.utils.errors import UserError
from vall_e.utils.io import read_text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vall_e", description="Zero-shot TTS with VALL-E.")
    p.add_argument("text", help="text to speak; several lines give one output per line")
    p.add_argument("references", help="reference audio file(s) of the voice, joined with ';'")
    p.add_argument("out", nargs="?", default=None, help="output audio file (default: ./data/{time}.wav)")
    p.add_argument("--out-path", default=None, help="output audio file (same as the positional OUT)")
    p.add_argument("--yaml", default=None, help="training run config; its exported model is used")
    p.add_argument("--model", default=None, help="exported model.safetensors")
    p.add_argument("--ar-ckpt", default=None, help="alias of --model (the reference's flag)")
    p.add_argument("--nar-ckpt", default=None, help="accepted for compatibility; the exported file holds both")
    add_generation_flags(p)
    add_engine_options(p)
    p.add_argument("--amp", action="store_true", help="accepted for compatibility (use --dtype)")
    p.add_argument("--join", action="store_true", help="multi-line text: write one joined file")
    p.add_argument("--batch-file", default=None, help="read texts from this file, one per line (TEXT is then ignored; pass -)")
    p.add_argument("--batch-size", type=int, default=8, help="texts synthesized together")
    p.add_argument("--stream", action="store_true", help="stream: write audio as it is generated, report time to first audio")
    return p


def _numbered(path: Path, i: int, n: int) -> Path:
    return path if n == 1 else path.with_name(f"{path.stem}.{i:0{len(str(n))}d}{path.suffix}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    cfg, args = parse_config(argv, parser)
    model_path = args.model or args.ar_ckpt or args.yaml
    if model_path is None:
        default = cfg.ckpt_dir / cfg.model.full_name / "model.safetensors"
        if not default.exists():
            raise UserError("no model given: pass --model model.safetensors or --yaml/yaml= of a training run")
        model_path = default
    if args.batch_file:
        texts = [line.strip() for line in read_text(args.batch_file, "batch file").splitlines()]
    else:
        texts = [line.strip() for line in args.text.splitlines()]
    texts = [t for t in texts if t]
    if not texts:
        raise UserError("empty text: nothing to synthesize")
    out = Path(args.out or args.out_path or f"./data/{int(time.time())}.wav")

    vocoder = args.vocoder or cfg.inference.vocoder
    tts = TTS.from_pretrained(model_path, device=args.device, dtype=args.dtype, compile=args.compile,
                              **({"vocoder": vocoder} if vocoder else {}))
    settings = settings_from_args(args)
    if args.stream:
        stats: dict[str, float] = {}
        chunks = []
        for line in texts:
            for chunk in tts.stream(line, args.references, settings, stats=stats):
                chunks.append(chunk)
        save_audio(out, torch.cat(chunks), tts.sample_rate)
        print(json.dumps({"out": str(out), **{k: round(v, 3) for k, v in stats.items()}}))
        return 0
    wavs = []
    for start in tqdm(range(0, len(texts), args.batch_size), desc="synthesizing", unit="batch",
                      disable=len(texts) <= args.batch_size):
        wavs += tts.synthesize(texts[start:start + args.batch_size], args.references, settings)
    if args.join or len(wavs) == 1:
        wav = concat_with_pauses(wavs, tts.sample_rate, args.pause) if len(wavs) > 1 else wavs[0]
        save_audio(out, wav, tts.sample_rate)
        print(out)
    else:
        for i, wav in enumerate(wavs, 1):
            path = _numbered(out, i, len(wavs))
            save_audio(path, wav, tts.sample_rate)
            print(path)
    return 0

"""Command-line options that every front end shares: how the model is loaded (`TTS.from_pretrained`)."""
from __future__ import annotations

import argparse

from vall_e.generation.tts import ENGINE_DTYPES


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """`--device`, `--dtype`, `--compile` and `--vocoder`, with the same defaults and help everywhere."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=ENGINE_DTYPES,
                        help="int8: every Linear dynamically quantized (CPU only)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the AR decode step with torch.compile "
                             "(CPU: needs a C++ compiler; first call takes 1-4 min)")
    parser.add_argument("--vocoder", default=None, metavar="vocos|encodec|DIR",
                        help="decode EnCodec codes with Vocos (charactr/vocos-encodec-24khz, or a folder with its "
                             "config.yaml and pytorch_model.bin) or EnCodec (default: inference.vocoder, else the "
                             "model's: Vocos for VALL-E X)")

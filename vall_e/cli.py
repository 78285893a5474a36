"""The `vall-e` console script: one subcommand per `python -m vall_e.*` module.

`vall-e SUBCOMMAND ARGS...` runs exactly what `python -m vall_e.SUBCOMMAND ARGS...` runs, so the
reference's documented commands and the console script stay interchangeable.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

from vall_e.utils.errors import run_main

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "tts": ("vall_e.__main__", "synthesize speech: vall-e tts TEXT REFERENCES [OUT]"),
    "train": ("vall_e.train", "train a model: vall-e train yaml=PATH"),
    "export": ("vall_e.export", "export model.safetensors from the latest checkpoint"),
    "convert": ("vall_e.convert", "convert a published checkpoint (VALL-E X, Amphion) to model.safetensors"),
    "plot": ("vall_e.plot", "plot training metrics"),
    "data": ("vall_e.data.__main__", "dataset tools (hdf5, metadata, sample)"),
    "transcribe": ("vall_e.emb.transcribe", "cut long recordings into transcribed utterances (Whisper)"),
    "qnt": ("vall_e.emb.qnt", "quantize audio files to codec codes"),
    "g2p": ("vall_e.emb.g2p", "phonemize transcripts"),
    "corpus": ("vall_e.data.synthetic", "generate an offline espeak-ng speech corpus"),
    "webui": ("vall_e.webui", "Gradio web UI"),
    "server": ("vall_e.server", "HTTP API server"),
    "eval": ("vall_e.eval", "objective evaluation of synthesized speech"),
    "demo": ("vall_e.demo.__main__", "offline end-to-end demo"),
    "config": ("vall_e.config.__main__", "print the resolved configuration"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: vall-e SUBCOMMAND [ARGS...]", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        raise SystemExit(0)
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("vall_e"):
            print(f"error: `vall-e {name}` is not available in this version", file=sys.stderr)
            raise SystemExit(2) from None
        raise
    sys.argv = [f"vall-e {name}", *rest]
    run_main(module.main, rest)


if __name__ == "__main__":
    main()

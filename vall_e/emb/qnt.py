"""`python -m vall_e.emb.qnt DIR`: encode every audio file under DIR to `{id}.qnt.pt` beside it.

The id is the file name up to its first '.', as in the reference. Finished outputs are skipped, so
an interrupted run resumes; each output is written atomically, so a killed run leaves no partial
file. Clips are loaded and encoded in batches. The codec comes from the config (`codec.name=...`,
`codec.model=PATH`, `yaml=...`). With `codec.name=world --fit`, the offline codec's codebooks are
first fitted on the folder's audio.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from vall_e.codecs import build_codec
from vall_e.codecs.world import fit_world_codec
from vall_e.config import parse_config
from vall_e.emb.codes import save_codes
from vall_e.utils.audio import audio_duration, load_audio
from vall_e.utils.errors import UserError, run_main
from vall_e.utils.io import remove_stale_temps

QNT_SUFFIX = ".qnt.pt"
# Longest clip encoded by default. A codec encodes a clip in one pass, so a file of hours would need
# tens of GB; it is refused from its header instead (training utterances last seconds).
DEFAULT_MAX_SECONDS = 600.0


def file_id(path: Path) -> str:
    """The utterance id: the file name up to its first '.'."""
    return path.name.split(".", 1)[0]


def find_audio(root: Path, suffix: str) -> list[Path]:
    """Audio files under `root` whose names end in `suffix`, sorted; hidden/temporary files skipped."""
    suffix = suffix if suffix.startswith(".") else "." + suffix
    files = [p for p in root.rglob(f"*{suffix}")
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    files.sort()
    seen: dict[Path, Path] = {}
    for p in files:
        out = output_path(p)
        if out in seen:
            raise UserError(f"{p}: has the same id {file_id(p)!r} as {seen[out]}; both would write {out.name}")
        seen[out] = p
    return files


def output_path(audio: Path) -> Path:
    return audio.with_name(file_id(audio) + QNT_SUFFIX)


def _fit_world(cfg: Any, root: Path, wav_paths: list[Path]) -> Path:
    """Hook for `--fit`: fit the offline WORLD codec's codebooks on `wav_paths` before quantising."""
    out = cfg.resolve_path(cfg.codec.codebooks) if cfg.codec.codebooks else root / "codebooks.safetensors"
    if not wav_paths:
        raise UserError(f"--fit: no audio files under {root} to fit the codec on")
    fit_world_codec(wav_paths, out)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vall_e.emb.qnt",
        description="Encode audio files to codec codes ({id}.qnt.pt beside each file). "
                    "Config overrides go as key=value, e.g. codec.model=PATH or yaml=config.yaml.")
    p.add_argument("dir", type=Path, help="folder searched recursively for audio files")
    p.add_argument("--suffix", default=".wav", help="audio file suffix to look for (default .wav)")
    p.add_argument("--device", default=None, help="device for the codec (default: codec.device)")
    p.add_argument("--batch-size", type=int, default=16, help="clips encoded together (default 16)")
    p.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                   help=f"reject files longer than this (default {DEFAULT_MAX_SECONDS:g}; 0 = no limit)")
    p.add_argument("--fit", action="store_true",
                   help="with codec.name=world: fit the codebooks on DIR's audio first "
                        "(written to codec.codebooks, default DIR/codebooks.safetensors)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_config(argv, _parser())
    root: Path = args.dir
    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not args.max_seconds >= 0:
        raise UserError(f"--max-seconds must be 0 (no limit) or positive, got {args.max_seconds}")
    max_seconds = args.max_seconds or None
    files = find_audio(root, args.suffix)
    if not files:
        print(f"no *{args.suffix} files under {root}", file=sys.stderr)
        return 0

    spec: dict[str, Any] = {"name": cfg.codec.name, "model": cfg.codec.model, "bandwidth": cfg.codec.bandwidth,
                            "codebooks": str(cfg.resolve_path(cfg.codec.codebooks)) if cfg.codec.codebooks else "",
                            "device": args.device or cfg.codec.device}
    if args.fit:
        if cfg.codec.name != "world":
            raise UserError(f"--fit only applies to codec.name=world (got codec.name={cfg.codec.name})")
        if max_seconds is not None:  # fitting loads every file: refuse over-long ones from their headers
            for p in files:
                if audio_duration(p) > max_seconds:
                    raise UserError(f"{p}: {audio_duration(p):.1f} s is longer than the limit of {max_seconds:g} s "
                                    "(--max-seconds raises it; 0 = no limit)")
        spec["codebooks"] = str(_fit_world(cfg, root, files))
        print(f"fitted codebooks: {spec['codebooks']}", file=sys.stderr)

    remove_stale_temps(root, QNT_SUFFIX, recursive=True)  # left by a killed run
    todo = [p for p in files if not output_path(p).exists()]
    skipped = len(files) - len(todo)
    if not todo:
        print(f"all {len(files)} files already encoded", file=sys.stderr)
        return 0
    if args.fit and skipped:
        print(f"note: {skipped} existing {QNT_SUFFIX} files were kept; they were encoded before this fit",
              file=sys.stderr)

    codec = build_codec(spec)
    codec_spec = codec.spec()
    with torch.inference_mode(), tqdm(total=len(todo), desc="qnt", unit="file", dynamic_ncols=True) as bar:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            wavs, error = [], None
            for p in batch:
                try:
                    wavs.append(load_audio(p, codec.sample_rate, max_seconds=max_seconds))
                except UserError as e:
                    if "longer than the limit" in str(e):
                        e = UserError(f"{e} (--max-seconds raises it; 0 = no limit)")
                    error = e  # encode the files loaded before it, then stop
                    break
            for p, codes in zip(batch, codec.encode_batch(wavs) if wavs else []):
                save_codes(output_path(p), codes, codec_spec)
                bar.update(1)
            if error is not None:
                raise error
    print(f"encoded {len(todo)} files, skipped {skipped} already encoded", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)

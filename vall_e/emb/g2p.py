"""`python -m vall_e.emb.g2p DIR [--suffix .txt] [--language en] [--stress separate|merged] [key=value ...]`

Phonemizes every transcript `*{suffix}` under DIR (recursively) and writes `{id}.phn.txt` beside it,
where id is the file name up to its first `.` (the reference's convention). Existing outputs are
skipped, so an interrupted run resumes; every output is written atomically. Transcripts are
phonemized in batches (one espeak call per batch) for speed. A bad transcript (not UTF-8, empty,
nothing pronounceable) stops the run with `error: PATH: problem` and exit code 2; the outputs of the
files before it stay.

`--stress` picks the tokenizer's stress mode (`vall_e.text.phonemes`): `separate` (the default: `ˈ`
and `ˌ` are tokens of their own) or `merged` (the reference's rule, and every corpus phonemized before
the modes existed). A file shows its mode in its tokens, so a folder that already holds outputs in the
other mode is an error instead of a corpus of two modes; the dataset's `symmap.json` then records the
mode for training and the model file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from vall_e.config import parse_config
from vall_e.text.languages import normalize_language
from vall_e.text.phonemes import DEFAULT_STRESS, STRESS_MODES, phonemize_many, stress_of
from vall_e.text.symmap import format_phonemes, parse_phonemes
from vall_e.utils.errors import UserError, run_main
from vall_e.utils.io import atomic_write_text, read_text, remove_stale_temps

PHN_SUFFIX = ".phn.txt"


def output_path(src: Path) -> Path:
    """`{folder}/{id}.phn.txt` for a transcript, id = the name up to the first '.'."""
    return src.with_name(src.name.split(".", 1)[0] + PHN_SUFFIX)


def find_jobs(folder: Path, suffix: str) -> tuple[list[tuple[Path, Path]], int]:
    """(transcript, output) pairs still to do, sorted, and the number already done.

    Our own outputs, hidden files (e.g. temporary files) and anything that is not a file are ignored;
    two transcripts that would write the same output are an error.
    """
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    by_out: dict[Path, list[Path]] = {}
    for src in sorted(folder.rglob(f"*{suffix}")):
        if src.name.startswith(".") or src.name.endswith(PHN_SUFFIX) or not src.is_file():
            continue
        by_out.setdefault(output_path(src), []).append(src)
    if not by_out:
        raise UserError(f"{folder}: no *{suffix} files found")
    jobs, done = [], 0
    for out, srcs in sorted(by_out.items()):
        if out.exists():
            done += 1
            continue
        if len(srcs) > 1:
            names = ", ".join(s.name for s in srcs)
            raise UserError(f"{out.parent}: {names} would all write {out.name}; choose one with --suffix")
        jobs.append((srcs[0], out))
    return jobs, done


def existing_stress(folder: Path) -> tuple[str, Path] | None:
    """(stress mode, file) of the first `.phn.txt` under `folder` whose tokens show a mode, or None."""
    for path in sorted(folder.rglob(f"*{PHN_SUFFIX}")):
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            mode = stress_of(parse_phonemes(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            continue  # the dataset tools report a bad file where they read it
        if mode is not None:
            return mode, path
    return None


def phonemize_files(jobs: Sequence[tuple[Path, Path]], language: str, batch_size: int = 64,
                    progress: bool = True, stress: str = DEFAULT_STRESS) -> int:
    """Phonemize and write each job in order; raise UserError at the first bad file. Returns count."""
    written = 0
    with tqdm(total=len(jobs), desc="g2p", unit="file", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            texts: list[str] = []
            failure: UserError | None = None
            for src, _ in batch:  # read up to the first bad file; the ones before it still get written
                try:
                    texts.append(read_text(src, "transcript"))
                except UserError as e:
                    failure = e
                    break
            results = phonemize_many(texts, language, on_error="return", stress=stress) if texts else []
            for (src, out), tokens in zip(batch, results):
                if isinstance(tokens, UserError):
                    raise UserError(f"{src}: {tokens}")
                atomic_write_text(out, format_phonemes(tokens) + "\n")
                written += 1
                bar.update(1)
            if failure is not None:
                raise failure
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vall_e.emb.g2p",
        description="Write {id}.phn.txt (IPA phonemes) beside every transcript under DIR. "
        "Also takes key=value config overrides (e.g. yaml=PATH, dataset.language=de).",
    )
    parser.add_argument("folder", metavar="DIR", help="folder searched recursively for transcripts")
    parser.add_argument("--suffix", default=".txt", help="transcript file ending (default .txt)")
    parser.add_argument("--language", default=None,
                        help="language code, e.g. en, de, fr-fr, en-gb (default: dataset.language, en)")
    parser.add_argument("--stress", choices=STRESS_MODES, default=DEFAULT_STRESS,
                        help="stress marks as tokens of their own (separate, the default) or merged onto the "
                        "phone before them (merged: the reference's rule, for corpora phonemized before)")
    parser.add_argument("--batch-size", type=int, default=64, help="transcripts per espeak call")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    cfg, args = parse_config(argv, parser)
    language = args.language or cfg.dataset.language
    normalize_language(language)  # fail on a bad code before any work
    if not args.suffix or args.suffix == PHN_SUFFIX:
        raise UserError(f"--suffix must name the transcripts' ending, not {args.suffix!r}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    jobs, done = find_jobs(Path(args.folder), args.suffix)
    existing = existing_stress(Path(args.folder)) if done and jobs else None
    if existing is not None and existing[0] != args.stress:
        raise UserError(f"{existing[1]}: already phonemized with --stress {existing[0]}, and a folder must hold one "
                        f"mode; finish it with --stress {existing[0]}, or delete its {PHN_SUFFIX} files to redo them")
    remove_stale_temps(Path(args.folder), PHN_SUFFIX, recursive=True)  # left by a killed run
    written = phonemize_files(jobs, language, args.batch_size, progress=not args.quiet, stress=args.stress)
    print(f"wrote {written} phoneme files, {done} already present")
    return 0


if __name__ == "__main__":
    run_main(main)

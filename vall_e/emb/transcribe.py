"""`python -m vall_e.emb.transcribe IN_DIR OUT_DIR [--model openai/whisper-large-v3-turbo] [--language en]`

From raw recordings to a dataset: every audio file under IN_DIR (podcasts, audiobooks, takes of any
length) is cut into utterances at pauses, transcribed with Whisper (through `transformers`), and
written as `OUT_DIR/{group}/{speaker}/{file}_{n:04d}.wav` + `.txt`, the layout `emb.g2p` and
`emb.qnt` read, with a manifest `OUT_DIR/manifest.jsonl` (one JSON line per utterance: source file,
start, end, text, language, confidence).

How a file is cut (`vall_e.emb.segment`): the signal's energy finds the pauses, the stretches where
a cut cannot split a word. Whisper transcribes the file in windows of up to 30 s cut at pauses, and
its timestamps mark the pauses where its sentences end; utterances of `--min-seconds` to
`--max-seconds` are then chosen to keep the most speech, cutting at those sentence ends where it can
and at other pauses where it must. An utterance cut where Whisper's sentences do not end is
transcribed again on its own, so its text is the text of its audio.

Speakers: a file's speaker is its folder (`IN_DIR/alice/take1.wav` -> `OUT_DIR/{group}/alice/`,
group = `--group`, default IN_DIR's name); files in `IN_DIR/{group}/{speaker}/` keep both names.

Same guarantees as the other prep commands: finished source files are skipped (a file is finished
when its record `OUT_DIR/.transcribe/{group}/{speaker}/{file}.jsonl` exists), so an interrupted run
resumes; every output is written atomically; corrupt, silent and unsupported files are named in one
line and skipped; the end summary gives hours in, hours kept, segments, and what was dropped and why.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import soundfile as sf
import soxr
import torch
from tqdm import tqdm

from vall_e.emb.segment import Phrase, SegmentConfig, Utterance, chunk_phrases, find_phrases, plan_utterances
from vall_e.utils.audio import load_audio, save_audio
from vall_e.utils.errors import UserError, run_main
from vall_e.utils.hub import check_model_type, load_pretrained, quiet_transformers
from vall_e.utils.io import atomic_write_text, remove_stale_temps

DEFAULT_MODEL = "openai/whisper-large-v3-turbo"
WHISPER_RATE = 16_000
RECORD_DIR = ".transcribe"  # per-source records: a source is finished when its record exists
MANIFEST = "manifest.jsonl"
# Files soundfile (libsndfile) reads; the unsupported list names common formats it cannot.
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".caf", ".w64", ".rf64"}
UNSUPPORTED_SUFFIXES = {".m4a", ".aac", ".wma", ".mp4", ".webm", ".mkv", ".amr", ".ape", ".mov"}
BOUNDARY_TOLERANCE = 0.3  # seconds: how far a Whisper segment boundary may lie from the pause it marks


# ---------------------------------------------------------------------------------------------
# Whisper


def load_whisper(name: str, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """(model, processor) from a hub id or a local folder written by `save_pretrained`, one-line errors."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    def load(source: str) -> tuple[Any, Any]:
        return WhisperForConditionalGeneration.from_pretrained(source), WhisperProcessor.from_pretrained(source)

    model, processor = load_pretrained(name, "--model", "Whisper model",
                                       ["WhisperForConditionalGeneration", "WhisperProcessor"], "--model DIR", load)
    check_model_type(model, "whisper", "--model", name, "Whisper")
    return model.to(device=device, dtype=dtype).eval(), processor


@dataclass
class Piece:
    """Text Whisper gave between two timestamps (seconds from the window's start; end None: unfinished)."""

    start: float
    end: float | None
    text: str
    logprob: float  # sum over its tokens
    tokens: int


def clean_text(text: str) -> str:
    """One line: control and format characters dropped, whitespace collapsed."""
    text = "".join(" " if unicodedata.category(c)[0] in "CZ" else c for c in text)
    return " ".join(text.split())


class Whisper:
    """Batched Whisper decoding of clips of at most 30 s, with timestamps and token log-probabilities.

    One `generate` call per batch (no long-form re-seeking): the clips are already cut at pauses.
    """

    def __init__(self, model: Any, processor: Any, batch_size: int) -> None:
        self.model, self.processor, self.batch_size = model, processor, batch_size
        gc = model.generation_config
        self.multilingual = bool(getattr(gc, "is_multilingual", False)) and bool(getattr(gc, "lang_to_id", None))
        self.timestamp_begin = int(gc.no_timestamps_token_id) + 1
        self.eos = int(gc.eos_token_id if not isinstance(gc.eos_token_id, list) else gc.eos_token_id[0])
        self.device, self.dtype = model.device, model.dtype

    def language_code(self, language: str) -> str:
        """The Whisper code (`en`) of a user's code or name; English-only models take only `en`."""
        from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

        key = language.strip().lower()
        code = TO_LANGUAGE_CODE.get(key, key)
        if not self.multilingual:
            if code != "en":
                raise UserError(f"--language {language}: this Whisper model is English-only")
            return code
        if f"<|{code}|>" not in self.model.generation_config.lang_to_id:
            raise UserError(f"--language {language}: not a language this Whisper model knows "
                            "(use a code such as en, de, fr, es)")
        return code

    def _features(self, clips: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.processor.feature_extractor(list(clips), sampling_rate=WHISPER_RATE, return_tensors="pt",
                                             return_attention_mask=True)
        return f.input_features.to(self.device, self.dtype), f.attention_mask.to(self.device)

    def detect(self, clips: Sequence[np.ndarray]) -> list[str]:
        """The language code Whisper hears in each clip."""
        id_to_code = {v: k[2:-2] for k, v in self.model.generation_config.lang_to_id.items()}
        out: list[str] = []
        with torch.inference_mode(), quiet_transformers():
            for b in range(0, len(clips), self.batch_size):
                feats, _ = self._features(clips[b:b + self.batch_size])
                out += [id_to_code[int(t)] for t in self.model.detect_language(feats).reshape(-1).tolist()]
        return out

    def transcribe(self, clips: Sequence[np.ndarray], languages: Sequence[str],
                   progress: Callable[[float], None] | None = None) -> list[list[Piece]]:
        """Timestamped pieces of each clip (16 kHz mono), batched; longest clips first. `progress` is
        called with the seconds of audio of each finished batch."""
        order = sorted(range(len(clips)), key=lambda k: -len(clips[k]))
        result: list[list[Piece]] = [[] for _ in clips]
        with torch.inference_mode(), quiet_transformers():
            for b in range(0, len(order), self.batch_size):
                idx = order[b:b + self.batch_size]
                feats, mask = self._features([clips[k] for k in idx])
                kwargs: dict[str, Any] = {"task": "transcribe", "language": [languages[k] for k in idx]} \
                    if self.multilingual else {}
                out = self.model.generate(feats, attention_mask=mask, return_timestamps=True,
                                          force_unique_generate_call=True, return_dict_in_generate=True,
                                          output_scores=True, **kwargs)
                logprobs = self.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
                n_new = logprobs.shape[1]
                for row, k in enumerate(idx):
                    tokens = out.sequences[row, -n_new:].tolist()
                    result[k] = self._pieces(tokens, logprobs[row].float().tolist())
                if progress is not None:
                    progress(sum(len(clips[k]) for k in idx) / WHISPER_RATE)
        return result

    def _pieces(self, tokens: list[int], logprobs: list[float]) -> list[Piece]:
        """Split decoded tokens at timestamp tokens into pieces with their text and log-probabilities."""
        pieces: list[Piece] = []
        text_ids: list[int] = []
        lp, start = 0.0, 0.0

        def close(end: float | None) -> None:
            nonlocal text_ids, lp
            if text_ids:
                text = self.processor.tokenizer.decode(text_ids, skip_special_tokens=True)
                pieces.append(Piece(start, end, text, lp, len(text_ids)))
            text_ids, lp = [], 0.0

        for tok, p in zip(tokens, logprobs):
            if tok == self.eos:
                break
            if tok >= self.timestamp_begin:
                t = (tok - self.timestamp_begin) * 0.02
                close(t)
                start = t
            elif math.isfinite(p):
                text_ids.append(tok)
                lp += p
        close(None)
        return pieces


# ---------------------------------------------------------------------------------------------
# one recording


@dataclass
class Source:
    """A recording and where its utterances go."""

    path: Path
    rel: str  # path under IN_DIR, for the manifest
    group: str
    speaker: str
    stem: str  # utterance ids are {stem}_{n:04d}
    seconds: float


@dataclass
class Span:
    """Text Whisper gave between two pauses known to be sentence boundaries (pause k: after phrase k)."""

    left: int
    right: int
    text: str
    logprob: float
    tokens: int
    language: str


@dataclass
class Planned:
    """One recording on its way: its audio, phrases, Whisper spans and chosen utterances."""

    source: Source
    wav: np.ndarray  # at the output rate
    rate: int
    wav16: np.ndarray
    phrases: list[Phrase]
    chunks: list[tuple[int, int, float, float]] = field(default_factory=list)
    chunk_language: list[str] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    utterances: list[Utterance] = field(default_factory=list)
    texts: list[tuple[str, float, str] | None] = field(default_factory=list)  # text, confidence, language
    dropped: dict[str, float] = field(default_factory=dict)


def _clip(wav16: np.ndarray, start: float, end: float) -> np.ndarray:
    return wav16[int(round(start * WHISPER_RATE)):int(round(end * WHISPER_RATE))]


def spans_of_chunk(phrases: Sequence[Phrase], chunk: tuple[int, int, float, float], pieces: Sequence[Piece],
                   language: str) -> list[Span]:
    """The chunk's text split at the pauses where Whisper's segments end.

    A boundary between two of Whisper's segments marks pause k when it lies within
    BOUNDARY_TOLERANCE of it; a boundary that matches no pause (Whisper's timestamps drift, or are
    noise from a weak model) is not trusted, and the text on both sides stays together.
    """
    first, last, offset, _ = chunk
    bounds, texts = [first - 1], [[]]  # type: list[int], list[list[Piece]]
    for prev, piece in zip(pieces, pieces[1:]):
        texts[-1].append(prev)
        if prev.end is None:
            continue
        t = offset + (prev.end + piece.start) / 2
        best, best_d = None, BOUNDARY_TOLERANCE
        for k in range(max(first, bounds[-1] + 1), last):  # pauses inside the chunk, after the last boundary
            lo, hi = phrases[k].end, phrases[k + 1].start
            d = 0.0 if lo <= t <= hi else min(abs(t - lo), abs(t - hi))
            if d <= best_d:
                best, best_d = k, d
        if best is not None:
            bounds.append(best)
            texts.append([])
    if pieces:
        texts[-1].append(pieces[-1])
    bounds.append(last)
    return [Span(left, right, " ".join(p.text for p in ps), sum(p.logprob for p in ps), sum(p.tokens for p in ps),
                 language) for left, right, ps in zip(bounds, bounds[1:], texts)]


def text_from_spans(spans: Sequence[Span], left: int, right: int) -> tuple[str, float, str] | None:
    """(text, confidence, language) of the pauses left..right when spans chain exactly from one to the
    other (both are sentence boundaries), else None (the utterance needs its own transcription)."""
    chain = [s for s in spans if s.left >= left and s.right <= right]
    if not chain or chain[0].left != left or chain[-1].right != right \
            or any(a.right != b.left for a, b in zip(chain, chain[1:])):
        return None
    tokens = sum(s.tokens for s in chain)
    conf = math.exp(sum(s.logprob for s in chain) / tokens) if tokens else 0.0
    return " ".join(s.text for s in chain), conf, chain[0].language


def _language_of(p: Planned, utt: Utterance) -> str:
    for (first, last, _, _), lang in zip(p.chunks, p.chunk_language):
        if first <= utt.first <= last:
            return lang
    return p.chunk_language[0] if p.chunk_language else "en"


def process(batch: list[Planned], whisper: Whisper, cfg: SegmentConfig, language: str | None,
            progress: Callable[[float], None] | None = None) -> None:
    """Transcribe and plan a batch of recordings in place: Whisper over every chunk of every recording
    at once, the plan per recording, then one more batched pass over the utterances whose edges are
    not Whisper's sentence ends."""
    jobs = [(p, c) for p in batch for c in chunk_phrases(p.phrases, cfg)]
    clips = [_clip(p.wav16, c[2], c[3]) for p, c in jobs]
    langs = [language or "en"] * len(clips) if language or not whisper.multilingual else whisper.detect(clips)
    pieces = whisper.transcribe(clips, langs, progress) if clips else []
    for (p, chunk), lang, ps in zip(jobs, langs, pieces):
        p.chunks.append(chunk)
        p.chunk_language.append(lang)
        p.spans += spans_of_chunk(p.phrases, chunk, ps, lang)
    redo: list[tuple[Planned, int]] = []
    for p in batch:
        preferred = {s.left for s in p.spans} | {s.right for s in p.spans}
        p.utterances, p.dropped = plan_utterances(p.phrases, cfg, preferred)
        p.texts = [text_from_spans(p.spans, u.first - 1, u.last) for u in p.utterances]
        redo += [(p, n) for n, t in enumerate(p.texts) if t is None]
    if redo:
        again = whisper.transcribe([_clip(p.wav16, p.utterances[n].start, p.utterances[n].end) for p, n in redo],
                                   [_language_of(p, p.utterances[n]) for p, n in redo])
        for (p, n), ps in zip(redo, again):
            tokens = sum(x.tokens for x in ps)
            conf = math.exp(sum(x.logprob for x in ps) / tokens) if tokens else 0.0
            p.texts[n] = (" ".join(x.text for x in ps), conf, _language_of(p, p.utterances[n]))


def record_path(out: Path, src: Source) -> Path:
    return out / RECORD_DIR / src.group / src.speaker / f"{src.stem}.jsonl"


def write_outputs(out: Path, p: Planned) -> list[dict[str, Any]]:
    """Write the kept utterances' wav + txt, then the source's record (which marks it finished)."""
    src = p.source
    folder = out / src.group / src.speaker
    if folder.is_dir():  # outputs of an earlier, unfinished run of this source
        pattern = re.compile(rf"^{re.escape(src.stem)}_\d{{4}}\..+$")
        for old in folder.iterdir():
            if pattern.match(old.name) and old.is_file():
                old.unlink()
    rows: list[dict[str, Any]] = []
    no_text = 0.0
    for utt, got in zip(p.utterances, p.texts):
        text, conf, lang = got if got is not None else ("", 0.0, "")
        text = clean_text(text)
        if not any(c.isalnum() for c in text):
            no_text += utt.seconds
            continue
        uid = f"{src.stem}_{len(rows):04d}"
        a, b = int(round(utt.start * p.rate)), int(round(utt.end * p.rate))
        save_audio(folder / f"{uid}.wav", p.wav[a:b], p.rate)
        atomic_write_text(folder / f"{uid}.txt", text + "\n")
        rows.append({"id": uid, "path": f"{src.group}/{src.speaker}/{uid}.wav", "source": src.rel,
                     "start": round(a / p.rate, 4), "end": round(b / p.rate, 4), "text": text, "language": lang,
                     "confidence": round(conf, 4)})
    p.dropped["no words recognized"] = no_text
    summary = {"source": src.rel, "seconds": round(src.seconds, 3),
               "dropped": {k: round(v, 3) for k, v in p.dropped.items()}}
    atomic_write_text(record_path(out, src), "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                      for r in [{"summary": summary}] + rows))
    return rows


def read_record(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[0]["summary"], lines[1:]


def write_manifest(out: Path) -> int:
    """Rebuild OUT_DIR/manifest.jsonl from every finished source's record; returns its rows."""
    rows: list[dict[str, Any]] = []
    records = out / RECORD_DIR
    for rec in sorted(records.rglob("*.jsonl")) if records.is_dir() else []:
        if rec.name.startswith("."):
            continue
        try:
            rows += read_record(rec)[1]
        except (OSError, ValueError, KeyError, IndexError):
            print(f"skipped: {rec}: unreadable record; delete it to transcribe its source again", file=sys.stderr)
    atomic_write_text(out / MANIFEST, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)


# ---------------------------------------------------------------------------------------------
# finding the recordings


def _safe_name(name: str) -> str:
    """A file or folder name usable in an utterance id (the id ends at the first '.')."""
    return re.sub(r"[.\s/\\]+", "_", name).strip("_") or "audio"


def find_sources(in_dir: Path, out_dir: Path, group: str) -> tuple[list[Source], list[str]]:
    """Audio files under `in_dir` (outside `out_dir`, hidden ones skipped) and one-line problems."""
    if not in_dir.is_dir():
        raise UserError(f"{in_dir}: no such folder")
    out_res = out_dir.resolve()
    sources: list[Source] = []
    problems: list[str] = []
    seen: dict[tuple[str, str, str], Path] = {}
    for path in sorted(in_dir.rglob("*")):
        rel = path.relative_to(in_dir)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.resolve().is_relative_to(out_res):
            continue
        suffix = path.suffix.lower()
        if suffix in UNSUPPORTED_SUFFIXES:
            problems.append(f"{path}: unsupported format {suffix}; convert it to wav or flac "
                            f"(e.g. ffmpeg -i {path.name} {path.stem}.flac)")
            continue
        if suffix not in AUDIO_SUFFIXES:
            continue
        folders = rel.parts[:-1]
        if not folders:
            grp, spk = group, _safe_name(in_dir.resolve().name)
        elif len(folders) == 1:
            grp, spk = group, _safe_name(folders[0])
        else:
            grp, spk = _safe_name(folders[0]), _safe_name("_".join(folders[1:]))
        stem = _safe_name(path.stem)
        key = (grp, spk, stem)
        if key in seen:
            problems.append(f"{path}: would write the same utterance ids ({stem}_NNNN) as {seen[key]}; rename one")
            continue
        try:
            info = sf.info(str(path))
            seconds = float(info.duration)
        except Exception as e:  # soundfile raises several types for bad headers
            msg = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            problems.append(f"{path}: cannot read audio ({msg[:120]}); the file is corrupt, truncated or not audio")
            continue
        seen[key] = path
        sources.append(Source(path, rel.as_posix(), grp, spk, stem, seconds))
    return sources, problems


# ---------------------------------------------------------------------------------------------
# the command


def _device_and_dtype(device: str | None, dtype: str) -> tuple[str, torch.dtype]:
    from vall_e.utils.dtypes import torch_dtype

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {dev}: no CUDA device is available here; use --device cpu")
    if dtype == "auto":
        if not dev.startswith("cuda"):
            return dev, torch.float32
        return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return dev, torch_dtype(dtype)


def _parser() -> argparse.ArgumentParser:
    d = SegmentConfig()
    p = argparse.ArgumentParser(
        prog="python -m vall_e.emb.transcribe",
        description="Cut long recordings into utterances at pauses, transcribe them with Whisper and write "
                    "OUT_DIR/{group}/{speaker}/{file}_{n:04d}.wav + .txt and OUT_DIR/manifest.jsonl.")
    p.add_argument("in_dir", type=Path, metavar="IN_DIR", help="folder of recordings; one speaker per subfolder")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="dataset folder written")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"Whisper hub id or local folder (default {DEFAULT_MODEL})")
    p.add_argument("--language", default=None, help="language code, e.g. en (default: Whisper detects it)")
    p.add_argument("--group", default=None, help="group folder for IN_DIR's speakers (default: IN_DIR's name)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16/float16 on CUDA, float32 on CPU), float32, "
                   "float16, bfloat16")
    p.add_argument("--batch-size", type=int, default=16, help="clips decoded together (default 16)")
    p.add_argument("--sample-rate", type=int, default=0, help="rate of the written clips (default 0: the source's)")
    p.add_argument("--min-seconds", type=float, default=d.min_seconds,
                   help=f"shortest utterance (default {d.min_seconds:g})")
    p.add_argument("--max-seconds", type=float, default=d.max_seconds,
                   help=f"longest utterance, at most 29 (default {d.max_seconds:g})")
    p.add_argument("--min-pause", type=float, default=d.min_pause,
                   help=f"shortest silence a cut may use, seconds (default {d.min_pause:g})")
    p.add_argument("--pad", type=float, default=d.pad, help=f"silence kept around an utterance (default {d.pad:g} s)")
    p.add_argument("--silence-db", type=float, default=d.silence_db,
                   help=f"dB below the speech level that count as silence (default {d.silence_db:g})")
    p.add_argument("--diarize", action="store_true", help="split recordings by speaker (not available, see README)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _batches(sources: Sequence[Source], batch_size: int) -> Iterator[list[Source]]:
    """Recordings grouped so that Whisper gets about `batch_size` 30 s windows per group."""
    group: list[Source] = []
    seconds = 0.0
    for s in sources:
        group.append(s)
        seconds += s.seconds
        if seconds >= batch_size * 25.0:
            yield group
            group, seconds = [], 0.0
    if group:
        yield group


def _load(src: Source, cfg: SegmentConfig, rate: int) -> Planned:
    info_rate = sf.info(str(src.path)).samplerate
    out_rate = rate or info_rate
    wav = load_audio(src.path, info_rate).numpy()
    wav16 = soxr.resample(wav, info_rate, WHISPER_RATE, quality="HQ").astype(np.float32) \
        if info_rate != WHISPER_RATE else wav
    if out_rate != info_rate:
        wav = soxr.resample(wav, info_rate, out_rate, quality="HQ").astype(np.float32)
    return Planned(src, wav, out_rate, wav16, find_phrases(wav16, WHISPER_RATE, cfg))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.diarize:
        raise UserError("--diarize: not available: splitting one recording by speaker needs pyannote.audio, whose "
                        "models are gated on the Hugging Face hub (a token and accepted terms), so no extra installs "
                        "it; put each speaker's recordings in a folder of their own")
    cfg = SegmentConfig(args.min_seconds, args.max_seconds, args.min_pause, args.pad, args.silence_db)
    cfg.check()
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.sample_rate and args.sample_rate < 8000:
        raise UserError(f"--sample-rate must be 0 (the source's) or at least 8000, got {args.sample_rate}")
    in_dir, out = args.in_dir, args.out_dir
    group = _safe_name(args.group or in_dir.resolve().name)
    sources, problems = find_sources(in_dir, out, group)
    for line in problems:
        print(f"skipped: {line}", file=sys.stderr)
    todo = [s for s in sources if not record_path(out, s).exists()]
    done = len(sources) - len(todo)
    stats = {"files": 0, "seconds": 0.0, "kept": 0.0, "segments": 0, "failed": len(problems)}
    dropped: dict[str, float] = {}
    if todo:
        device, dtype = _device_and_dtype(args.device, args.dtype)
        model, processor = load_whisper(args.model, device, dtype)
        whisper = Whisper(model, processor, args.batch_size)
        language = whisper.language_code(args.language) if args.language else None
        if out.is_dir():
            for suffix in (".wav", ".txt", ".jsonl"):  # left by a killed run
                remove_stale_temps(out, suffix, recursive=True)
        total_h = sum(s.seconds for s in todo) / 3600
        with tqdm(total=total_h, unit="h", desc="transcribe", disable=args.quiet, file=sys.stderr,
                  bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.3f}/{total:.3f} h [{elapsed}<{remaining}]{postfix}",
                  dynamic_ncols=True) as bar:
            done_h = 0.0  # hours of the groups finished; within a group the bar follows Whisper's batches

            def advance(seconds: float) -> None:
                bar.update(max(0.0, min(seconds / 3600, done_h + 0.95 * group_h - bar.n)))

            for chunk in _batches(todo, args.batch_size):
                group_h = sum(s.seconds for s in chunk) / 3600
                loaded: list[Planned] = []
                for src in chunk:
                    try:
                        loaded.append(_load(src, cfg, args.sample_rate))
                    except UserError as e:
                        tqdm.write(f"skipped: {e}", file=sys.stderr)
                        stats["failed"] += 1
                if loaded:
                    process(loaded, whisper, cfg, language, advance)
                for p in loaded:
                    rows = write_outputs(out, p)
                    stats["files"] += 1
                    stats["seconds"] += p.source.seconds
                    stats["segments"] += len(rows)
                    stats["kept"] += sum(r["end"] - r["start"] for r in rows)
                    for k, v in p.dropped.items():
                        dropped[k] = dropped.get(k, 0.0) + v
                done_h += group_h
                bar.update(max(0.0, min(done_h, bar.total) - bar.n))
                bar.set_postfix_str(f"{stats['files'] + stats['failed'] - len(problems)}/{len(todo)} files, "
                                    f"{stats['segments']} segments")
    if out.is_dir() or sources:
        rows = write_manifest(out)
    else:
        rows = 0
    speech_dropped = sum(dropped.values())
    silence = max(0.0, stats["seconds"] - stats["kept"] - speech_dropped)
    reasons = {"too short": "of speech in pieces too short to make a segment",
               "too long": f"of speech running over {cfg.max_seconds:g} s without a pause",
               "no words recognized": "of segments in which Whisper recognized no words"}
    why = "".join(f", {v:.1f} s {reasons.get(k, k)}" for k, v in dropped.items() if v > 0)
    print(f"transcribed {stats['files']} files: {stats['seconds'] / 3600:.3f} h in, {stats['kept'] / 3600:.3f} h kept "
          f"in {stats['segments']} segments of {cfg.min_seconds:g}-{cfg.max_seconds:g} s; dropped: {silence:.1f} s "
          f"of pauses between segments{why}", file=sys.stderr)
    print(f"{done} files already done, {stats['failed']} skipped as unreadable or unsupported (named above); "
          f"{out / MANIFEST}: {rows} segments", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)

"""`python -m vall_e.eval`: objective metrics for synthesized speech, offline on CPU.

For each item of a list (text, prompt = reference audio of the voice, optional reference = the
ground-truth audio of the text) it synthesizes the text with a model (or takes `{id}.wav` from a
folder with `--wavs`) and measures: MCD-DTW, duration ratio, F0 RMSE and V/UV error against the
reference; speaker similarity to the prompt (resemblyzer, when installed); WER/CER of a local
recognizer's transcript (pocketsphinx, or a cached whisper model). It writes a JSON report
atomically and prints a table. See `vall_e.evaluation.metrics` for how each number is computed.

    python -m vall_e.eval --model model.safetensors --list items.jsonl [--out report.json]
    python -m vall_e.eval --wavs synthesized/ --list items.tsv

List: JSONL (one object per line) or TSV with a header row; columns `text`, `prompt`, optional
`reference` and `id` (default: the 1-based item number, zero-padded: 0001, 0002, ...). Relative
audio paths are resolved against the list's folder.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import soundfile as sf
from tqdm import tqdm

from vall_e.evaluation import metrics as M
from vall_e.generation.settings import add_generation_flags, settings_from_args
from vall_e.generation.tts import TTS
from vall_e.utils.audio import audio_duration, load_audio, save_audio
from vall_e.utils.dtypes import FLOAT_DTYPES
from vall_e.utils.errors import UserError
from vall_e.utils.io import atomic_write_text, read_text

REPORT_VERSION = 1
EVAL_SEED = 0  # the one default eval sets apart from every other front end: evaluations are reproducible
# Longest audio file scored (prompt, reference or synthesized clip): the signal metrics analyse whole
# clips, so an hours-long file is refused from its header instead of exhausting memory.
MAX_AUDIO_SECONDS = 120.0
COLUMNS = ("id", "text", "prompt", "reference")
# per-item numeric metrics, in table order: (key, table header, format)
METRICS = (
    ("mcd_dtw", "MCD-DTW", "{:.2f}"),
    ("duration_ratio", "dur", "{:.2f}"),
    ("f0_rmse_cents", "F0 c", "{:.0f}"),
    ("f0_rmse_hz", "F0 Hz", "{:.1f}"),
    ("vuv_error", "V/UV", "{:.2f}"),
    ("speaker_similarity", "SIM", "{:.3f}"),
    ("wer", "WER", "{:.2f}"),
    ("cer", "CER", "{:.2f}"),
    ("reference_speaker_similarity", "SIM ref", "{:.3f}"),
    ("reference_wer", "WER ref", "{:.2f}"),
    ("reference_cer", "CER ref", "{:.2f}"),
)
_REFERENCE_METRICS = ("mcd_dtw", "duration_ratio", "f0_rmse_cents", "f0_rmse_hz", "vuv_error")


@dataclass
class EvalItem:
    """One evaluation case. `prompt` is the voice to clone; `reference` the ground truth of `text`."""

    id: str
    text: str
    prompt: Path | None = None
    reference: Path | None = None


Audio = Union[str, Path, tuple[Any, int]]  # a file, or (waveform, sample rate)


# ---------------------------------------------------------------------------------------------
# list files


def _item_from(row: Mapping[str, Any], index: int, where: str, base: Path) -> EvalItem:
    unknown = sorted(set(row) - set(COLUMNS))
    if unknown:
        raise UserError(f"{where}: unknown column(s) {', '.join(map(repr, unknown))}; expected {', '.join(COLUMNS)}")
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}: missing or empty 'text'")
    if not M.normalize_text(text):
        raise UserError(f"{where}: 'text' {text!r} has no words")

    def path(key: str) -> Path | None:
        v = row.get(key)
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        if not isinstance(v, str):
            raise UserError(f"{where}: '{key}' must be a path string, got {type(v).__name__}")
        p = Path(v.strip()).expanduser()
        return p if p.is_absolute() else base / p

    ident = row.get("id")
    if ident is None or (isinstance(ident, str) and not ident.strip()):
        ident = f"{index:04d}"
    ident = str(ident).strip()
    if "/" in ident or "\\" in ident or ident in (".", ".."):
        raise UserError(f"{where}: 'id' {ident!r} must not contain path separators")
    return EvalItem(id=ident, text=" ".join(text.split()), prompt=path("prompt"), reference=path("reference"))


def read_list(path: str | Path, *, need_prompt: bool = True, check_audio: bool = True) -> list[EvalItem]:
    """Parse a JSONL or TSV item list; every problem is a one-line `UserError` naming file and line."""
    path = Path(path)
    text = read_text(path, "list file")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise UserError(f"{path}: the list is empty")
    base = path.parent
    items: list[EvalItem] = []
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson") or lines[0][1].lstrip().startswith("{"):
        for n, line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not a JSON object ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            items.append(_item_from(row, len(items) + 1, f"{path}:{n}", base))
    else:
        header = [h.strip().lower() for h in lines[0][1].split("\t")]
        if "text" not in header:
            raise UserError(f"{path}:{lines[0][0]}: the TSV needs a header row naming its columns "
                            f"(text, prompt, reference, id), got {lines[0][1][:60]!r}")
        if len(set(header)) != len(header):
            raise UserError(f"{path}:{lines[0][0]}: repeated column name in the header")
        for n, line in lines[1:]:
            cells = line.split("\t")
            if len(cells) > len(header):
                raise UserError(f"{path}:{n}: {len(cells)} tab-separated fields, the header has {len(header)}")
            row = dict(zip(header, (c.strip() for c in cells)))
            items.append(_item_from(row, len(items) + 1, f"{path}:{n}", base))
        if not items:
            raise UserError(f"{path}: the list has a header but no items")
    seen: dict[str, int] = {}
    for k, item in enumerate(items):
        if item.id in seen:
            raise UserError(f"{path}: id {item.id!r} appears twice (items {seen[item.id] + 1} and {k + 1})")
        seen[item.id] = k
        if need_prompt and item.prompt is None:
            raise UserError(f"{path}: item {item.id!r} has no 'prompt' (reference audio of the voice to clone)")
    if check_audio:
        for item in items:
            for key in ("prompt", "reference"):
                p = getattr(item, key)
                if p is not None:
                    _check_audio(p, f"{path}: item {item.id!r} {key}")
    return items


def _check_audio(p: Path, where: str) -> None:
    if not p.is_file():
        raise UserError(f"{where}: audio file {p} not found")
    try:
        seconds = audio_duration(p)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    if seconds > MAX_AUDIO_SECONDS:
        raise UserError(f"{where}: {p} lasts {seconds:.1f} s, longer than the {MAX_AUDIO_SECONDS:g} s evaluated")


# ---------------------------------------------------------------------------------------------
# evaluation


def _as_item(x: EvalItem | Mapping[str, Any], index: int) -> EvalItem:
    if isinstance(x, EvalItem):
        return x
    return _item_from(dict(x), index, f"item {index}", Path.cwd())


def _load(a: Audio) -> tuple[np.ndarray, int]:
    if isinstance(a, tuple):
        wav, sr = a
        if hasattr(wav, "detach"):
            wav = wav.detach().float().cpu().numpy()
        return np.asarray(wav, np.float32).reshape(-1), int(sr)
    try:
        sr = int(sf.info(str(a)).samplerate)
    except Exception:
        sr = 24_000  # load_audio below reports what is wrong with the file
    return load_audio(a, sr, allow_silent=True, max_seconds=MAX_AUDIO_SECONDS).numpy(), sr


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def evaluate_items(items: Sequence[EvalItem | Mapping[str, Any]],
                   audio: Callable[[EvalItem], Audio] | Mapping[str, Audio] | Sequence[Audio], *,
                   asr: Any = "auto", speaker_encoder: Any = "auto", device: str = "cpu",
                   score_references: bool = False, progress: bool = True,
                   info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Score synthesized audio for `items`; returns the report dict (what `--out` holds).

    `audio` gives each item's synthesized speech: a function `item -> Audio`, a mapping from item
    id, or a sequence aligned with `items`; an `Audio` is a file path or `(waveform, sample_rate)`.
    `asr`: auto | pocketsphinx | whisper[:NAME] | none, or a loaded `metrics.Recognizer`;
    `speaker_encoder`: auto | resemblyzer | none, or a loaded `metrics.SpeakerEncoder`.
    `score_references` also scores each item's reference audio (SIM and WER of the ground truth:
    the ceiling the recognizer and encoder allow). Metrics that cannot be computed are None per
    item, and `report["unavailable"]` says why for those no item has.
    """
    items = [_as_item(x, k) for k, x in enumerate(items, 1)]
    get = _audio_getter(items, audio)
    scorers = _Scorers.load(asr, speaker_encoder, device)
    t0 = time.perf_counter()
    rows = [_score_item(item, get(item), scorers, score_references)
            for item in tqdm(items, desc="evaluating", unit="item", disable=not progress)]
    means, counts = _summarize(rows, score_references)
    return {
        "version": REPORT_VERSION,
        **dict(info or {}),
        "metrics_sample_rate": M.METRIC_SR,
        "recognizer": getattr(scorers.recognizer, "name", None),
        "speaker_encoder": getattr(scorers.encoder, "name", None),
        "n_items": len(rows),
        "means": means,
        "counts": counts,
        "unavailable": _unavailable(items, scorers, score_references),
        "eval_seconds": round(time.perf_counter() - t0, 2),
        "items": rows,
    }


def _audio_getter(items: list[EvalItem], audio: Any) -> Callable[[EvalItem], Audio]:
    """Step 1: each item's synthesized audio, however `audio` was given."""
    if callable(audio):
        return audio
    if isinstance(audio, Mapping):
        missing = [it.id for it in items if it.id not in audio]
        if missing:
            raise UserError(f"no audio for item(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        return lambda it: audio[it.id]
    if len(audio) != len(items):
        raise UserError(f"{len(audio)} audio clips for {len(items)} items")
    by_id = {it.id: a for it, a in zip(items, audio)}
    return lambda it: by_id[it.id]


@dataclass
class _Scorers:
    """Step 2: the recognizer and speaker encoder (None where unavailable, with the reason), and the
    prompts' speaker embeddings, computed once per prompt file."""

    recognizer: Any
    asr_reason: str | None
    encoder: Any
    spk_reason: str | None
    prompt_embeddings: dict[Path, Any]

    @classmethod
    def load(cls, asr: Any, speaker_encoder: Any, device: str) -> "_Scorers":
        recognizer, asr_reason = M.recognizer_for(asr, device) if isinstance(asr, str) else (asr, None)
        encoder, spk_reason = (M.speaker_encoder_for(speaker_encoder, device) if isinstance(speaker_encoder, str)
                               else (speaker_encoder, None))
        return cls(recognizer, asr_reason, encoder, spk_reason, {})

    def prompt_embedding(self, prompt: Path) -> Any:
        if prompt not in self.prompt_embeddings:
            self.prompt_embeddings[prompt] = M.speaker_embedding(*_load(prompt), self.encoder)
        return self.prompt_embeddings[prompt]


def _score_item(item: EvalItem, src: Audio, scorers: _Scorers, score_references: bool) -> dict[str, Any]:
    """Step 3: one item's row: the signal metrics against its reference, speaker similarity to its
    prompt, and the recognizer's word and character error rates."""
    wav, sr = _load(src)
    row: dict[str, Any] = {"id": item.id, "text": item.text,
                           "prompt": str(item.prompt) if item.prompt else None,
                           "reference": str(item.reference) if item.reference else None,
                           "audio": None if isinstance(src, tuple) else str(src),
                           "seconds": round(len(wav) / sr, 3), "notes": []}
    row.update({k: None for k, _, _ in METRICS})
    silent = wav.size == 0 or float(np.abs(wav).max()) < 1e-4
    if silent:
        row["notes"].append("the synthesized audio is empty or silent")
    ref_wav = _load(item.reference) if item.reference is not None else None
    _signal_metrics(row, None if silent else M.analyse(wav, sr), ref_wav)
    if scorers.encoder is not None and item.prompt is not None:
        _speaker_metrics(row, None if silent else (wav, sr), ref_wav if score_references else None,
                         scorers.prompt_embedding(item.prompt), scorers.encoder)
    if scorers.recognizer is not None:
        _asr_metrics(row, item.text, "" if silent else M.transcribe(wav, sr, scorers.recognizer),
                     ref_wav if score_references else None, scorers.recognizer)
    return row


def _signal_metrics(row: dict[str, Any], out: Any, ref_wav: tuple[np.ndarray, int] | None) -> None:
    """MCD-DTW, duration ratio, F0 RMSE and V/UV error of the output's analysis against the reference's."""
    if ref_wav is None:
        row["notes"].append("no reference audio: MCD, duration and F0 not computed")
        return
    if out is None:
        return
    ref = M.analyse(*ref_wav)
    row["mcd_dtw"] = _finite(M.mcd_dtw(ref, out))
    row["duration_ratio"] = _finite(M.duration_ratio(out, ref))
    f0 = M.f0_rmse(ref, out)
    row["f0_rmse_cents"], row["f0_rmse_hz"] = _finite(f0.cents), _finite(f0.hz)
    if row["f0_rmse_cents"] is None:
        row["notes"].append("no frame is voiced in both the output and the reference")
    row["vuv_error"] = _finite(M.vuv_error(ref, out))


def _speaker_metrics(row: dict[str, Any], out: tuple[np.ndarray, int] | None,
                     ref_wav: tuple[np.ndarray, int] | None, prompt_embedding: Any, encoder: Any) -> None:
    """Speaker similarity of the output (and, when scored, of the reference) to the prompt."""
    if prompt_embedding is None:
        return
    out_embedding = None if out is None else M.speaker_embedding(*out, encoder)
    if out_embedding is not None:
        row["speaker_similarity"] = float(np.dot(prompt_embedding, out_embedding))
    if ref_wav is not None:
        ref_embedding = M.speaker_embedding(*ref_wav, encoder)
        row["reference_speaker_similarity"] = (None if ref_embedding is None
                                               else float(np.dot(prompt_embedding, ref_embedding)))


def _asr_metrics(row: dict[str, Any], text: str, transcript: str, ref_wav: tuple[np.ndarray, int] | None,
                 recognizer: Any) -> None:
    """WER and CER of the output's transcript (and, when scored, of the reference's)."""
    row["transcript"] = transcript
    row["wer"], row["cer"] = M.wer(text, transcript), M.cer(text, transcript)
    if ref_wav is not None:
        row["reference_transcript"] = M.transcribe(*ref_wav, recognizer)
        row["reference_wer"] = M.wer(text, row["reference_transcript"])
        row["reference_cer"] = M.cer(text, row["reference_transcript"])


def _summarize(rows: list[dict[str, Any]], score_references: bool) -> tuple[dict[str, Any], dict[str, int]]:
    """Step 4: each metric's mean over the items that have it, and how many do."""
    keys = [k for k, _, _ in METRICS if score_references or not k.startswith("reference_")]
    means, counts = {}, {}
    for k in keys:
        vals = [r[k] for r in rows if r[k] is not None]
        counts[k] = len(vals)
        means[k] = float(np.mean(vals)) if vals else None
    return means, counts


def _unavailable(items: list[EvalItem], scorers: _Scorers, score_references: bool) -> dict[str, str]:
    """Step 5: why a metric was measured for no item."""
    unavailable: dict[str, str] = {}
    if not any(it.reference for it in items):
        for k in _REFERENCE_METRICS:
            unavailable[k] = "no item has reference audio"
    if scorers.encoder is None:
        unavailable["speaker_similarity"] = scorers.spk_reason or "no speaker encoder"
    elif not any(it.prompt for it in items):
        unavailable["speaker_similarity"] = "no item has a prompt"
    if scorers.recognizer is None:
        unavailable["wer"] = unavailable["cer"] = scorers.asr_reason or "no speech recognizer"
    if score_references:
        for k in ("speaker_similarity", "wer", "cer"):
            if k in unavailable:
                unavailable[f"reference_{k}"] = unavailable[k]
        if not any(it.reference for it in items):
            for k in ("reference_speaker_similarity", "reference_wer", "reference_cer"):
                unavailable.setdefault(k, "no item has reference audio")
    return unavailable


def format_table(report: Mapping[str, Any]) -> str:
    """A plain-text table of per-item metrics, the means, and why any metric is missing."""
    shown = [(k, h, f) for k, h, f in METRICS if k in report["means"] and k not in report["unavailable"]]
    header = ["id", "sec"] + [h for _, h, _ in shown]
    body = []
    for r in report["items"]:
        body.append([r["id"], f"{r['seconds']:.2f}"] + ["-" if r[k] is None else f.format(r[k]) for k, _, f in shown])
    mean_secs = np.mean([r["seconds"] for r in report["items"]]) if report["items"] else 0.0
    body.append(["mean", f"{mean_secs:.2f}"]
                + ["-" if report["means"][k] is None else f.format(report["means"][k]) for k, _, f in shown])
    widths = [max(len(row[c]) for row in [header] + body) for c in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body[:-1]]
    lines += ["  ".join("-" * w for w in widths), fmt(body[-1])]
    if report.get("recognizer") or report.get("speaker_encoder"):
        lines.append(f"recognizer: {report.get('recognizer') or '-'}; speaker encoder: "
                     f"{report.get('speaker_encoder') or '-'}")
    for k, why in report["unavailable"].items():
        lines.append(f"not measured: {k}: {why}")
    return "\n".join(lines)


def write_report(path: str | Path, report: Mapping[str, Any]) -> Path:
    """Write the report as strict JSON (no NaN), atomically."""
    atomic_write_text(path, json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return Path(path)


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vall_e.eval",
                                description="Objective metrics (MCD-DTW, duration, F0, speaker similarity, "
                                            "WER/CER) for synthesized speech.")
    p.add_argument("--list", required=True, help="items: JSONL or TSV with text, prompt[, reference][, id]")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="exported model.safetensors (or a training run's YAML) to synthesize with")
    src.add_argument("--wavs", help="folder of already synthesized {id}.wav files (no model needed)")
    p.add_argument("--out", default="eval_report.json", help="JSON report path (default: eval_report.json)")
    p.add_argument("--save-wavs", default=None, help="with --model: also write the synthesized {id}.wav here")
    p.add_argument("--asr", default="auto", help="auto | pocketsphinx | whisper[:NAME or PATH] | none")
    p.add_argument("--speaker-encoder", default="auto", help="auto | resemblyzer | none")
    p.add_argument("--score-references", action="store_true",
                   help="also score the reference audio (SIM and WER of the ground truth)")
    p.add_argument("--device", default="cpu", help="device for the model and the metric models (cpu, cuda, auto)")
    p.add_argument("--dtype", default="float32", choices=FLOAT_DTYPES)
    p.add_argument("--batch-size", type=int, default=8, help="texts synthesized together")
    add_generation_flags(p, overrides={"seed": EVAL_SEED})
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _synthesize_all(args: argparse.Namespace, items: list[EvalItem]) -> tuple[dict[str, Audio], dict[str, Any]]:
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    settings = settings_from_args(args)
    tts = TTS.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    out: dict[str, Audio] = {}
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(items), args.batch_size), desc="synthesizing", unit="batch",
                      disable=args.no_progress):
        batch = items[start:start + args.batch_size]
        refs = [str(it.prompt) for it in batch]
        wavs = tts.synthesize([it.text for it in batch], refs if len(batch) > 1 else refs[0], settings)
        for it, w in zip(batch, wavs):
            out[it.id] = (w.float().cpu().numpy(), tts.sample_rate)
            if args.save_wavs:
                save_audio(Path(args.save_wavs) / f"{it.id}.wav", w, tts.sample_rate)
    info = {"mode": "model", "model": str(args.model), "synthesis_seconds": round(time.perf_counter() - t0, 2),
            "settings": {"ar": asdict(settings.ar), "nar": asdict(settings.nar),
                         **{k: v for k, v in asdict(settings).items() if k not in ("ar", "nar")}}}
    return out, info


def _check_spec(value: str, kinds: tuple[str, ...], flag: str) -> None:
    kind = value.partition(":")[0]
    if kind not in kinds or (":" in value and kind != "whisper"):
        raise UserError(f"{flag} {value!r}: use one of {', '.join(kinds)}"
                        + (" (whisper:NAME picks a model)" if "whisper" in kinds else ""))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_spec(args.asr, ("auto", "pocketsphinx", "whisper", "none"), "--asr")
    _check_spec(args.speaker_encoder, ("auto", "resemblyzer", "none"), "--speaker-encoder")
    items = read_list(args.list, need_prompt=args.model is not None)
    if args.model is not None:
        audio, info = _synthesize_all(args, items)
    else:
        folder = Path(args.wavs)
        if not folder.is_dir():
            raise UserError(f"{folder}: --wavs folder not found")
        missing = [it.id for it in items if not (folder / f"{it.id}.wav").is_file()]
        if missing:
            raise UserError(f"{folder}: no {missing[0]}.wav for item {missing[0]!r}"
                            f"{f' (and {len(missing) - 1} more missing)' if len(missing) > 1 else ''}")
        audio = {it.id: folder / f"{it.id}.wav" for it in items}
        info = {"mode": "wavs", "wavs": str(folder)}
    report = evaluate_items(items, audio, asr=args.asr, speaker_encoder=args.speaker_encoder,
                            device="cpu" if args.device == "auto" else args.device,
                            score_references=args.score_references, progress=not args.no_progress,
                            info={**info, "list": str(args.list)})
    path = write_report(args.out, report)
    print(format_table(report))
    print(f"report: {path}")
    return 0

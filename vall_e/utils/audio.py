"""Audio in and out: any file soundfile reads -> mono float32 at a target rate, and back to files/bytes.

Loading downmixes by averaging every channel (the reference kept channel 0 only) and resamples with
soxr. Anything wrong with a file (unreadable, truncated, empty, silent, too long) becomes a one-line
`UserError` naming the file, so commands never print a decoder traceback for bad input.
"""
from __future__ import annotations

import io
import os
import re
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf
import soxr
import torch
from torch import Tensor

from vall_e.utils.errors import UserError
from vall_e.utils.io import atomic_path

# A file whose peak stays below this (about -80 dBFS) is treated as silent.
SILENCE_PEAK = 1e-4

# Output formats: suffix -> (libsndfile format, subtype).
_FORMATS: dict[str, tuple[str, str]] = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "ogg": ("OGG", "VORBIS"),
}
_EXACT_LENGTH_FORMATS = ("WAV", "WAVEX", "RF64", "W64", "FLAC", "AIFF", "CAF")


def _read_error(path: Path, e: Exception) -> UserError:
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    msg = re.sub(r"^Error opening .*?: ", "", msg)
    return UserError(f"{path}: cannot read audio ({msg}); the file is corrupt, truncated or not audio")


def audio_duration(path: str | os.PathLike) -> float:
    """Duration in seconds from the header, without decoding the samples."""
    path = Path(path)
    try:
        return float(sf.info(str(path)).duration)
    except Exception as e:  # soundfile raises several types for bad headers
        raise _read_error(path, e) from None


def load_audio(path: str | os.PathLike, sample_rate: int = 24_000, *, max_seconds: float | None = None,
               allow_silent: bool = False) -> Tensor:
    """Read `path` as mono float32 [samples] at `sample_rate`.

    The header is checked before decoding, so an over-long file (`max_seconds`) is rejected without
    loading it. Multi-channel audio is averaged; any input rate is resampled with soxr.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such audio file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty (0 bytes)")
    try:
        info = sf.info(str(path))
    except Exception as e:
        raise _read_error(path, e) from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise UserError(f"{path}: the file holds no audio samples (empty or truncated)")
    if max_seconds is not None and info.duration > max_seconds:
        raise UserError(f"{path}: {info.duration:.1f} s is longer than the limit of {max_seconds:g} s")
    if re.search(r"^data\s*:.*\(should be", info.extra_info or "", re.M):
        raise UserError(f"{path}: the file is truncated (its header promises more audio than it holds)")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise _read_error(path, e) from None
    frames = data.shape[0]
    if frames == 0:
        raise UserError(f"{path}: the file holds no audio samples (empty or truncated)")
    # Lossless formats state their exact length; lossy ones (mp3, ogg) only estimate it, so a
    # shortfall there is not proof of damage and whatever decodes is used.
    if info.format in _EXACT_LENGTH_FORMATS and frames < info.frames:
        raise UserError(f"{path}: the file is truncated (decoded {frames} of {info.frames} samples)")
    if not np.isfinite(data).all():
        raise UserError(f"{path}: the audio contains NaN or infinite samples")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sr != sample_rate:
        mono = soxr.resample(mono, sr, sample_rate, quality="HQ")
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if mono.size == 0:
        raise UserError(f"{path}: the file is too short to resample to {sample_rate} Hz")
    if not allow_silent and float(np.abs(mono).max()) < SILENCE_PEAK:
        raise UserError(f"{path}: the audio is silent (peak below {SILENCE_PEAK:g})")
    return torch.from_numpy(mono)


def _to_numpy(wav: Tensor | np.ndarray) -> np.ndarray:
    """[samples] or [channels, samples] -> float32 [samples, channels] clipped to [-1, 1]."""
    x = wav.detach().to("cpu", torch.float32).numpy() if isinstance(wav, Tensor) else np.asarray(wav, np.float32)
    if x.ndim == 1:
        x = x[:, None]
    elif x.ndim == 2:
        x = x.T
    else:
        raise ValueError(f"audio must be [samples] or [channels, samples], got shape {tuple(x.shape)}")
    # libsndfile wraps around (rather than clips) when converting out-of-range floats to integers.
    return np.ascontiguousarray(np.clip(np.nan_to_num(x), -1.0, 1.0))


def _format_for(name: str, what: str) -> tuple[str, str]:
    fmt = name.lower().lstrip(".")
    if fmt not in _FORMATS:
        raise UserError(f"{what}: unsupported audio format {fmt!r}; use one of {', '.join(_FORMATS)}")
    major, subtype = _FORMATS[fmt]
    if major not in sf.available_formats():
        raise UserError(f"{what}: this libsndfile ({sf.__libsndfile_version__}) cannot write {fmt}")
    return major, subtype


def save_audio(path: str | os.PathLike, wav: Tensor | np.ndarray, sample_rate: int, format: str | None = None) -> Path:
    """Write `wav` atomically; the format comes from `format` or the file suffix (wav, flac, mp3, ogg)."""
    path = Path(path)
    major, subtype = _format_for(format or path.suffix or "(none)", str(path))
    data = _to_numpy(wav)
    with atomic_path(path) as tmp:
        try:
            sf.write(str(tmp), data, sample_rate, format=major, subtype=subtype)
        except Exception as e:
            raise UserError(f"{path}: cannot write {major} at {sample_rate} Hz ({e})") from None
    return path


def audio_to_bytes(wav: Tensor | np.ndarray, sample_rate: int, format: str = "wav") -> bytes:
    """Encode audio in memory (for HTTP responses): wav, flac, mp3, ogg, or raw `pcm` (s16le)."""
    fmt = format.lower().lstrip(".")
    data = _to_numpy(wav)
    if fmt == "pcm":
        return (np.round(data * 32767.0).astype("<i2")).tobytes()
    major, subtype = _format_for(fmt, "audio_to_bytes")
    buf = io.BytesIO()
    try:
        sf.write(buf, data, sample_rate, format=major, subtype=subtype)
    except Exception as e:
        raise UserError(f"cannot encode {fmt} at {sample_rate} Hz ({e})") from None
    return buf.getvalue()


def streaming_wav_header(sample_rate: int, channels: int = 1, bits: int = 16) -> bytes:
    """A WAV header for a stream of unknown length: RIFF and data sizes are 0xFFFFFFFF (ffmpeg and most
    players accept it); s16le samples follow."""
    block = channels * bits // 8
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, bits)
            + b"data" + struct.pack("<I", 0xFFFFFFFF))


def peak_normalize(wav: Tensor, peak: float = 0.95) -> Tensor:
    """Scale so the largest absolute sample is `peak`; silence is returned unchanged."""
    m = wav.abs().max() if wav.numel() else torch.tensor(0.0)
    if float(m) < 1e-8:
        return wav.clone()
    return wav * (peak / m)


def concat_with_pauses(chunks: Sequence[Tensor], sample_rate: int, pause_s: float = 0.0) -> Tensor:
    """Join mono chunks with `pause_s` seconds of silence between them (not before or after)."""
    if not chunks:
        return torch.zeros(0)
    gap = torch.zeros(max(0, int(round(pause_s * sample_rate))), dtype=chunks[0].dtype, device=chunks[0].device)
    parts: list[Tensor] = []
    for i, c in enumerate(chunks):
        if i and gap.numel():
            parts.append(gap)
        parts.append(c.reshape(-1))
    return torch.cat(parts)

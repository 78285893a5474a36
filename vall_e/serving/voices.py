"""Named voices of the HTTP server: `{name}.wav|flac|mp3|ogg` reference clips in one folder."""
from __future__ import annotations

import io
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import soundfile as sf

from vall_e.serving.errors import ApiError
from vall_e.utils.audio import audio_duration, load_audio
from vall_e.utils.errors import UserError
from vall_e.utils.io import atomic_path

VOICE_SUFFIXES = {"WAV": "wav", "WAVEX": "wav", "FLAC": "flac", "MP3": "mp3", "OGG": "ogg"}
VOICE_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # also the request schema's pattern
VOICE_NAME = re.compile(VOICE_NAME_PATTERN[1:-1])
VOICE_NAME_RULE = "use 1-64 letters, digits, '-' or '_'"
MAX_VOICE_SECONDS = 120.0


class VoiceStore:
    """Named voices: `{name}.wav|flac|mp3|ogg` files in one folder, with an encoded-prompt cache."""

    def __init__(self, folder: Path | None, max_cached: int = 256) -> None:
        self.folder = folder
        self._cache: OrderedDict[tuple[str, float], tuple[tuple[int, int, str], Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_cached = max_cached

    @staticmethod
    def check_name(name: Any) -> str:
        if not isinstance(name, str) or not VOICE_NAME.fullmatch(name):
            raise ApiError(400, f"voice name {str(name)[:80]!r} is not allowed: {VOICE_NAME_RULE}", param="name")
        return name

    def path(self, name: str) -> Path | None:
        """The file of voice `name`, or None."""
        if self.folder is None or not VOICE_NAME.fullmatch(name):
            return None
        for suffix in dict.fromkeys(VOICE_SUFFIXES.values()):
            p = self.folder / f"{name}.{suffix}"
            if p.is_file():
                return p
        return None

    def names(self) -> list[str]:
        if self.folder is None or not self.folder.is_dir():
            return []
        found = {p.stem for p in self.folder.iterdir()
                 if p.is_file() and p.suffix[1:].lower() in VOICE_SUFFIXES.values() and VOICE_NAME.fullmatch(p.stem)}
        return sorted(found)

    def describe(self, name: str) -> dict[str, Any]:
        p = self.path(name)
        info: dict[str, Any] = {"id": name, "object": "voice", "file": p.name if p else None}
        if p is not None:
            try:
                info["duration"] = round(audio_duration(p), 3)
            except UserError:
                info["duration"] = None
            info["created"] = int(p.stat().st_mtime)
        return info

    def save(self, name: str, data: bytes, sample_rate: int) -> tuple[Path, bool]:
        """Validate `data` by decoding it, then write it atomically as the voice `name`."""
        if self.folder is None:
            raise ApiError(400, "this server has no voice folder; start it with --voices DIR")
        if not data:
            raise ApiError(400, "the uploaded file is empty", param="file")
        try:
            fmt = sf.info(io.BytesIO(data)).format
        except Exception:
            raise ApiError(400, "the uploaded file is not audio that can be decoded (corrupt or unsupported "
                                "format; use wav, flac or mp3)", param="file") from None
        if fmt not in VOICE_SUFFIXES:
            raise ApiError(400, f"the uploaded file is {fmt}; use wav, flac or mp3", param="file")
        target = self.folder / f"{name}.{VOICE_SUFFIXES[fmt]}"
        replaced = self.path(name) is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(target) as tmp:
                tmp.write_bytes(data)
                load_audio(tmp, sample_rate, max_seconds=MAX_VOICE_SECONDS)  # decodes every sample
        except UserError as e:
            msg = re.sub(r"^\S*\.tmp\.\w+:\s*", "", str(e))
            raise ApiError(400, f"the uploaded file: {msg}", param="file") from None
        for suffix in set(VOICE_SUFFIXES.values()) - {target.suffix[1:]}:  # one file per name
            try:
                (self.folder / f"{name}.{suffix}").unlink()
            except FileNotFoundError:
                pass
        self.invalidate(name)
        return target, replaced

    def delete(self, name: str) -> bool:
        p = self.path(name)
        if p is None:
            return False
        p.unlink(missing_ok=True)
        self.invalidate(name)
        return True

    def invalidate(self, name: str) -> None:
        with self._lock:
            for key in [k for k in self._cache if k[0] == name]:
                del self._cache[key]

    def prompt(self, tts: Any, name: str, prompt_seconds: float) -> Any:
        """The voice's prompt codes, encoded once per (file version, prompt length). Worker thread only."""
        p = self.path(name)
        if p is None:
            raise UserError(f"unknown voice {name!r}")
        st = p.stat()
        sig = (st.st_mtime_ns, st.st_size, p.name)
        key = (name, float(prompt_seconds))
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] == sig:
                self._cache.move_to_end(key)
                return hit[1]
        codes = tts.encode_reference(str(p), prompt_seconds)
        with self._lock:
            self._cache[key] = (sig, codes)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return codes

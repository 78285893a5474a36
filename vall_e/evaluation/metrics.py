"""Objective speech metrics that run offline on CPU: MCD (plain and DTW), duration ratio, F0 error,
speaker similarity, and WER/CER through a speech recognizer.

Signal metrics follow the offline-codec study's method exactly (docs/architecture.md): both signals are
resampled to 22.05 kHz (our espeak-derived audio has nothing above 11 kHz, and a 24 kHz MCD reads
about 4 dB too high from vocoder leakage there), analysed with WORLD (DIO + StoneMask, CheapTrick,
5 ms frames), turned into an SPTK-style mel-cepstrum (`sp2mc`, order 24, alpha 0.455, log
amplitude in natural log), and compared without c0 over speech frames (frames within 40 dB of the
loudest one). This module is the single implementation; the codec tests import it.

Optional metrics need packages that ship their weights inside their wheels, so nothing is ever
downloaded: speaker similarity uses resemblyzer's VoiceEncoder, transcription uses pocketsphinx
(or whisper when the user has it installed *and* a model already cached). When a package is
missing the metric returns None and `recognizer_for`/`speaker_encoder_for` say why.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import re
import unicodedata
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple, Protocol, Sequence

import numpy as np
import soxr

from vall_e.codecs.world import import_pyworld
from vall_e.utils.legacy_imports import import_with_pkg_resources

METRIC_SR = 22_050  # analysis rate of every signal metric (see the module docstring)
FRAME_MS = 5.0  # WORLD frame period for the metrics
MCEP_ORDER = 24
MCEP_ALPHA = 0.455  # all-pass constant of the mel warping (SPTK's usual value near 22 kHz)
SPEECH_DB = 40.0  # frames within this many dB of the loudest frame count as speech
F0_FLOOR, F0_CEIL = 60.0, 500.0
_K = 10 / math.log(10) * math.sqrt(2)  # MCD constant: (10 / ln 10) * sqrt(2)

EVAL_EXTRA = "pip install 'vall-e[eval]'"


# ---------------------------------------------------------------------------------------------
# mel-cepstrum (numpy port of pysptk.sp2mc)


@lru_cache(maxsize=8)
def _freqt_matrix(n_in: int, order: int, alpha: float) -> np.ndarray:
    """SPTK freqt (frequency warping of a cepstrum) is linear: build its matrix once."""
    c1 = np.eye(n_in)  # batch of unit cepstra
    b = 1 - alpha * alpha
    g = np.zeros((n_in, order + 1))
    for i in range(n_in - 1, -1, -1):
        d = g.copy()
        g[:, 0] = c1[:, i] + alpha * d[:, 0]
        g[:, 1] = b * d[:, 0] + alpha * d[:, 1]
        for j in range(2, order + 1):
            g[:, j] = d[:, j - 1] + alpha * (d[:, j] - g[:, j - 1])
    return g


def sp2mc(sp: np.ndarray, order: int = MCEP_ORDER, alpha: float = MCEP_ALPHA) -> np.ndarray:
    """pysptk.sp2mc: power spectrum [frames, fft/2+1] -> mel-cepstrum [frames, order+1] (log amplitude, ln)."""
    c = np.fft.irfft(np.log(np.maximum(sp, 1e-30)), axis=1)
    n_in = sp.shape[1]
    c = c[:, :n_in].copy()
    c[:, 0] /= 2
    c[:, -1] /= 2
    return c @ _freqt_matrix(n_in, order, float(alpha))


# ---------------------------------------------------------------------------------------------
# analysis


@dataclass
class Analysis:
    """WORLD analysis of one signal at `METRIC_SR`, 5 ms frames: what every signal metric compares."""

    f0: np.ndarray  # [frames] Hz, 0 where unvoiced
    mc: np.ndarray  # [frames, order+1] mel-cepstrum
    speech: np.ndarray  # [frames] bool: within SPEECH_DB of the loudest frame
    seconds: float  # length of the signal

    @property
    def speech_seconds(self) -> float:
        """Time from the first to the last speech frame (leading/trailing silence excluded)."""
        idx = np.flatnonzero(self.speech)
        return 0.0 if idx.size == 0 else float(idx[-1] - idx[0] + 1) * FRAME_MS / 1000


def _to_f64(wav: Any) -> np.ndarray:
    if hasattr(wav, "detach"):  # torch tensor
        wav = wav.detach().cpu().numpy()
    x = np.asarray(wav, dtype=np.float64)
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.ndim != 1:
        raise ValueError(f"expected mono audio [samples], got shape {x.shape}")
    return np.ascontiguousarray(x)


def _world(wav: Any, sr: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(signal at METRIC_SR, f0, frame times, spectral envelope)."""
    pw = import_pyworld()
    x = _to_f64(wav)
    if sr != METRIC_SR:
        x = soxr.resample(x, sr, METRIC_SR).astype(np.float64)
    if x.size < 2 * METRIC_SR * FRAME_MS / 1000:
        x = np.pad(x, (0, int(2 * METRIC_SR * FRAME_MS / 1000) - x.size))  # at least two frames
    f0, t = pw.dio(x, METRIC_SR, f0_floor=F0_FLOOR, f0_ceil=F0_CEIL, frame_period=FRAME_MS)
    f0 = pw.stonemask(x, f0, t, METRIC_SR)
    sp = pw.cheaptrick(x, f0, t, METRIC_SR)
    return x, f0, t, sp


def mel_cepstrum(wav: Any, sr: int = 24_000) -> np.ndarray:
    """Mel-cepstrum [frames, 25] of a mono signal, analysed at 22.05 kHz with 5 ms frames."""
    return sp2mc(_world(wav, sr)[3])


def analyse(wav: Any, sr: int = 24_000) -> Analysis:
    """F0, mel-cepstrum and speech-frame mask of a mono signal (numpy or torch) at rate `sr`."""
    seconds = _to_f64(wav).size / sr
    x, f0, t, sp = _world(wav, sr)
    centres = np.round(t * METRIC_SR).astype(int)
    pad = np.pad(x, 256)
    rms = np.array([np.sqrt(np.mean(pad[c:c + 512] ** 2) + 1e-20) for c in centres])
    db = 20 * np.log10(rms)
    return Analysis(f0=f0, mc=sp2mc(sp), speech=db > db.max() - SPEECH_DB, seconds=seconds)


# ---------------------------------------------------------------------------------------------
# distortion and alignment


def mcd(ref: Analysis, deg: Analysis) -> float:
    """Frame-aligned MCD in dB (c0 excluded) over the reference's speech frames; for signals of equal timing."""
    n = min(len(ref.f0), len(deg.f0))
    d = ref.mc[:n, 1:] - deg.mc[:n, 1:]
    return float(np.mean(_K * np.sqrt((d * d).sum(1))[ref.speech[:n]]))


def _frame_costs(x: np.ndarray, y: np.ndarray, i: int) -> np.ndarray:
    d = x[i][None, :] - y
    return _K * np.sqrt((d * d).sum(-1))


def dtw_path(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DTW between feature sequences [n, d] and [m, d] with steps (1,1), (1,0), (0,1).

    The local cost is the per-frame MCD (Euclidean distance scaled to dB). Returns the path's
    indices into x and y (from the start) and the cost of each step. Memory is one n x m matrix.
    """
    n, m = len(x), len(y)
    if n == 0 or m == 0:
        raise ValueError("DTW needs two non-empty sequences")
    acc = np.empty((n, m))
    acc[0] = np.cumsum(_frame_costs(x, y, 0))
    for i in range(1, n):
        cost = _frame_costs(x, y, i)
        diag = np.concatenate([[np.inf], acc[i - 1, :-1]])
        best = np.minimum(diag, acc[i - 1]) + cost
        s = np.cumsum(cost)  # horizontal steps: acc[i, j] = min(best[j], acc[i, j-1] + cost[j])
        acc[i] = np.minimum.accumulate(best - s) + s
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        cands = []
        if i > 0 and j > 0:
            cands.append((acc[i - 1, j - 1], i - 1, j - 1))
        if i > 0:
            cands.append((acc[i - 1, j], i - 1, j))
        if j > 0:
            cands.append((acc[i, j - 1], i, j - 1))
        _, i, j = min(cands)
        path.append((i, j))
    ii, jj = (np.array(v) for v in zip(*path[::-1]))
    d = x[ii] - y[jj]
    return ii, jj, _K * np.sqrt((d * d).sum(-1))


def _speech_path(a: Analysis, b: Analysis) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DTW over the speech frames of both signals; indices are into the full frame arrays."""
    sa, sb = np.flatnonzero(a.speech), np.flatnonzero(b.speech)
    ii, jj, cost = dtw_path(a.mc[sa, 1:], b.mc[sb, 1:])
    return sa[ii], sb[jj], cost


def mcd_dtw(a: Analysis, b: Analysis) -> float:
    """MCD in dB averaged along the DTW path over speech frames: for signals with different timing."""
    return float(np.mean(_speech_path(a, b)[2]))


def duration_ratio(out: Analysis | float, ref: Analysis | float) -> float:
    """Speech duration of `out` over that of `ref` (leading/trailing silence excluded for analyses)."""
    a = out.speech_seconds if isinstance(out, Analysis) else float(out)
    b = ref.speech_seconds if isinstance(ref, Analysis) else float(ref)
    return a / b if b > 0 else math.nan


class F0Error(NamedTuple):
    cents: float  # RMSE in cents over frames voiced in both
    hz: float  # RMSE in Hz over the same frames


def _f0_error(a: np.ndarray, b: np.ndarray) -> F0Error:
    both = (a > 0) & (b > 0)
    if not both.any():
        return F0Error(math.nan, math.nan)
    cents = 1200 * np.log2(b[both] / a[both])
    return F0Error(float(np.sqrt(np.mean(cents ** 2))), float(np.sqrt(np.mean((b[both] - a[both]) ** 2))))


def f0_rmse(ref: Analysis, deg: Analysis) -> F0Error:
    """F0 RMSE (cents, Hz) over speech frames voiced in both, after DTW alignment; NaN if none are."""
    i, j, _ = _speech_path(ref, deg)
    return _f0_error(ref.f0[i], deg.f0[j])


def f0_rmse_frames(ref: Analysis, deg: Analysis) -> F0Error:
    """F0 RMSE (cents, Hz) frame by frame over the reference's speech frames voiced in both.

    For signals that share their timing (codec resynthesis), where DTW would only add misalignment.
    """
    n = min(len(ref.f0), len(deg.f0))
    keep = ref.speech[:n]
    return _f0_error(ref.f0[:n][keep], deg.f0[:n][keep])


def vuv_error(ref: Analysis, deg: Analysis) -> float:
    """Fraction of DTW-aligned speech frames whose voicing decisions disagree."""
    i, j, _ = _speech_path(ref, deg)
    return float(np.mean((ref.f0[i] > 0) != (deg.f0[j] > 0)))


# ---------------------------------------------------------------------------------------------
# text error rates


def normalize_text(text: str) -> str:
    """Lower case, NFKC, punctuation removed (apostrophes inside words kept), single spaces."""
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    text = re.sub(r"[^\w\s']|_", " ", text)
    text = re.sub(r"(?<!\w)'|'(?!\w)", " ", text)  # quotes, not apostrophes
    return " ".join(text.split())


def edit_distance(ref: Sequence[Any], hyp: Sequence[Any]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def wer(ref: str, hyp: str) -> float:
    """Word error rate of `hyp` against `ref` after `normalize_text`; ValueError if `ref` has no words."""
    r, h = normalize_text(ref).split(), normalize_text(hyp).split()
    if not r:
        raise ValueError(f"reference text {ref!r} has no words")
    return edit_distance(r, h) / len(r)


def cer(ref: str, hyp: str) -> float:
    """Character error rate (spaces between words count) after `normalize_text`."""
    r, h = normalize_text(ref), normalize_text(hyp)
    if not r:
        raise ValueError(f"reference text {ref!r} has no characters")
    return edit_distance(r, h) / len(r)


# ---------------------------------------------------------------------------------------------
# optional models: speech recognizer and speaker encoder


class Recognizer(Protocol):
    name: str

    def __call__(self, wav16k: np.ndarray) -> str: ...


class SpeakerEncoder(Protocol):
    name: str

    def embed(self, wav16k: np.ndarray) -> np.ndarray | None: ...


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _to16k(wav: Any, sr: int) -> np.ndarray:
    x = _to_f64(wav).astype(np.float32)
    return x if sr == 16_000 else soxr.resample(x, sr, 16_000).astype(np.float32)


class PocketsphinxRecognizer:
    """CMU pocketsphinx with the US English acoustic model, LM and dictionary inside its wheel."""

    def __init__(self) -> None:
        from pocketsphinx import Decoder

        self.decoder = Decoder(samprate=16_000, loglevel="FATAL")
        self.name = f"pocketsphinx {_version('pocketsphinx')} (en-us)"

    def __call__(self, wav16k: np.ndarray) -> str:
        pcm = (np.clip(wav16k, -1, 1) * 32767).astype("<i2").tobytes()
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)
        self.decoder.end_utt()
        hyp = self.decoder.hyp()
        return hyp.hypstr if hyp is not None else ""


WHISPER_MODELS = ("small.en", "base.en", "medium.en", "tiny.en", "turbo", "large-v3", "small", "base",
                  "medium", "tiny", "large-v2", "large-v1", "large")


def whisper_cache_dir() -> Path:
    """Where openai-whisper keeps downloaded checkpoints (its own default)."""
    return Path(os.getenv("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))) / "whisper"


def cached_whisper_checkpoint(whisper: Any, name: str | None) -> Path | None:
    """The local checkpoint for `name` (a model name or a .pt path), or the first cached model; no download."""
    models = getattr(whisper, "_MODELS", {})
    if name and (name.endswith(".pt") or os.sep in name):
        return Path(name) if Path(name).is_file() else None
    for n in ([name] if name else WHISPER_MODELS):
        url = models.get(n)
        if url:
            path = whisper_cache_dir() / os.path.basename(url)
            if path.is_file():
                return path
    return None


class WhisperRecognizer:
    """openai-whisper from a checkpoint already on disk (never downloads)."""

    def __init__(self, whisper: Any, checkpoint: Path, device: str = "cpu") -> None:
        self.model = whisper.load_model(str(checkpoint), device=device)
        self.device = device
        self.name = f"whisper {checkpoint.stem} ({_version('openai-whisper')})"

    def __call__(self, wav16k: np.ndarray) -> str:
        out = self.model.transcribe(np.asarray(wav16k, np.float32), language="en", fp16=False,
                                    condition_on_previous_text=False)
        return str(out.get("text", "")).strip()


class ResemblyzerEncoder:
    """Resemblyzer's GE2E VoiceEncoder; its weights (`pretrained.pt`) ship inside the wheel."""

    def __init__(self, device: str = "cpu") -> None:
        if importlib.util.find_spec("resemblyzer") is None:  # named first: its dependencies come after it
            raise ModuleNotFoundError("No module named 'resemblyzer'", name="resemblyzer")
        import_with_pkg_resources("webrtcvad")  # resemblyzer's VAD reads its version through pkg_resources
        with warnings.catch_warnings():  # resemblyzer 0.1.4 imports a deprecated scipy.ndimage path
            warnings.simplefilter("ignore", DeprecationWarning)
            from resemblyzer import VoiceEncoder, preprocess_wav

        self.encoder = VoiceEncoder(device, verbose=False)
        self.preprocess = preprocess_wav
        self.name = f"resemblyzer {_version('resemblyzer')} (GE2E)"

    def embed(self, wav16k: np.ndarray) -> np.ndarray | None:
        raw = np.asarray(wav16k, np.float32)
        if raw.size < 1600 or float(np.abs(raw).max()) < 1e-4:  # under 0.1 s, or silent: no speaker
            return None
        x = self.preprocess(raw)  # volume normalisation + VAD trimming
        if x.size < 1600:  # the VAD removed (nearly) everything: embed the untrimmed audio instead
            x = raw
        e = self.encoder.embed_utterance(x)
        return e / max(float(np.linalg.norm(e)), 1e-12)


def _missing(pkg: str, what: str) -> str:
    return f"{pkg} is not installed ({what}; {EVAL_EXTRA} or pip install {pkg})"


@lru_cache(maxsize=8)
def recognizer_for(spec: str = "auto", device: str = "cpu") -> tuple[Recognizer | None, str | None]:
    """(recognizer, None) or (None, why not). spec: auto | pocketsphinx | whisper[:NAME or PATH] | none.

    `auto` takes whisper when it is installed and a model is already cached, else pocketsphinx.
    """
    spec = (spec or "auto").strip()
    kind, _, arg = spec.partition(":")
    if kind == "none":
        return None, "speech recognition turned off (--asr none)"
    if kind not in ("auto", "pocketsphinx", "whisper"):
        raise ValueError(f"unknown recognizer {spec!r}: use auto, pocketsphinx, whisper[:NAME] or none")
    reasons = []
    if kind in ("auto", "whisper"):
        try:
            import whisper  # openai-whisper
        except ImportError:
            reasons.append(_missing("openai-whisper", "no whisper"))
        else:
            ckpt = cached_whisper_checkpoint(whisper, arg or None)
            if ckpt is not None:
                return WhisperRecognizer(whisper, ckpt, device), None
            reasons.append(f"no whisper model {arg or 'at all'} is cached in {whisper_cache_dir()} "
                           "(it is never downloaded here)")
        if kind == "whisper":
            return None, "; ".join(reasons)
    try:
        import pocketsphinx  # noqa: F401
    except ImportError:
        reasons.append(_missing("pocketsphinx", "no speech recognizer"))
        return None, "; ".join(reasons)
    return PocketsphinxRecognizer(), None


@lru_cache(maxsize=4)
def speaker_encoder_for(spec: str = "auto", device: str = "cpu") -> tuple[SpeakerEncoder | None, str | None]:
    """(encoder, None) or (None, why not). spec: auto | resemblyzer | none."""
    spec = (spec or "auto").strip()
    if spec == "none":
        return None, "speaker similarity turned off (--speaker-encoder none)"
    if spec not in ("auto", "resemblyzer"):
        raise ValueError(f"unknown speaker encoder {spec!r}: use auto, resemblyzer or none")
    try:
        return ResemblyzerEncoder(device), None
    except ImportError as e:
        what = "resemblyzer" if (e.name or "").startswith("resemblyzer") else f"resemblyzer's dependency {e.name}"
        return None, f"{what} is not installed (no speaker encoder; {EVAL_EXTRA})"


def transcribe(wav: Any, sr: int, recognizer: str | Recognizer = "auto") -> str | None:
    """Text heard in `wav` by a local recognizer; None when none is available."""
    rec = recognizer_for(recognizer)[0] if isinstance(recognizer, str) else recognizer
    return None if rec is None else rec(_to16k(wav, sr))


def speaker_embedding(wav: Any, sr: int, encoder: str | SpeakerEncoder = "auto") -> np.ndarray | None:
    enc = speaker_encoder_for(encoder)[0] if isinstance(encoder, str) else encoder
    return None if enc is None else enc.embed(_to16k(wav, sr))


def speaker_similarity(a: Any, b: Any, sr: int = 24_000, encoder: str | SpeakerEncoder = "auto",
                       sr_b: int | None = None) -> float | None:
    """Cosine similarity of the speaker embeddings of two signals; None without an encoder (or speech)."""
    ea = speaker_embedding(a, sr, encoder)
    eb = speaker_embedding(b, sr_b or sr, encoder)
    if ea is None or eb is None:
        return None
    return float(np.dot(ea, eb))

"""Offline codec: WORLD vocoder features + residual k-means VQ, in EnCodec-24kHz's token layout.

Needs no download: analysis/synthesis is pyworld, and the codebooks are fitted on the user's own
corpus (`python -m vall_e.codecs.world fit DIR`). Frames are 1000/75 ms apart, so a clip gives the
same T = ceil(samples / 320) as EnCodec at 24 kHz, with 8 levels x 1024 codes by default.

Per frame (45 dims at 24 kHz): log-F0 (interpolated through unvoiced frames), a voicing flag, 40
coded spectral-envelope dims (WORLD's `code_spectral_envelope`: a DCT of the log envelope sampled on
a mel axis from 0 Hz to Nyquist) and 3 band aperiodicities.

The same speech should get the same codes however it arrives: as a float array, as a 16-bit or float
file, at any sample rate (every input is resampled to 24 kHz first), even though the codebooks were
fitted on one kind of file. Three things see to it:

- **A fixed noise floor on the envelope** (`noise_floor_db`). A log envelope has no bottom: where a
  signal carries nothing (above the band a file was recorded in, or in float audio that was never
  quantised) CheapTrick reports whatever tiny power is left, and 16-bit audio has its quantisation
  noise there instead. The difference sits in the top mel points and, through the DCT, moves every
  envelope coefficient, so a clip that is not like the corpus's files gets codes for the wrong sound.
  The analysis adds the envelope of faint white noise at a fixed level (above 16-bit quantisation
  noise, far below speech) to every frame, which is what dither would do, without randomness and at
  no cost. Decoded audio keeps that floor, far below anything audible at a normal listening level.
- **Envelope dims weighted by what they do to the sound** (`envelope_weighting="log_spectral"`).
  The coded envelope is a DCT of the log envelope that is orthonormal up to a few per cent, so every
  coefficient moves the log spectrum by about the same amount per unit, and the squared distance
  between coefficient vectors is the mean squared log-spectral distance on the mel axis. The
  coefficients above c0 therefore share one scale in the quantiser (the RMS of their spreads) instead
  of each being normalised to unit variance, which made the small fine-ripple coefficients as costly as
  the spectral tilt. c0 (the level, whose range is set by speech against silence), log-F0, voicing and
  aperiodicity stay normalised per dimension; after that log-F0 is weighted x4 and voicing x2, which
  gives pitch enough of the bits (the offline-codec study's variant B; docs/architecture.md, decisions).
- **The band a clip does not carry is filled in before quantising** (`fill_missing_band`). A clip
  recorded at 16 kHz has nothing above 8 kHz; after the floor that band is flat, a spectrum a full-band
  corpus never shows, and the nearest codes for it fit the band the clip does carry badly. So the
  analysis finds the highest frequency the clip's envelope rises above the floor, and when that is
  well below Nyquist the envelope above it (and the aperiodicity bands centred there) is replaced:
  first by the corpus's mean envelope, shifted to each frame's level just below the edge, then by
  what the codebooks make of that guess. The codes are then chosen by the band the clip carries and
  come from the codes the corpus itself uses (the ones a model trained on it knows), and decoding gives
  full-band audio. Fitting analyses the clips as they are: a full-band corpus has nothing to fill, and
  a corpus that is band-limited throughout is fitted on its own spectra, whose empty band the fill
  then reproduces from the corpus mean.

Codebook files record these settings in their metadata; files written before them lack the fields
and keep the analysis they were fitted with (no floor, per-dimension normalisation, no band fill).
The measurements behind these choices are in benchmarks/README.md and tests/test_world_codec.py.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from vall_e.codecs.base import Codec, register_codec
from vall_e.codecs.rvq import ResidualVQ, fit_rvq
from vall_e.utils.audio import load_audio, save_audio
from vall_e.utils.errors import UserError, run_main
from vall_e.utils.legacy_imports import import_with_pkg_resources

SAMPLE_RATE = 24_000
FRAME_RATE = 75.0
ENVELOPE_WEIGHTINGS = ("log_spectral", "per_dim")
# what a codebook file's feature settings mean when it lacks a field (written before the field existed)
LEGACY_FEATURES: dict[str, Any] = {"noise_floor_db": None, "envelope_weighting": "per_dim",
                                   "fill_missing_band": False}
# A clip counts as band-limited when its envelope stops above the floor below this fraction of Nyquist
# (a 22.05 kHz file, whose resampler rolls off just under 11 kHz, does not; a 16 kHz file does).
FULL_BAND = 0.85
# The fill starts this far below the detected edge, so a resampler's roll-off is filled too instead
# of being matched as if it were the speech's own spectrum, and fades in over FILL_RAMP of the edge.
FILL_EDGE = 0.9
FILL_RAMP = 0.03
APERIODICITY_BAND_HZ = 3000.0  # WORLD's code_aperiodicity: one band every 3 kHz, centred on k x 3 kHz


_PYWORLD_LOCK = threading.Lock()
_pyworld: types.ModuleType | None = None


def import_pyworld() -> types.ModuleType:
    """Import pyworld once (thread-safe: analysis runs in threads), working around its
    `import pkg_resources` (see `vall_e.utils.legacy_imports`)."""
    global _pyworld
    if _pyworld is None:
        with _PYWORLD_LOCK:
            if _pyworld is None:
                _pyworld = _import_pyworld()
    return _pyworld


def _import_pyworld() -> types.ModuleType:
    try:
        return import_with_pkg_resources("pyworld")
    except ModuleNotFoundError as e:
        if e.name == "pyworld":
            raise UserError("the offline 'world' codec needs pyworld: pip install pyworld") from None
        raise


@dataclass(frozen=True)
class WorldFeatureConfig:
    """Everything that defines the feature vector; stored in the codebook file."""

    sample_rate: int = SAMPLE_RATE
    frame_rate: float = FRAME_RATE
    # dio (+stonemask) | harvest (much slower, and it marks ~all espeak frames voiced: benchmarks/README.md)
    f0_method: str = "dio"
    f0_floor: float = 60.0
    f0_ceil: float = 500.0
    fft_size: int = 1024
    n_mcep: int = 40
    f0_weight: float = 4.0
    vuv_weight: float = 2.0
    # envelope floor, dB of power re digital full scale (white noise at an RMS of X dBFS has an envelope
    # near X dB); None = no floor (codebook files from before the floor existed)
    noise_floor_db: float | None = -90.0
    # "log_spectral": envelope dims c1.. share one scale; "per_dim": each normalised on its own (older files)
    envelope_weighting: str = "log_spectral"
    # band-limited clips get the band they lack filled in before quantising (module docstring)
    fill_missing_band: bool = True

    def __post_init__(self) -> None:
        if self.envelope_weighting not in ENVELOPE_WEIGHTINGS:
            raise ValueError(f"envelope_weighting must be one of {ENVELOPE_WEIGHTINGS}, "
                             f"got {self.envelope_weighting!r}")
        if self.noise_floor_db is not None and not math.isfinite(self.noise_floor_db):
            raise ValueError(f"noise_floor_db must be finite or None, got {self.noise_floor_db!r}")
        if self.fill_missing_band and self.noise_floor_db is None:
            raise ValueError("fill_missing_band needs a noise floor (noise_floor_db) to tell an empty band")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WorldFeatureConfig":
        """The config stored in a codebook file; fields the file predates take their old behaviour."""
        return cls(**{**LEGACY_FEATURES, **d})

    @property
    def frame_period(self) -> float:
        return 1000.0 / self.frame_rate

    @property
    def hop(self) -> float:
        return self.sample_rate / self.frame_rate

    def n_bap(self) -> int:
        return int(import_pyworld().get_num_aperiodicities(self.sample_rate))

    def dim(self) -> int:
        return 2 + self.n_mcep + self.n_bap()

    def envelope_dims(self) -> slice:
        """Columns of the envelope coefficients above c0 (c1..c[n_mcep-1])."""
        return slice(3, 2 + self.n_mcep)

    def weights(self, std: Tensor | None = None) -> Tensor:
        """Per-dimension weights applied after normalisation by `std` (the fit frames' spreads, which
        "log_spectral" weighting needs: it gives the envelope dims c1.. one shared scale)."""
        w = torch.ones(self.dim())
        w[0], w[1] = self.f0_weight, self.vuv_weight
        env = self.envelope_dims()
        if self.envelope_weighting == "log_spectral" and env.stop > env.start:
            if std is None:
                raise ValueError("log_spectral envelope weighting needs the feature spreads (std)")
            s = std.float().reshape(-1)[env]
            w[env] = s / s.pow(2).mean().sqrt().clamp_min(1e-12)
        return w


def n_frames(n_samples: int, cfg: WorldFeatureConfig) -> int:
    """EnCodec's frame count for a clip: ceil(samples / hop)."""
    return int(math.ceil(n_samples / cfg.hop - 1e-9))


def _as_mono_f64(wav: Tensor | np.ndarray) -> np.ndarray:
    x = wav.detach().cpu().numpy() if isinstance(wav, Tensor) else np.asarray(wav)
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.ndim != 1:
        raise ValueError(f"expected mono audio [samples], got shape {tuple(x.shape)}")
    x = np.ascontiguousarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("audio contains NaN or inf samples")
    return x


def world_features(wav: Tensor | np.ndarray, cfg: WorldFeatureConfig) -> np.ndarray:
    """Mono audio at cfg.sample_rate -> features [T, D] (T = ceil(samples / hop)).

    log-F0 is NaN in every frame when the clip has no voiced frame at all; callers fill it.
    """
    return analyse_clip(wav, cfg)[0]


def analyse_clip(wav: Tensor | np.ndarray, cfg: WorldFeatureConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """`world_features` plus the envelope it was coded from ([T, fft_size // 2 + 1], floored) and the
    highest frequency the clip carries: where the envelope of its louder frames (90th percentile over
    frames) last rises 3 dB above the floor; Nyquist without a floor."""
    pw = import_pyworld()
    x = _as_mono_f64(wav)
    t_out = n_frames(len(x), cfg)
    nyquist = cfg.sample_rate / 2
    if t_out == 0:
        return np.zeros((0, cfg.dim())), np.zeros((0, cfg.fft_size // 2 + 1)), nyquist
    # WORLD gives floor(n / hop) + 1 frames; pad so short clips still get t_out frames
    min_len = int(math.ceil((t_out - 1) * cfg.hop)) + 1
    if len(x) < max(min_len, cfg.fft_size):
        x = np.concatenate([x, np.zeros(max(min_len, cfg.fft_size) - len(x))])
    fs, fp = cfg.sample_rate, cfg.frame_period
    if cfg.f0_method == "dio":
        f0, t = pw.dio(x, fs, f0_floor=cfg.f0_floor, f0_ceil=cfg.f0_ceil, frame_period=fp)
        f0 = pw.stonemask(x, f0, t, fs)
    elif cfg.f0_method == "harvest":
        f0, t = pw.harvest(x, fs, f0_floor=cfg.f0_floor, f0_ceil=cfg.f0_ceil, frame_period=fp)
    else:
        raise ValueError(f"unknown f0_method {cfg.f0_method!r} (dio | harvest)")
    f0, t = f0[:t_out].copy(), t[:t_out].copy()
    sp = pw.cheaptrick(x, f0, t, fs, fft_size=cfg.fft_size)
    ap = pw.d4c(x, f0, t, fs, fft_size=cfg.fft_size)
    band = nyquist
    if cfg.noise_floor_db is not None:
        floor = 10.0 ** (cfg.noise_floor_db / 10.0)
        if cfg.fill_missing_band:
            carried = np.flatnonzero(np.percentile(sp, 90, axis=0) > 2.0 * floor)
            band = float(carried[-1]) * fs / cfg.fft_size if len(carried) else 0.0
        sp += floor  # the envelope of faint white noise (module docstring)
    mcep = pw.code_spectral_envelope(sp, fs, cfg.n_mcep)
    bap = pw.code_aperiodicity(ap, fs)
    voiced = f0 > 0
    logf0 = np.full(t_out, np.nan)
    if voiced.any():
        idx = np.flatnonzero(voiced)
        logf0 = np.interp(np.arange(t_out), idx, np.log(f0[idx]))
    feats = np.concatenate([logf0[:, None], voiced[:, None].astype(np.float64), mcep, bap], axis=1)
    return feats, sp, band


def world_synthesize(feats: np.ndarray, cfg: WorldFeatureConfig) -> np.ndarray:
    """Features [T, D] -> float32 audio of T * hop samples; robust to any finite feature values."""
    pw = import_pyworld()
    t_len = feats.shape[0]
    n_out = int(round(t_len * cfg.hop))
    if t_len == 0:
        return np.zeros(0, dtype=np.float32)
    feats = np.nan_to_num(np.asarray(feats, dtype=np.float64))
    fs = cfg.sample_rate
    logf0 = np.clip(feats[:, 0], math.log(cfg.f0_floor), math.log(cfg.f0_ceil))
    f0 = np.where(feats[:, 1] > 0.5, np.exp(logf0), 0.0)
    mcep = np.ascontiguousarray(feats[:, 2:2 + cfg.n_mcep])
    bap = np.ascontiguousarray(np.minimum(feats[:, 2 + cfg.n_mcep:], 0.0))
    sp = pw.decode_spectral_envelope(mcep, fs, cfg.fft_size)
    sp = np.ascontiguousarray(np.clip(np.nan_to_num(sp, nan=1e-12, posinf=1e4), 1e-16, 1e4))
    ap = pw.decode_aperiodicity(bap, fs, cfg.fft_size)
    ap = np.ascontiguousarray(np.clip(np.nan_to_num(ap, nan=1.0), 1e-3, 1.0 - 1e-6))
    y = pw.synthesize(np.ascontiguousarray(f0), sp, ap, fs, cfg.frame_period)
    y = np.nan_to_num(y)
    if len(y) < n_out:
        y = np.concatenate([y, np.zeros(n_out - len(y))])
    return np.clip(y[:n_out], -1.0, 1.0).astype(np.float32)


def _fill_logf0(feats: np.ndarray, fill: float) -> np.ndarray:
    if feats.shape[0] and np.isnan(feats[0, 0]):
        feats = feats.copy()
        feats[:, 0] = fill
    return feats


@register_codec("world")
class WorldCodec(Codec):
    """WORLD features quantised by a fitted `ResidualVQ` (see the module docstring)."""

    name = "world"

    def __init__(self, codebooks: str | os.PathLike | ResidualVQ, device: str = "cpu"):
        if isinstance(codebooks, ResidualVQ):
            self.path: str | None = None
            self.rvq = codebooks
            source = "codebooks"
        else:
            self.path = str(Path(codebooks).resolve()) if str(codebooks) else ""
            if not self.path:
                raise UserError("codec.codebooks: the 'world' codec needs a fitted codebook file "
                                "(python -m vall_e.codecs.world fit DIR)")
            self.rvq = ResidualVQ.load(self.path)
            source = self.path
        info = self.rvq.info
        if info.get("codec") != "world":
            raise UserError(f"{source}: codebooks were not fitted for the 'world' codec")
        try:
            self.cfg = WorldFeatureConfig.from_dict(info["features"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{source}: bad world feature settings in codebook metadata ({e})") from None
        if self.cfg.dim() != self.rvq.dim:
            raise UserError(f"{source}: codebook dim {self.rvq.dim} != feature dim {self.cfg.dim()}")
        self.device = device  # WORLD runs on CPU; kept for interface symmetry
        self.sample_rate = self.cfg.sample_rate
        self.frame_rate = self.cfg.frame_rate
        self.n_levels = self.rvq.n_levels
        self.n_codes = self.rvq.n_codes

    def features(self, wav: Tensor | np.ndarray) -> Tensor:
        """Unquantised feature frames [T, D] (log-F0 filled with the corpus mean if never voiced; for a
        band-limited clip, the band it lacks filled in as the module docstring says)."""
        f, sp, band = analyse_clip(wav, self.cfg)
        f = _fill_logf0(f, float(self.rvq.mean[0]))
        if self.cfg.fill_missing_band and len(f) and band < FULL_BAND * self.cfg.sample_rate / 2:
            f = self._fill_band(f, sp, band)
        return torch.from_numpy(f).float()

    def _fill_band(self, feats: np.ndarray, sp: np.ndarray, band: float) -> np.ndarray:
        """Replace what `feats` say above `band` Hz: first the corpus's mean envelope at each frame's
        level just below the edge (and the mean aperiodicity), then the codebooks' reconstruction of
        that guess, so the codes are chosen by the band the clip carries."""
        pw = import_pyworld()
        cfg = self.cfg
        fs, nb = cfg.sample_rate, cfg.n_mcep
        env, bap = slice(2, 2 + nb), slice(2 + nb, cfg.dim())
        freqs = np.arange(sp.shape[1]) * fs / cfg.fft_size
        edge = FILL_EDGE * band
        above = np.clip((freqs - edge) / (FILL_RAMP * max(band, 1.0)), 0.0, 1.0)  # 0 carried, 1 filled
        bap_out = APERIODICITY_BAND_HZ * np.arange(1, cfg.n_bap() + 1) > edge
        log_sp = np.log(sp)

        def with_band(guess_log_sp: np.ndarray, guess_bap: np.ndarray) -> np.ndarray:
            f = feats.copy()
            mixed = np.exp((1.0 - above) * log_sp + above * guess_log_sp)
            f[:, env] = pw.code_spectral_envelope(np.ascontiguousarray(mixed), fs, nb)
            cols = np.arange(bap.start, bap.stop)[bap_out]
            f[:, cols] = guess_bap
            return f

        mean = self.rvq.mean.double().numpy()
        mean_env = pw.decode_spectral_envelope(np.ascontiguousarray(mean[None, env]), fs, cfg.fft_size)
        mean_log = np.log(mean_env)[0]
        ref = (freqs >= 0.8 * edge) & (freqs < edge)
        if not ref.any():  # (almost) nothing carried: take the level from the whole envelope
            ref = np.ones_like(freqs, dtype=bool)
        guess = mean_log[None, :] + (log_sp[:, ref].mean(1, keepdims=True) - mean_log[ref].mean())
        f = with_band(guess, np.broadcast_to(mean[bap][bap_out], (len(feats), int(bap_out.sum()))))
        rec = self.rvq.decode(self.rvq.encode(torch.from_numpy(f).float())).double().numpy()
        guess = np.log(pw.decode_spectral_envelope(np.ascontiguousarray(rec[:, env]), fs, cfg.fft_size))
        return with_band(guess, rec[:, bap][:, bap_out])

    def encode(self, wav: Tensor) -> Tensor:
        return self.rvq.encode(self.features(wav))

    def encode_batch(self, wavs: list[Tensor]) -> list[Tensor]:
        """Clips analysed in threads (pyworld releases the GIL), then one batched quantisation."""
        workers = min(len(wavs), os.cpu_count() or 1)
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                feats = list(pool.map(self.features, wavs))
        else:
            feats = [self.features(w) for w in wavs]
        if not feats:
            return []
        lengths = [f.shape[0] for f in feats]
        codes = self.rvq.encode(torch.cat(feats), lengths=lengths)
        return list(codes.split(lengths))

    def decode(self, codes: Tensor) -> Tensor:
        if codes.dim() != 2 or codes.shape[1] == 0:
            raise ValueError(f"expected codes [T, L>=1], got {tuple(codes.shape)}")
        feats = self.rvq.decode(codes.cpu()).numpy()
        return torch.from_numpy(world_synthesize(feats, self.cfg))

    def spec(self) -> dict[str, Any]:
        s = super().spec()
        s["codebooks"] = self.path  # None when built from in-memory tensors (e.g. an exported model)
        s["codebooks_fingerprint"] = self.rvq.fingerprint()
        s["features"] = asdict(self.cfg)
        return s


def fit_world_codec(wavs: Iterable[str | os.PathLike | Tensor | np.ndarray], out_path: str | os.PathLike,
                    n_levels: int = 8, n_codes: int = 1024, iters: int = 25, seed: int = 0,
                    max_frames: int | None = None, workers: int = 1, progress: bool = True,
                    feature_cfg: WorldFeatureConfig | None = None, switch_penalty: float = 0.0) -> WorldCodec:
    """Analyse every clip (paths or 24 kHz mono arrays), fit the RVQ, write `out_path` atomically.

    `max_frames` fits on a random subset of frames to bound time on large corpora. `workers` runs
    WORLD analysis in threads (pyworld releases the GIL in DIO/StoneMask/CheapTrick).
    `switch_penalty`: level 0's cost per code change, relative to its mean distortion (see
    `vall_e.codecs.rvq.smooth_nearest`); 0 = nearest code.
    """
    cfg = feature_cfg or WorldFeatureConfig()
    items = list(wavs)
    if not items:
        raise UserError("fit: no audio files given")

    def analyse(item: Any) -> np.ndarray:
        x = load_audio(item, cfg.sample_rate, allow_silent=True) if isinstance(item, (str, os.PathLike)) else item
        return world_features(x, cfg)

    bar = tqdm(total=len(items), desc="WORLD analysis", unit="file", disable=not progress)
    feats: list[np.ndarray] = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for f in pool.map(analyse, items):
            feats.append(f)
            bar.update(1)
    bar.close()
    x = np.concatenate([f for f in feats if len(f)] or [np.zeros((0, cfg.dim()))])
    if len(x) == 0:
        raise UserError("fit: the audio files hold no frames")
    voiced_logf0 = x[~np.isnan(x[:, 0]), 0]
    fill = float(voiced_logf0.mean()) if len(voiced_logf0) else math.log(120.0)
    x[np.isnan(x[:, 0]), 0] = fill
    xt = torch.from_numpy(x).float()
    if max_frames is not None and xt.shape[0] > max_frames:
        gen = torch.Generator().manual_seed(seed)
        xt = xt[torch.randperm(xt.shape[0], generator=gen)[:max_frames]]
    info = {"codec": "world", "features": asdict(cfg), "fit_frames": int(xt.shape[0]),
            "fit_files": len(items), "iters": iters, "seed": seed}
    std = xt.std(0, unbiased=False).clamp_min(1e-5) if xt.shape[0] > 1 else torch.ones(xt.shape[1])
    rvq = fit_rvq(xt, n_levels=n_levels, n_codes=n_codes, weight=cfg.weights(std), iters=iters, seed=seed,
                  info=info, progress=progress, switch_penalty=switch_penalty)
    rvq.save(out_path)
    return WorldCodec(out_path)


def _list_audio(folder: Path, suffix: str) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    files = sorted(p for p in folder.rglob(f"*{suffix}") if p.is_file())
    if not files:
        raise UserError(f"{folder}: no *{suffix} files found")
    return files


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vall_e.codecs.world",
                                 description="Offline WORLD + residual-VQ codec: fit codebooks, resynthesise.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    fit = sub.add_parser("fit", help="fit codebooks on a folder of audio (searched recursively)")
    fit.add_argument("dir", type=Path)
    fit.add_argument("--suffix", default=".wav")
    fit.add_argument("--out", type=Path, default=None, help="default: DIR/codebooks.safetensors")
    fit.add_argument("--max-files", type=int, default=None, help="fit on a random subset of files")
    fit.add_argument("--max-frames", type=int, default=None, help="fit on a random subset of frames")
    fit.add_argument("--levels", type=int, default=8)
    fit.add_argument("--codes", type=int, default=1024)
    fit.add_argument("--iters", type=int, default=25)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--workers", type=int, default=1)
    fit.add_argument("--switch-penalty", type=float, default=0.0,
                     help="level 0's cost per code change, relative to its mean distortion (e.g. 1.0: level-0 "
                          "codes hold through steady sounds; 0 = nearest code)")
    rs = sub.add_parser("resynth", help="encode then decode one file (to hear the codec)")
    rs.add_argument("input", type=Path)
    rs.add_argument("output", type=Path)
    rs.add_argument("--codebooks", type=Path, required=True)
    rs.add_argument("--levels", type=int, default=None, help="decode only the first N levels")
    args = ap.parse_args(argv)

    if args.cmd == "fit":
        for name in ("levels", "codes", "iters", "max_files", "max_frames", "workers"):
            v = getattr(args, name)
            if v is not None and v < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if not args.switch_penalty >= 0:
            raise UserError(f"--switch-penalty must be >= 0, got {args.switch_penalty}")
        files = _list_audio(args.dir, args.suffix)
        if args.max_files is not None and len(files) > args.max_files:
            files = sorted(random.Random(args.seed).sample(files, args.max_files))
        out = args.out or args.dir / "codebooks.safetensors"
        codec = fit_world_codec(files, out, n_levels=args.levels, n_codes=args.codes, iters=args.iters,
                                seed=args.seed, max_frames=args.max_frames, workers=args.workers,
                                switch_penalty=args.switch_penalty)
        print(f"wrote {out} ({codec.n_levels} levels x {codec.n_codes} codes, "
              f"{codec.rvq.info['fit_frames']} frames from {len(files)} files)")
    else:
        codec = WorldCodec(args.codebooks)
        codes = codec.encode(load_audio(args.input, codec.sample_rate))
        if args.levels is not None:
            if not 1 <= args.levels <= codec.n_levels:
                raise UserError(f"--levels must be in 1..{codec.n_levels}, got {args.levels}")
            codes = codes[:, :args.levels]
        save_audio(args.output, codec.decode(codes), codec.sample_rate)
        print(f"wrote {args.output} ({codes.shape[0]} frames, {codes.shape[1]} levels)")
    return 0


if __name__ == "__main__":
    run_main(main)

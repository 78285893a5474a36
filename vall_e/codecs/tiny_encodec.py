"""A tiny randomly initialised EnCodec, saved like a hub checkpoint, so tests use the real loading path.

A fresh `EncodecModel` has all-zero codebooks, so every frame would get code 0. Here each RVQ
level's codebook is instead fitted (k-means) to the encoder's frames of calibration audio, or to
what the previous levels left over, so codes vary with the input as a trained codec's do. The
folder is written with `save_pretrained` (plus the feature extractor config, as on the hub) and is
loaded by `EncodecCodec(model=str(folder))` exactly like `facebook/encodec_24khz`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from vall_e.utils.hub import quiet_transformers
from vall_e.utils.io import atomic_dir

TINY_CONFIG = dict(num_filters=8, hidden_size=32, codebook_dim=32, num_lstm_layers=1,
                   target_bandwidths=[1.5, 3.0, 6.0], sampling_rate=24_000, codebook_size=1024)


def speechlike_audio(seconds: float, sample_rate: int = 24_000, seed: int = 0,
                     f0_range: tuple[float, float] = (90.0, 220.0)) -> Tensor:
    """Synthetic speech-like audio: voiced syllables with moving formants, fricative noise and pauses.

    Not intelligible, but it has speech's structure (pitch, formants, syllable rhythm, silences), which
    is what calibrating a codec and testing audio code paths need. Peak 0.5, float32 [samples].
    """
    rng = np.random.default_rng(seed)
    n = max(1, int(round(seconds * sample_rate)))
    # Piecewise-constant controls per syllable, smoothed into continuous trajectories.
    f0 = np.empty(n)
    formants = np.empty((3, n))
    voiced = np.empty(n)
    noise = np.empty(n)
    base_f0 = rng.uniform(*f0_range)
    pos = 0
    while pos < n:
        length = int(rng.uniform(0.08, 0.3) * sample_rate)
        seg = slice(pos, min(n, pos + length))
        kind = rng.random()
        f0[seg] = base_f0 * rng.uniform(0.8, 1.25)
        formants[0, seg] = rng.uniform(300, 850)
        formants[1, seg] = rng.uniform(900, 2400)
        formants[2, seg] = rng.uniform(2400, 3300)
        voiced[seg] = 1.0 if kind < 0.75 else 0.0
        noise[seg] = 0.3 if 0.75 <= kind < 0.9 else 0.02 * (kind < 0.75)
        if kind >= 0.9:  # a pause
            voiced[seg] = 0.0
            noise[seg] = 0.0
        pos += length

    def smooth(x: np.ndarray, ms: float) -> np.ndarray:
        w = max(1, int(ms / 1000 * sample_rate))
        k = np.ones(w) / w
        return np.convolve(np.pad(x, (w // 2, w - 1 - w // 2), mode="edge"), k, mode="valid")

    t = np.arange(n) / sample_rate
    f0 = smooth(f0, 40) * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(2, 5) * t + rng.uniform(0, 6.3)))
    formants = np.stack([smooth(f, 30) for f in formants])
    voiced, noise = smooth(voiced, 25), smooth(noise, 25)

    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    # Harmonic amplitudes follow the formants; they change slowly, so compute them every `step`
    # samples and interpolate. Harmonic k's carrier is exp(i k phase), built by repeated products.
    step = 64
    coarse = np.arange(0, n, step)
    f0_c, fm_c = f0[coarse], formants[:, coarse]
    z1 = np.exp(1j * phase)
    zk = np.ones(n, dtype=np.complex128)
    sig = np.zeros(n)
    bandwidths = (90.0, 120.0, 180.0)
    gains = (1.0, 0.6, 0.3)
    top = min(5000.0, 0.45 * sample_rate)
    for k in range(1, int(top / max(1.0, float(f0.min()))) + 1):
        zk *= z1
        fk = k * f0_c
        amp = sum(g * np.exp(-(((fk - fm) / bw) ** 2)) for fm, bw, g in zip(fm_c, bandwidths, gains))
        amp = amp + 0.02 / k  # a little spectral tilt so harmonics between formants are not zero
        amp[fk >= top] = 0.0
        sig += np.interp(np.arange(n), coarse, amp) * zk.imag
    hiss = np.diff(rng.standard_normal(n + 1))  # first difference: a high-tilted noise like frication
    sig = voiced * sig / (np.abs(sig).max() + 1e-9) + noise * hiss / (np.abs(hiss).max() + 1e-9)
    sig = sig / (np.abs(sig).max() + 1e-9) * 0.5
    return torch.from_numpy(sig.astype(np.float32))


def _nearest(x: Tensor, c: Tensor) -> Tensor:
    """Index of the nearest row of `c` for each row of `x` (the same rule EnCodec's codebook uses)."""
    return (x @ c.t() * 2 - c.pow(2).sum(1)).argmax(1)


def _rescale_conv(conv: torch.nn.Module, scale: Tensor, shift: Tensor) -> None:
    """Make a weight-normed conv output `out * scale + shift` per channel (scale via the norm gain g)."""
    wn = conv.parametrizations.weight
    wn.original0.mul_(scale.view(-1, 1, 1))
    conv.bias.mul_(scale).add_(shift)


def _kmeans(x: Tensor, k: int, iters: int, gen: torch.Generator) -> Tensor:
    """Plain Lloyd k-means from random frame picks (jittered when there are fewer frames than codes)."""
    n = x.shape[0]
    pick = torch.randperm(n, generator=gen)[:k] if n >= k else torch.randint(n, (k,), generator=gen)
    scale = x.std(0, keepdim=True).clamp_min(1e-6)
    c = x[pick].clone()
    if n < k:
        c += 0.05 * scale * torch.randn(c.shape, generator=gen)
    for _ in range(iters):
        assign = _nearest(x, c)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        used = counts > 0
        c[used] = sums[used] / counts[used, None]
        # Empty codes keep their position; nudge them so they do not sit exactly on a used one.
        if (~used).any():
            c[~used] += 0.01 * scale * torch.randn(c[~used].shape, generator=gen)
    return c


def make_tiny_encodec(out_dir: str | os.PathLike, calibration_audio: Sequence[Tensor] | None = None,
                      seed: int = 0, *, kmeans_iters: int = 4, n_fit_frames: int = 2048,
                      jitter: float = 0.5) -> Path:
    """Build, calibrate and `save_pretrained` a ~0.67M-parameter EnCodec (24 kHz, 8 levels at 6 kbps).

    `calibration_audio`: mono 24 kHz clips used to fit the codebooks; by default 12 s of
    `speechlike_audio` in several voices. Deterministic for a given seed and input.
    """
    from transformers import EncodecConfig, EncodecFeatureExtractor, EncodecModel

    out_dir = Path(out_dir)
    gen = torch.Generator().manual_seed(seed)
    if calibration_audio is None:
        calibration_audio = [speechlike_audio(3.0, seed=seed * 100 + i, f0_range=(80.0 + 25 * i, 160.0 + 30 * i))
                             for i in range(4)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = EncodecConfig(**TINY_CONFIG)
        model = EncodecModel(config).eval()
    hop = config.hop_length
    padded = []
    for wav in calibration_audio:
        wav = wav.reshape(-1).float()
        padded.append(torch.nn.functional.pad(wav, (0, (-wav.numel()) % hop))[None, None])

    with torch.no_grad():
        # A random encoder's frames are nearly constant over time (bias-dominated). Rescale its last
        # convolution so calibration frames are zero-mean, unit-variance per dimension: codes then
        # depend on the audio, and every RVQ level's residual stays far above float rounding.
        frames = torch.cat([model.encoder(x)[0].t() for x in padded])  # [N, D]
        mean, std = frames.mean(0), frames.std(0).clamp_min(1e-8)
        _rescale_conv(model.encoder.layers[-1].conv, 1.0 / std, -mean / std)
        frames = (frames - mean) / std

        # Frames jittered around the calibration frames: more points than codes, so k-means spreads
        # each level's codebook over the distribution instead of memorising the calibration frames.
        pick = torch.randint(frames.shape[0], (n_fit_frames,), generator=gen)
        residual = frames[pick] + jitter * torch.randn(n_fit_frames, frames.shape[1], generator=gen)
        for layer in model.quantizer.layers:
            book = layer.codebook
            centroids = _kmeans(residual, config.codebook_size, kmeans_iters, gen)
            book.embed.copy_(centroids)
            book.embed_avg.copy_(centroids)
            book.cluster_size.fill_(1.0)
            book.inited.fill_(1.0)
            residual = residual - centroids[_nearest(residual, centroids)]

        # Give the (random) decoder a sane output level: zero mean, std 0.1 on calibration audio.
        audio = model.decode(model.encode(torch.cat(padded, -1), bandwidth=6.0).audio_codes, [None]).audio_values
        a_mean, a_std = audio.mean(), audio.std().clamp_min(1e-8)
        _rescale_conv(model.decoder.layers[-1].conv, torch.full((1,), 0.1 / float(a_std)),
                      torch.full((1,), -0.1 * float(a_mean / a_std)))

    extractor = EncodecFeatureExtractor(feature_size=1, sampling_rate=config.sampling_rate, padding_value=0.0)
    with atomic_dir(out_dir) as tmp, quiet_transformers():
        model.save_pretrained(tmp)
        extractor.save_pretrained(tmp)
    return out_dir

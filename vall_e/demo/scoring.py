"""How close the demo's speech is to espeak's, and whether it is the right words in the right voice.

MCD-DTW (dB) against espeak's rendering of the same sentence by the same voice: between espeak
renderings the same words score at most 7.9 dB and different words at least 9.3 dB
(shared/reference/offline-codec-prototype.md), so 8.5 dB separates "said these words" from "said
something else". Per output also: is it closer to its own sentence than to every other sentence the
same voice says in the test (reading, not a voice's average sound), its duration against espeak's,
and which voice a speaker encoder (resemblyzer, optional) puts it nearest to.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vall_e.demo.corpus import TestItem
from vall_e.evaluation.metrics import Analysis, analyse, mcd_dtw, speaker_encoder_for, speaker_embedding
from vall_e.utils.audio import load_audio

SR = 24_000
SAME_WORDS_DB = 8.5
MIN_SAMPLES = 2400  # outputs under 0.1 s are no speech: scored as missing


class Analyses:
    """`analyse` once per file (references are compared many times)."""

    def __init__(self) -> None:
        self._cache: dict[str, Analysis] = {}

    def __call__(self, path: Path | str) -> Analysis:
        key = str(path)
        if key not in self._cache:
            self._cache[key] = analyse(load_audio(key, SR, allow_silent=True).numpy(), SR)
        return self._cache[key]


def score_column(items: Sequence[TestItem], wavs: Sequence[Path | str], analyses: Analyses,
                 against: str = "reference") -> list[dict[str, Any]]:
    """Per item: `mcd` to its own reference, `mcd_others` to the voice's other sentences, `closer`
    (own < every other), `duration` (output / reference length)."""
    rows = []
    for item, wav in zip(items, wavs):
        audio = load_audio(wav, SR, allow_silent=True).numpy()
        ref = analyses(item.reference)
        if audio.size < MIN_SAMPLES:
            rows.append({"mcd": math.nan, "mcd_others": [], "closer": False, "duration": 0.0})
            continue
        out = analyse(audio, SR)
        own = float(mcd_dtw(out, ref))
        others = [float(mcd_dtw(out, analyses(o))) for o in item.others]
        rows.append({"mcd": own, "mcd_others": others, "closer": bool(others) and own < min(others),
                     "duration": out.seconds / ref.seconds})
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Means and shares over a column (a missing output counts as over 8.5 dB and not closer)."""
    mcd = np.array([r["mcd"] for r in rows], dtype=float)
    dur = np.array([r["duration"] for r in rows], dtype=float)
    return {"mcd_mean": float(np.nanmean(mcd)) if np.isfinite(mcd).any() else math.nan,
            "under_8_5": float(np.mean(np.nan_to_num(mcd, nan=99.0) < SAME_WORDS_DB)),
            "closer_than_every_other": float(np.mean([r["closer"] for r in rows])),
            "duration_ratio_mean": float(np.mean(dur)),
            "duration_within_15": float(np.mean(np.abs(dur - 1.0) <= 0.15)),
            "missing": int(np.sum(~np.isfinite(mcd)))}


def speaker_identification(items: Sequence[TestItem], wavs: Sequence[Path | str],
                           voice_clips: dict[str, list[Path]]) -> dict[str, Any]:
    """Share of outputs whose speaker embedding is nearest (cosine) to its own voice's centroid, the
    centroids taken over espeak clips of each voice; or why it could not be measured."""
    encoder, why = speaker_encoder_for("auto")
    if encoder is None:
        return {"available": False, "why": why}
    centroids = {}
    for voice, clips in voice_clips.items():
        embs = [e for e in (speaker_embedding(load_audio(c, SR).numpy(), SR, encoder) for c in clips) if e is not None]
        c = np.mean(embs, axis=0)
        centroids[voice] = c / np.linalg.norm(c)
    names = sorted(centroids)
    matrix = np.stack([centroids[n] for n in names])
    hits, margins = [], []
    for item, wav in zip(items, wavs):
        e = speaker_embedding(load_audio(wav, SR, allow_silent=True).numpy(), SR, encoder)
        if e is None:
            hits.append(False)
            continue
        sims = matrix @ e
        own = names.index(item.speaker)
        hits.append(int(np.argmax(sims)) == own)
        if len(names) > 1:
            margins.append(float(sims[own] - np.max(np.delete(sims, own))))
    # the margin (cosine to the own voice minus the nearest other's) shows how near the misses and
    # near-misses are, which a share over a few dozen outputs cannot
    margin = {"mean_margin": float(np.mean(margins)), "min_margin": float(np.min(margins))} if margins else {}
    return {"available": True, "encoder": encoder.name, "nearest_is_own_voice": float(np.mean(hits)),
            "n": len(hits), "hits": int(np.sum(hits)), **margin}

"""Where a long recording may be cut: pauses found from the signal's energy, and a plan of utterances.

Whisper's timestamps say where its sentences end, but they drift and, from a poor model, are noise; a
cut placed on them alone can split a word. So the signal decides where a cut *may* go (a stretch of
at least `min_pause` seconds well below the speech level) and the timestamps only say which of
those pauses a cut *should* prefer. Cuts always fall inside a pause, so no word is cut in half.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

FRAME_HOP = 0.01  # energy frames: 10 ms hop
FRAME_WIN = 0.02  # ... over 20 ms windows


@dataclass(frozen=True)
class SegmentConfig:
    """How utterances are cut from a long recording (seconds unless noted)."""

    min_seconds: float = 3.0   # shortest utterance kept
    max_seconds: float = 12.0  # longest utterance kept
    min_pause: float = 0.15    # shortest silence that counts as a pause (shorter: stop closures inside words)
    pad: float = 0.2           # silence kept before and after the speech of an utterance, at most
    silence_db: float = 35.0   # frames this many dB below the speech level are silence
    max_inner_pause: float = 2.0  # an utterance never spans a longer pause

    def check(self) -> None:
        from vall_e.utils.errors import UserError

        if not 0 < self.min_seconds <= self.max_seconds <= 29:  # Whisper hears 30 s at a time
            raise UserError(f"segment lengths must satisfy 0 < --min-seconds <= --max-seconds <= 29, "
                            f"got {self.min_seconds:g} and {self.max_seconds:g}")
        if not 0.03 <= self.min_pause <= 5:
            raise UserError(f"--min-pause must lie in [0.03, 5] seconds, got {self.min_pause:g}")
        if not 0 <= self.pad <= 2:
            raise UserError(f"--pad must lie in [0, 2] seconds, got {self.pad:g}")
        if not 6 <= self.silence_db <= 90:
            raise UserError(f"--silence-db must lie in [6, 90], got {self.silence_db:g}")


@dataclass(frozen=True)
class Phrase:
    """Speech between two pauses: never cut. `before`/`after` bound the silence around it that a cut
    may use (the middle of the neighbouring pauses, or the file's edges)."""

    start: float
    end: float
    before: float
    after: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def frame_energy_db(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """Energy in dB of 20 ms windows every 10 ms (frame i covers [i * 10 ms, i * 10 ms + 20 ms)).

    Summed in 10 ms blocks, a few minutes of audio at a time, so an hour-long file needs no copy of
    its own size in float64."""
    hop = int(round(FRAME_HOP * sample_rate))
    n_blocks = wav.size // hop
    if n_blocks < 2:
        return np.full(1, 10 * np.log10(float(np.mean(np.square(wav, dtype=np.float64))) + 1e-12))
    blocks = np.empty(n_blocks, np.float64)
    step = 30_000  # blocks per piece (5 minutes)
    for a in range(0, n_blocks, step):
        b = min(n_blocks, a + step)
        piece = wav[a * hop:b * hop].reshape(b - a, hop).astype(np.float64)
        blocks[a:b] = np.einsum("ij,ij->i", piece, piece)
    power = (blocks[:-1] + blocks[1:]) / (2 * hop)
    return 10 * np.log10(power + 1e-12)


def silence_threshold(db: np.ndarray, silence_db: float) -> float:
    """The dB level below which a frame is silence: `silence_db` under the speech level (its 95th
    percentile), raised to 6 dB over the noise floor (10th percentile) for noisy recordings, and never
    closer than 6 dB to the speech level."""
    level, floor = float(np.percentile(db, 95)), float(np.percentile(db, 10))
    return min(max(level - silence_db, floor + 6.0), level - 6.0)


def find_phrases(wav: np.ndarray, sample_rate: int, cfg: SegmentConfig) -> list[Phrase]:
    """The speech runs of `wav` separated by pauses of at least `cfg.min_pause` seconds."""
    duration = wav.size / sample_rate
    db = frame_energy_db(wav, sample_rate)
    silent = db < silence_threshold(db, cfg.silence_db)
    # runs of silent frames -> pauses in seconds (frame i covers [i*hop, i*hop + win))
    edges = np.flatnonzero(np.diff(np.concatenate([[0], silent.astype(np.int8), [0]])))
    pauses: list[tuple[float, float]] = []
    for a, b in zip(edges[::2], edges[1::2]):  # silent frames a..b-1
        start = 0.0 if a == 0 else a * FRAME_HOP + FRAME_WIN  # first sample after the last loud window
        end = duration if b == len(silent) else b * FRAME_HOP  # the next loud window starts here
        if end - start >= cfg.min_pause or (a == 0 or b == len(silent)) and end > start:
            pauses.append((start, end))
    phrases: list[Phrase] = []
    cursor, prev_mid = 0.0, 0.0
    for start, end in pauses + [(duration, duration)]:
        if start > cursor + 1e-9:
            mid = (start + end) / 2 if end < duration else duration
            phrases.append(Phrase(cursor, start, prev_mid, mid))
        cursor, prev_mid = end, (start + end) / 2 if start > 0 else 0.0
    return phrases


@dataclass(frozen=True)
class Utterance:
    """Phrases `first..last` (inclusive) cut as [start, end] seconds of the recording."""

    first: int
    last: int
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def utterance_span(phrases: Sequence[Phrase], i: int, j: int, pad: float) -> tuple[float, float]:
    """[start, end] of phrases i..j with at most `pad` seconds of the silence around them."""
    return max(phrases[i].before, phrases[i].start - pad), min(phrases[j].after, phrases[j].end + pad)


def plan_utterances(phrases: Sequence[Phrase], cfg: SegmentConfig,
                    preferred: frozenset[int] | set[int] = frozenset()) -> tuple[list[Utterance], dict[str, float]]:
    """Group consecutive phrases into utterances of `cfg.min_seconds`..`cfg.max_seconds`, keeping as
    much speech as possible; among plans that keep the same, cuts at long pauses and at the pauses in
    `preferred` (index k = the pause after phrase k, -1 = the file's start) win.

    Returns the utterances and the seconds of speech dropped by reason: "too short" (a phrase no valid
    utterance can hold) and "too long" (speech over max_seconds without a pause).
    """
    n = len(phrases)

    def edge_bonus(k: int) -> float:  # the cut at pause k (after phrase k)
        if k < 0 or k >= n - 1:
            return 0.3  # the file's edges
        gap = phrases[k + 1].start - phrases[k].end
        return (0.3 if k in preferred else 0.0) + 0.1 * min(gap, 1.0)

    # best[k]: (score, previous index, utterance or None) for phrases 0..k-1 done
    best: list[tuple[float, int, tuple[int, int] | None]] = [(0.0, -1, None)] + [(-np.inf, -1, None)] * n
    for i in range(n):
        if best[i][0] == -np.inf:
            continue
        # drop phrase i
        if best[i][0] > best[i + 1][0]:
            best[i + 1] = (best[i][0], i, None)
        speech = 0.0
        for j in range(i, n):
            if j > i and phrases[j].start - phrases[j - 1].end > cfg.max_inner_pause:
                break
            speech += phrases[j].seconds
            start, end = utterance_span(phrases, i, j, cfg.pad)
            if end - start > cfg.max_seconds:
                break
            if end - start < cfg.min_seconds:
                continue
            score = best[i][0] + speech + edge_bonus(i - 1) + edge_bonus(j)
            if score > best[j + 1][0]:
                best[j + 1] = (score, i, (i, j))
    utterances: list[Utterance] = []
    kept = np.zeros(n, dtype=bool)
    k = n
    while k > 0:
        _, prev, utt = best[k]
        if utt is not None:
            i, j = utt
            start, end = utterance_span(phrases, i, j, cfg.pad)
            utterances.append(Utterance(i, j, start, end))
            kept[i:j + 1] = True
        k = prev
    utterances.reverse()
    dropped = {"too short": 0.0, "too long": 0.0}
    for k, (p, keep) in enumerate(zip(phrases, kept)):
        if not keep:
            dropped["too long" if too_long(phrases, k, cfg) else "too short"] += p.seconds
    return utterances, dropped


def too_long(phrases: Sequence[Phrase], k: int, cfg: SegmentConfig) -> bool:
    """Whether phrase k alone is longer than an utterance may be (speech without a pause to cut at)."""
    start, end = utterance_span(phrases, k, k, cfg.pad)
    return end - start > cfg.max_seconds


def chunk_phrases(phrases: Sequence[Phrase], cfg: SegmentConfig,
                  max_seconds: float = 29.0) -> list[tuple[int, int, float, float]]:
    """Consecutive phrases grouped into windows of at most `max_seconds` (under Whisper's 30 s), cut at
    pauses: (first, last, start, end). Phrases too long for any utterance are left out (nothing to
    transcribe there)."""
    chunks: list[tuple[int, int, float, float]] = []
    i, n = 0, len(phrases)
    while i < n:
        if too_long(phrases, i, cfg):
            i += 1
            continue
        start = max(phrases[i].before, phrases[i].start - 0.5)
        j = i
        while (j + 1 < n and not too_long(phrases, j + 1, cfg)
               and min(phrases[j + 1].after, phrases[j + 1].end + 0.5) - start <= max_seconds):
            j += 1
        end = min(phrases[j].after, phrases[j].end + 0.5, start + max_seconds)
        chunks.append((i, j, start, end))
        i = j + 1
    return chunks

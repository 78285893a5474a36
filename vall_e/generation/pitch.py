"""The pitch guard: notice an output that left its reference voice's pitch register.

A sampled AR sometimes drifts into another voice: on the demo's development sentences every output
that said the right words in the wrong voice (and so scored over 8.5 dB) sat 7-13 semitones from its
prompt's median pitch, while every good output sat within 1.6 (README, demo point 9). Such a drift is
cheap to see after the fact: the median F0 of the voiced frames, estimated on the decoded audio of the
output and of the prompt with the same estimator (WORLD's DIO + StoneMask), so a codec's own bias
cancels. `TTS.generate_codes` samples an output again (a new seed) while it is more than
`GenerationSettings.pitch_guard` semitones away, and keeps the closest of its tries.
"""
from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from vall_e.codecs.world import import_pyworld

F0_FLOOR, F0_CEIL = 60.0, 500.0
FRAME_MS = 10.0
TRIES = 4  # generations per output at most while the guard is on: the first and three more


def median_log_f0(wav: Tensor | np.ndarray, sample_rate: int) -> float:
    """Median natural-log F0 (Hz) over voiced frames; NaN when nothing is voiced (silence, noise, a whisper)."""
    x = wav.detach().cpu().numpy() if isinstance(wav, Tensor) else np.asarray(wav)
    x = np.ascontiguousarray(x.reshape(-1), dtype=np.float64)
    if x.size < sample_rate * FRAME_MS / 1000 * 3 or not np.isfinite(x).all():
        return math.nan
    pw = import_pyworld()
    f0, t = pw.dio(x, sample_rate, f0_floor=F0_FLOOR, f0_ceil=F0_CEIL, frame_period=FRAME_MS)
    f0 = pw.stonemask(x, f0, t, sample_rate)
    voiced = f0[f0 > 0]
    return float(np.median(np.log(voiced))) if voiced.size else math.nan


def semitones_apart(log_f0: float, reference_log_f0: float) -> float:
    """Distance in semitones between two median log-F0s; inf when the output has no voiced frame but
    the reference has (nothing of the voice is left); NaN when the reference has none (no register to
    keep, so the guard does not apply)."""
    if math.isnan(reference_log_f0):
        return math.nan
    if math.isnan(log_f0):
        return math.inf
    return abs(log_f0 - reference_log_f0) * 12.0 / math.log(2.0)

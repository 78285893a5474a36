"""The pitch guard: median pitch, the semitone distance, and `TTS.generate_codes` sampling again only
the outputs that left their prompt's register (keeping the closest try, reproducibly)."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.test_inference import reference, tts  # noqa: F401  (the engine tests' fixtures: a tiny model, a voice)
from vall_e.generation.pitch import TRIES, median_log_f0, semitones_apart
from vall_e.utils.errors import UserError

SR = 24_000


def _pulses(f0: float, seconds: float = 1.0) -> np.ndarray:
    """A glottal-like pulse train at `f0` Hz, lightly low-passed: something DIO calls voiced."""
    n = int(SR * seconds)
    x = np.zeros(n)
    x[(np.arange(0, seconds, 1.0 / f0) * SR).astype(int)] = 1.0
    kernel = np.exp(-np.arange(200) / 30.0) * np.sin(2 * np.pi * 700 * np.arange(200) / SR)
    return 0.3 * np.convolve(x, kernel)[:n] / np.abs(kernel).sum()


@pytest.mark.parametrize("f0", [100.0, 220.0])
def test_median_pitch_of_a_pulse_train(f0):
    assert math.exp(median_log_f0(_pulses(f0), SR)) == pytest.approx(f0, rel=0.03)


def test_no_pitch_in_silence_or_a_few_samples():
    assert math.isnan(median_log_f0(np.zeros(SR), SR))
    assert math.isnan(median_log_f0(np.zeros(10), SR))


def test_semitones():
    assert semitones_apart(math.log(200.0), math.log(100.0)) == pytest.approx(12.0)
    assert semitones_apart(math.log(100.0), math.log(200.0)) == pytest.approx(12.0)
    assert math.isinf(semitones_apart(math.nan, math.log(100.0)))  # the voice is gone: retry
    assert math.isnan(semitones_apart(math.log(100.0), math.nan))  # no register to keep: the guard is off


def test_negative_guard_is_a_settings_error():
    from vall_e.generation.settings import settings_from

    with pytest.raises(UserError, match="pitch_guard"):
        settings_from({"pitch_guard": -1.0})


def _settings(guard: float, seed: int | None = 5):
    from vall_e.generation.sampling import SamplingParams
    from vall_e.generation.settings import GenerationSettings

    return GenerationSettings(ar=replace(SamplingParams.ar_defaults(), seed=seed, temperature=1.0),
                              nar=replace(SamplingParams.nar_defaults(), seed=seed), max_ar_steps=40,
                              split_sentences=False, pitch_guard=guard)


TEXTS = ["Hello there.", "The quick brown fox.", "Good morning."]


def _scripted(tts, monkeypatch, script):
    """Replace the pitch measurement by a script: call n returns script[n] for the indices asked."""
    calls = []

    def fake(codes, prompts, indices, refs=None):
        calls.append(list(indices))
        return {i: script[len(calls) - 1][k] for k, i in enumerate(indices)}

    monkeypatch.setattr(tts, "_pitch_distances", fake)
    return calls


def test_only_far_outputs_are_sampled_again_and_a_closer_try_replaces_them(tts, reference, monkeypatch):
    prompt = tts.encode_reference(str(reference), 1.0)
    plain = tts.generate_codes(TEXTS, [prompt] * 3, _settings(0.0))
    calls = _scripted(tts, monkeypatch, [[1.0, 9.0, math.nan], [2.0]])
    guarded = tts.generate_codes(TEXTS, [prompt] * 3, _settings(4.0))
    assert calls == [[0, 1, 2], [0]]  # item 1 (9 semitones) sampled again once; NaN (no register) never
    assert torch.equal(guarded[0], plain[0]) and torch.equal(guarded[2], plain[2])
    assert not torch.equal(guarded[1], plain[1])  # the retry (another seed) replaced it


def test_the_closest_try_is_kept_when_none_passes(tts, reference, monkeypatch):
    prompt = tts.encode_reference(str(reference), 1.0)
    s = _settings(4.0)
    runs = []
    for script in ([[9.0], [8.0], [5.0], [7.0]],  # try 3 (5 semitones) is the closest
                   [[9.0], [8.0], [6.0], [5.0]]):  # try 4 is
        calls = _scripted(tts, monkeypatch, script)
        runs.append(tts.generate_codes(TEXTS[:1], [prompt], s)[0])
        assert len(calls) == TRIES
    monkeypatch.undo()
    # what each try samples on its own: the seeds a retry uses
    from vall_e.generation.tts import RETRY_SEED_STRIDE

    tries = [tts.generate_codes(TEXTS[:1], [prompt], replace(s, pitch_guard=0.0, ar=replace(
        s.ar, seed=s.ar.seed + k * RETRY_SEED_STRIDE)))[0] for k in range(TRIES)]
    assert torch.equal(runs[0], tries[2]) and torch.equal(runs[1], tries[3])


def test_guard_off_measures_nothing(tts, reference, monkeypatch):
    prompt = tts.encode_reference(str(reference), 1.0)
    calls = _scripted(tts, monkeypatch, [])
    tts.generate_codes(TEXTS[:1], [prompt], _settings(0.0))
    assert calls == []


def test_guard_runs_on_real_audio_and_is_reproducible(tts, reference):
    """Through the codec and the pitch estimator (no script): the same seed gives the same codes."""
    prompt = tts.encode_reference(str(reference), 1.0)
    a = tts.generate_codes(TEXTS, [prompt] * 3, _settings(0.5))
    b = tts.generate_codes(TEXTS, [prompt] * 3, _settings(0.5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert [x.shape[1] for x in a] == [tts.n_levels] * 3
    d = tts._pitch_distances(a, [prompt] * 3, [0, 1, 2])
    assert set(d) == {0, 1, 2} and all(math.isnan(v) or v >= 0 for v in d.values())

"""The generated espeak-ng speech corpus: layout, durations, distinct speakers, determinism."""
from __future__ import annotations

import random

import numpy as np
import pytest
import soundfile as sf

from vall_e.data.synthetic import (
    VOICES,
    Voice,
    generate_corpus,
    main,
    make_sentence,
    make_sentences,
    native_sample_rate,
    speakers,
    synthesize,
)
from vall_e.errors import UserError, run_main
from vall_e.text import phonemize


def median_f0(wav: np.ndarray, sr: int) -> float:
    """Median F0 of clearly voiced 40 ms frames, by autocorrelation (60-400 Hz)."""
    frame, hop = int(0.04 * sr), int(0.01 * sr)
    lo, hi = int(sr / 400), int(sr / 60)
    f0s = []
    for s in range(0, len(wav) - frame, hop):
        x = wav[s:s + frame] - wav[s:s + frame].mean()
        if np.sqrt((x ** 2).mean()) < 0.02:
            continue
        ac = np.correlate(x, x, "full")[frame - 1:]
        k = lo + int(np.argmax(ac[lo:hi]))
        if ac[k] > 0.5 * ac[0]:
            f0s.append(sr / k)
    assert len(f0s) > 10
    return float(np.median(f0s))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    paths = generate_corpus(out, n_speakers=2, n_utterances=3, seed=0, progress=False)
    return out, paths


def test_layout_and_durations(corpus):
    out, paths = corpus
    assert len(paths) == 6
    for p in paths:
        assert p.parent.parent == out / "synth"
        assert p.is_file() and p.with_suffix(".txt").is_file()
        wav, sr = sf.read(p, dtype="float32")
        assert sr == 24000 and wav.ndim == 1
        assert 1.0 <= len(wav) / sr <= 6.0
        assert 0.1 < np.abs(wav).max() <= 1.0
        words = p.with_suffix(".txt").read_text(encoding="utf-8").split()
        assert 4 <= len(words) <= 12
    assert sorted({p.parent.name for p in paths}) == sorted(v.name for v in VOICES[:2])
    assert not [p for p in (out / "synth").rglob(".*")]  # no temporary files left


def test_speakers_differ(corpus):
    _, paths = corpus
    f0 = {}
    for p in paths:
        wav, sr = sf.read(p, dtype="float32")
        f0.setdefault(p.parent.name, []).append(median_f0(wav, sr))
    male, female = np.median(f0[VOICES[0].name]), np.median(f0[VOICES[1].name])
    assert 70 < male < 140 and 150 < female < 300 and female > 1.5 * male


def test_deterministic_and_resumes(tmp_path, corpus):
    out, paths = corpus
    again = generate_corpus(tmp_path, n_speakers=2, n_utterances=3, seed=0, progress=False)
    for a, b in zip(paths, again):
        assert a.read_bytes() == b.read_bytes()
        assert a.with_suffix(".txt").read_text() == b.with_suffix(".txt").read_text()
    other = generate_corpus(tmp_path / "s1", n_speakers=2, n_utterances=3, seed=1, progress=False)
    assert [p.with_suffix(".txt").read_text() for p in other] != [p.with_suffix(".txt").read_text() for p in again]
    # existing utterances are skipped, missing ones are (re)made identically
    again[0].with_suffix(".txt").write_text("SENTINEL", encoding="utf-8")
    again[1].unlink()
    generate_corpus(tmp_path, n_speakers=2, n_utterances=3, seed=0, progress=False)
    assert again[0].with_suffix(".txt").read_text() == "SENTINEL"
    assert again[1].read_bytes() == paths[1].read_bytes()


def test_synthesize_and_phonemizer_in_one_process():
    first = synthesize("The quick brown fox.", VOICES[1], 24000)
    tokens = phonemize("The quick brown fox.")
    second = synthesize("The quick brown fox.", VOICES[1], 24000)
    assert tokens == phonemize("The quick brown fox.")
    assert first.dtype == np.float32 and np.array_equal(first, second)
    assert native_sample_rate() == 22050
    native = synthesize("The quick brown fox.", "en-us", 22050)
    assert abs(len(native) / 22050 - len(synthesize("The quick brown fox.", "en-us", 16000)) / 16000) < 0.01


def test_synthesize_errors():
    with pytest.raises(UserError, match="variant 'zz'"):
        synthesize("hi", "en-us+zz")
    with pytest.raises(UserError, match="voice 'qq'"):
        synthesize("hi", Voice("x", "qq"))
    with pytest.raises(UserError, match="non-empty"):
        synthesize("  ", "en-us")
    with pytest.raises(UserError, match="English"):
        generate_corpus("unused", language="de")
    with pytest.raises(UserError):
        speakers(0)


def test_sentences_and_speaker_table():
    assert make_sentences(5, seed=3) == make_sentences(5, seed=3) != make_sentences(5, seed=4)
    rng = random.Random(0)
    for _ in range(300):
        s = make_sentence(rng)
        assert 4 <= len(s.split()) <= 12 and s[0].isupper() and s[-1] in ".?"
    many = speakers(20)
    assert len({v.name for v in many}) == 20
    assert len({(v.espeak, v.rate, v.pitch, v.range) for v in many}) == 20


def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(main, [str(tmp_path), "--speakers", "1", "--utterances", "2", "--seed", "5", "--quiet"])
    assert e.value.code == 0
    assert len(list((tmp_path / "synth" / VOICES[0].name).glob("*.wav"))) == 2
    with pytest.raises(SystemExit) as e:
        run_main(main, [str(tmp_path), "--utterances", "0"])
    assert e.value.code == 2 and "at least 1" in capsys.readouterr().err

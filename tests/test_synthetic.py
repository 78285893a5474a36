"""The generated espeak-ng speech corpus: layout, durations, distinct speakers, determinism, languages."""
from __future__ import annotations

import hashlib
import random
import re

import numpy as np
import pytest
import soundfile as sf

from vall_e.data.synthetic import (
    LANGUAGE_VOICES,
    LANGUAGES,
    VOICES,
    Voice,
    corpus_languages,
    generate_corpus,
    main,
    make_sentence,
    make_sentences,
    native_sample_rate,
    speakers,
    synthesize,
)
from vall_e.text import phonemize
from vall_e.utils.errors import UserError, run_main


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
    with pytest.raises(UserError, match="unsupported language 'it'"):
        generate_corpus("unused", language="it")
    with pytest.raises(UserError, match="unsupported language 'it'"):
        generate_corpus("unused", n_speakers=4, language="en,de,it")
    with pytest.raises(UserError, match="more than once"):
        generate_corpus("unused", language="en,en-US")
    with pytest.raises(UserError, match="at least one speaker per language"):
        generate_corpus("unused", n_speakers=3, language="en,de,fr,es")
    with pytest.raises(UserError, match="at least one"):
        generate_corpus("unused", language="")
    with pytest.raises(UserError, match="at least one"):
        generate_corpus("unused", language=[])
    with pytest.raises(UserError, match="at least 1"):
        generate_corpus("unused", n_speakers=0, language="de")
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


# ---------------------------------------------------------------------------------------------
# English stays as it was; other languages


# sha256 of the English sentences and speaker table as they were before other languages existed
EN_SENTENCES_SHA = "4ee89cad9b44a60eb50cd36314002d2fe0fb478ec42fe44451827d40cd12c112"
EN_MAKE_SENTENCES_SHA = "79abf68a1f08796e8881b96d6db6c1fc4e4e9a749fe88f1841ef7cdc1be7a6b7"
EN_SPEAKERS_SHA = "9810c86d18c065ebda7687f3d763900a9f01bec185e3b76ba069eb2dbc1527ad"


def test_english_unchanged():
    h = hashlib.sha256()
    for seed in range(3):
        for k in range(10):
            for i in range(30):  # the per-utterance seeds generate_corpus uses for English
                h.update((make_sentence(random.Random(f"{seed}:{k}:{i}")) + "\n").encode())
    assert h.hexdigest() == EN_SENTENCES_SHA
    assert hashlib.sha256("\n".join(make_sentences(200, seed=7)).encode()).hexdigest() == EN_MAKE_SENTENCES_SHA
    assert make_sentences(200, seed=7, language="en-US") == make_sentences(200, seed=7)
    assert hashlib.sha256(repr(speakers(20)).encode()).hexdigest() == EN_SPEAKERS_SHA
    assert speakers(20, "en") == speakers(20)
    assert [v.name for v in VOICES[:4]] == ["us_m1", "us_f2", "gb_m3", "rp_f4"]


# words that only one language's generator uses (en: determiners; others: articles, request words)
MARKERS = {
    "en": {"the", "did", "please", "our", "this", "that"},
    "de": {"der", "die", "das", "den", "ein", "eine", "einen", "bitte", "im", "dieser", "diese"},
    "fr": {"le", "une", "est-ce", "mon", "ma", "ce", "cette", "notre", "dans"},
    "es": {"el", "una", "mi", "este", "esta", "por", "al", "del", "nuestro", "nuestra"},
}


def words_of(text: str) -> set[str]:
    return {w.strip(".,?¿").lower() for w in text.split()}


@pytest.mark.parametrize("lang", ["de", "fr", "es"])
def test_sentences_in_language(lang):
    assert make_sentences(5, 3, lang) == make_sentences(5, 3, lang) != make_sentences(5, 4, lang)
    many = make_sentences(300, 0, lang)
    assert len(set(many)) > 250
    others = set().union(*(m for k, m in MARKERS.items() if k != lang))
    marked = 0
    for s in many:
        words = s.split()
        assert 4 <= len(words) <= 12 and s[-1] in ".?", s
        assert re.sub(r"^¿", "", s)[0].isupper(), s
        assert not words_of(s) & others, s
        marked += bool(words_of(s) & MARKERS[lang])
        if lang == "es":
            assert s.startswith("¿") == s.endswith("?"), s
    assert marked > 0.8 * len(many)
    assert set(many).isdisjoint(make_sentences(300, 0, "en"))


def test_language_codes_and_tables():
    assert LANGUAGES == ("en", "de", "fr", "es")
    assert corpus_languages("en,de , fr-FR,es") == ["en", "de", "fr", "es"]
    assert corpus_languages(["de", "en_us"]) == ["de", "en"]
    names = [v.name for lang in LANGUAGES for v in speakers(20, lang)]
    assert len(set(names)) == len(names) == 80
    for lang in ("de", "fr", "es"):
        many = speakers(20, lang)
        assert len({(v.espeak, v.rate, v.pitch, v.range) for v in many}) == 20
    for lang, table in LANGUAGE_VOICES.items():  # every espeak voice and variant of the tables exists
        for v in table:
            assert synthesize("eins zwei", v).size > 2400, v


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    out = tmp_path_factory.mktemp("multi")
    paths = generate_corpus(out, n_speakers=8, n_utterances=2, seed=0, language="en,de,fr,es", progress=False)
    return out, paths


def test_multi_language_layout(multi, corpus):
    out, paths = multi
    assert len(paths) == 16
    assert sorted(p.name for p in out.iterdir()) == ["de", "en", "es", "fr"]
    for lang in LANGUAGES:
        expected = [v.name for v in LANGUAGE_VOICES[lang][:2]]
        assert sorted(p.name for p in (out / lang).iterdir()) == sorted(expected)
    assert {p.parent.parent.name for p in paths} == set(LANGUAGES)
    assert not [p for p in out.rglob(".*")]
    # the English group is the English-only corpus of the same seed, byte for byte
    en_out, _ = corpus
    for p in (out / "en").rglob("*.*"):
        assert p.read_bytes() == (en_out / "synth" / p.parent.name / p.name).read_bytes()


def test_multi_language_audio_and_phonemes(multi):
    _, paths = multi
    f0: dict[str, list[float]] = {}
    for p in paths:
        lang = p.parent.parent.name
        wav, sr = sf.read(p, dtype="float32")
        assert sr == 24000 and 1.0 <= len(wav) / sr <= 6.5 and 0.1 < np.abs(wav).max() <= 1.0
        text = p.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert 4 <= len(text.split()) <= 12 and not words_of(text) & set().union(
            *(m for k, m in MARKERS.items() if k != lang)), text
        tokens = phonemize(text, lang)
        assert len(tokens) > 10
        if lang != "en":
            assert tokens != phonemize(text, "en")
        f0.setdefault(lang, []).append(median_f0(wav, sr))
    for lang, values in f0.items():  # first speaker is male (+m1), second female (+f2)
        male, female = np.median(values[:2]), np.median(values[2:])
        assert female > 1.4 * male, (lang, male, female)


def test_one_other_language_and_determinism(tmp_path, multi):
    out, _ = multi
    paths = generate_corpus(tmp_path, n_speakers=1, n_utterances=2, seed=0, language="de", progress=False)
    assert [p.relative_to(tmp_path).parts[:2] for p in paths] == [("synth", "de_m1")] * 2
    for p in paths:  # same seed: the same sentences and audio as the German group of the mixed corpus
        assert p.read_bytes() == (out / "de" / "de_m1" / p.name).read_bytes()
        assert p.with_suffix(".txt").read_text() == (out / "de" / "de_m1" / p.with_suffix(".txt").name).read_text()
    other = generate_corpus(tmp_path / "s1", n_speakers=1, n_utterances=2, seed=1, language="de", progress=False)
    assert [p.with_suffix(".txt").read_text() for p in other] != [p.with_suffix(".txt").read_text() for p in paths]


def test_cli_languages(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(main, [str(tmp_path), "--speakers", "2", "--utterances", "1", "--language", "fr,es", "--quiet"])
    assert e.value.code == 0
    assert [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob("*.wav"))] == [
        "es/es_m1/es_m1_0000.wav", "fr/fr_m1/fr_m1_0000.wav"]
    assert "speaker_languages: {fr: [fr], es: [es]}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        run_main(main, [str(tmp_path), "--language", "xx"])
    assert e.value.code == 2 and "unsupported language 'xx'" in capsys.readouterr().err

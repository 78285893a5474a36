"""Objective metrics (`vall_e.evaluation.metrics`) and the `python -m vall_e.eval` command.

Known pairs of espeak-ng speech (made offline by `vall_e.data.synthetic`): a clip against itself,
the same sentence by the same voice at another speaking rate, a different sentence, a different
voice. The command runs on a tiny untrained exported model and in `--wavs` mode.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from vall_e.evaluation import metrics as M
from vall_e.utils.errors import UserError, run_main

torch.set_num_threads(1)

SR = 24_000
S1 = "The teacher found a small green book in the garden."
S2 = "Peter walked slowly near the river after dinner."
HAS_POCKETSPHINX = importlib.util.find_spec("pocketsphinx") is not None
HAS_RESEMBLYZER = all(importlib.util.find_spec(m) is not None for m in ("resemblyzer", "librosa", "webrtcvad"))


@pytest.fixture(scope="module")
def clips() -> dict[str, np.ndarray]:
    from vall_e.data.synthetic import Voice, synthesize

    return {
        "a": synthesize(S1, "en-us"),  # the reference
        "slow": synthesize(S1, Voice("slow", "en-us", rate=140)),  # same words and voice, slower
        "other": synthesize(S2, "en-us"),  # same voice, different sentence
        "female": synthesize(S1, "en-us+f2"),  # same sentence, different voice
        "female2": synthesize(S2, "en-us+f2"),
    }


@pytest.fixture(scope="module")
def ana(clips) -> dict[str, M.Analysis]:
    return {k: M.analyse(v, SR) for k, v in clips.items()}


# ---------------------------------------------------------------------------------------------
# signal metrics


@pytest.mark.parametrize("alpha", [0.0, 0.455])
def test_sp2mc_recovers_a_known_mel_cepstrum(alpha):
    """A spectrum built from a mel-cepstrum (log|H| = sum c_m cos(m * warped w)) gives it back."""
    rng = np.random.default_rng(0)
    mc = rng.normal(size=(3, 25)) * 0.5 ** np.arange(25)
    w = np.linspace(0, np.pi, 1025)
    warped = w + 2 * np.arctan(alpha * np.sin(w) / (1 - alpha * np.cos(w)))
    sp = np.exp(2 * mc @ np.cos(np.outer(np.arange(25), warped)))  # power spectrum
    assert np.abs(M.sp2mc(sp, 24, alpha) - mc).max() < 1e-9
    assert M.mel_cepstrum(np.zeros(10), SR).shape[1] == 25  # too short and silent: still frames, no crash


def test_mcd_dtw_tells_same_words_from_different_words(ana):
    a = ana["a"]
    assert M.mcd(a, a) == 0.0 and M.mcd_dtw(a, a) < 1e-9
    same, other = M.mcd_dtw(a, ana["slow"]), M.mcd_dtw(a, ana["other"])
    print(f"\nMCD-DTW: self 0, same sentence slower {same:.2f} dB, different sentence {other:.2f} dB; "
          f"frame-aligned MCD to the slower rendering {M.mcd(a, ana['slow']):.2f} dB")
    # the prototype: same words (rate changes) <= 7.9 dB, a different sentence of the same voice >= 9.3 dB
    assert 0.5 < same < 8.0 and other > 9.0
    assert M.mcd(a, ana["slow"]) > same + 3  # without alignment the timing change dominates
    assert abs(M.mcd_dtw(ana["slow"], a) - same) < 0.5  # (nearly) symmetric


def test_duration_ratio(clips, ana):
    a = ana["a"]
    assert M.duration_ratio(a, a) == 1.0
    r = M.duration_ratio(ana["slow"], a)
    print(f"\nduration ratio at 140 vs 175 words per minute: {r:.3f}")
    assert 1.1 < r < 1.4  # 175 / 140 = 1.25
    padded = np.concatenate([np.zeros(SR, np.float32), clips["a"], np.zeros(SR // 2, np.float32)])
    assert abs(M.duration_ratio(M.analyse(padded, SR), a) - 1.0) < 0.03  # silence around speech is not counted
    assert M.duration_ratio(3.0, 2.0) == 1.5 and math.isnan(M.duration_ratio(1.0, 0.0))


def test_f0_rmse(ana):
    a = ana["a"]
    assert tuple(M.f0_rmse(a, a)) == (0.0, 0.0) and M.vuv_error(a, a) == 0.0
    same, other_voice = M.f0_rmse(a, ana["slow"]), M.f0_rmse(a, ana["female"])
    print(f"\nF0 RMSE: same voice slower {same.cents:.0f} cents ({same.hz:.1f} Hz), "
          f"different voice {other_voice.cents:.0f} cents ({other_voice.hz:.1f} Hz)")
    assert same.cents < 150 and other_voice.cents > 400 and other_voice.hz > 4 * same.hz
    unvoiced = M.Analysis(f0=np.zeros_like(a.f0), mc=a.mc, speech=a.speech, seconds=a.seconds)
    assert all(math.isnan(v) for v in M.f0_rmse(a, unvoiced))


# ---------------------------------------------------------------------------------------------
# text metrics


def test_wer_cer_exact():
    assert M.normalize_text("  Hello, World! \"Don't\" stop-it ") == "hello world don't stop it"
    assert M.wer("the cat sat on the mat", "the cat sat on the mat") == 0.0
    assert M.wer("the cat sat on the mat", "The bat sat on mat.") == pytest.approx(2 / 6)  # 1 sub + 1 del
    assert M.wer("a b", "a x b y") == 1.0  # 2 insertions over 2 words
    assert M.wer("hello world", "") == 1.0
    assert M.wer("don't", "dont") == 1.0
    assert M.cer("abcd", "abxd") == 0.25 and M.cer("ab cd", "abcd") == pytest.approx(1 / 5)
    assert M.edit_distance("kitten", "sitting") == 3 and M.edit_distance([], [1, 2]) == 2
    with pytest.raises(ValueError):
        M.wer("...", "x")


@pytest.mark.skipif(not HAS_POCKETSPHINX, reason="pocketsphinx is not installed (pip install pocketsphinx)")
def test_pocketsphinx_transcribes_espeak_speech(clips):
    rec, why = M.recognizer_for("pocketsphinx")
    assert rec is not None, why
    hyp = M.transcribe(clips["a"], SR, rec)
    w = M.wer(S1, hyp)
    print(f"\npocketsphinx on espeak en-us: {hyp!r}  WER {w:.2f}  CER {M.cer(S1, hyp):.2f}")
    assert isinstance(hyp, str) and 0.0 <= w < math.inf


@pytest.mark.skipif(not HAS_RESEMBLYZER, reason="resemblyzer (with librosa, webrtcvad) is not installed")
def test_speaker_similarity_same_voice_above_different_voice(clips):
    enc, why = M.speaker_encoder_for("resemblyzer")
    assert enc is not None, why
    same_voice = M.speaker_similarity(clips["a"], clips["other"], SR, enc)  # different words, same voice
    other_voice = M.speaker_similarity(clips["a"], clips["female"], SR, enc)  # same words, other voice
    other_voice2 = M.speaker_similarity(clips["other"], clips["female2"], SR, enc)
    print(f"\nresemblyzer cosine: same voice {same_voice:.3f}, different voice {other_voice:.3f} / {other_voice2:.3f}")
    assert M.speaker_similarity(clips["a"], clips["a"], SR, enc) == pytest.approx(1.0, abs=1e-5)
    assert same_voice > other_voice + 0.05 and same_voice > other_voice2 + 0.05
    assert M.speaker_similarity(clips["a"], np.zeros(SR, np.float32), SR, enc) is None  # silence: no speaker


@pytest.fixture
def fresh_caches():
    M.recognizer_for.cache_clear()
    M.speaker_encoder_for.cache_clear()
    yield
    M.recognizer_for.cache_clear()
    M.speaker_encoder_for.cache_clear()


def test_missing_packages_give_none_with_a_reason(monkeypatch, fresh_caches, clips, tmp_path):
    for name in ("resemblyzer", "pocketsphinx", "whisper"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail
    enc, why = M.speaker_encoder_for("auto")
    assert enc is None and "resemblyzer is not installed" in why
    rec, why = M.recognizer_for("auto")
    assert rec is None and "pocketsphinx is not installed" in why and "openai-whisper" in why
    assert M.speaker_similarity(clips["a"], clips["a"], SR) is None
    assert M.transcribe(clips["a"], SR) is None
    assert M.recognizer_for("none") == (None, "speech recognition turned off (--asr none)")
    with pytest.raises(ValueError, match="unknown recognizer"):
        M.recognizer_for("vosk")


def test_whisper_is_used_only_from_a_cached_checkpoint(monkeypatch, fresh_caches, tmp_path):
    loaded = []

    class Model:
        def transcribe(self, audio, **kw):
            assert audio.dtype == np.float32 and kw["language"] == "en"
            return {"text": " Hello there. "}

    fake = types.ModuleType("whisper")
    fake._MODELS = {"base.en": "https://example.invalid/abc/base.en.pt", "tiny": "https://example.invalid/t/tiny.pt"}
    fake.load_model = lambda name, device="cpu": loaded.append(name) or Model()
    monkeypatch.setitem(sys.modules, "whisper", fake)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "pocketsphinx", None)
    rec, why = M.recognizer_for("whisper")
    assert rec is None and "cached" in why and loaded == []  # never asks whisper to download
    ckpt = tmp_path / "whisper" / "base.en.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    M.recognizer_for.cache_clear()
    rec, why = M.recognizer_for("auto")
    assert why is None and loaded == [str(ckpt)] and "whisper base.en" in rec.name
    assert M.transcribe(np.zeros(SR, np.float32), SR, rec) == "Hello there."
    M.recognizer_for.cache_clear()
    assert M.recognizer_for("whisper:tiny")[0] is None  # that one is not cached


# ---------------------------------------------------------------------------------------------
# evaluate_items and the command


class _FakeRecognizer:
    name = "fake"

    def __init__(self, text: str) -> None:
        self.text = text

    def __call__(self, wav16k: np.ndarray) -> str:
        assert wav16k.dtype == np.float32
        return self.text


def test_evaluate_items_in_memory(clips, tmp_path):
    from vall_e.evaluation.evaluate import EvalItem, evaluate_items, format_table, write_report
    from vall_e.utils.audio import save_audio

    ref = save_audio(tmp_path / "ref.wav", clips["a"], SR)
    items = [EvalItem("good", S1, prompt=None, reference=ref), EvalItem("wrong", S1, reference=ref),
             {"id": "noref", "text": S1}]
    audio = {"good": (clips["slow"], SR), "wrong": (torch.from_numpy(clips["other"]), SR),
             "noref": (np.zeros(100, np.float32), SR)}
    rep = evaluate_items(items, audio, asr=_FakeRecognizer("the teacher found a small book in garden"),
                         speaker_encoder="none", progress=False, info={"mode": "test"})
    good, wrong, noref = rep["items"]
    assert good["mcd_dtw"] < 8 < wrong["mcd_dtw"] and 1.1 < good["duration_ratio"] < 1.4
    assert good["wer"] == pytest.approx(2 / 10) and good["transcript"].startswith("the teacher")
    assert noref["mcd_dtw"] is None and noref["transcript"] == "" and noref["wer"] == 1.0  # silent output
    assert any("silent" in n for n in noref["notes"])
    assert rep["counts"]["mcd_dtw"] == 2 and rep["means"]["mcd_dtw"] == pytest.approx(
        (good["mcd_dtw"] + wrong["mcd_dtw"]) / 2)
    assert rep["means"]["wer"] == pytest.approx((0.2 + 0.2 + 1.0) / 3)
    assert "turned off" in rep["unavailable"]["speaker_similarity"] and "wer" not in rep["unavailable"]
    assert rep["mode"] == "test" and rep["recognizer"] == "fake"
    table = format_table(rep)
    print("\n" + table)
    assert "MCD-DTW" in table and "mean" in table and "SIM" not in table.splitlines()[0]
    out = write_report(tmp_path / "r.json", rep)
    json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    with pytest.raises(UserError, match="no audio for item"):
        evaluate_items(items, {"good": audio["good"]}, asr="none", speaker_encoder="none", progress=False)


TEXTS = ["Hello there, how are you?", "The quick brown fox jumps over the lazy dog.", "Good morning."]


@pytest.fixture(scope="module")
def listing(tmp_path_factory) -> Path:
    """A JSONL list with relative audio paths: espeak prompts and references of the texts."""
    from vall_e.data.synthetic import synthesize
    from vall_e.utils.audio import save_audio

    root = tmp_path_factory.mktemp("list")
    save_audio(root / "voice.wav", synthesize("Susan bought a red coat at the market.", "en-us"), SR)
    rows = []
    for i, t in enumerate(TEXTS[:2]):
        save_audio(root / f"ref{i}.wav", synthesize(t, "en-us"), SR)
        rows.append({"id": f"utt{i}", "text": t, "prompt": "voice.wav", "reference": f"ref{i}.wav"})
    (root / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "items.jsonl"


def _strict_json(path: Path) -> dict:
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_cli_model_and_wavs_modes(model_file, listing, tmp_path, capsys):
    from vall_e.evaluation.evaluate import main

    out, wavs = tmp_path / "report.json", tmp_path / "wavs"
    assert main(["--model", str(model_file), "--list", str(listing), "--out", str(out), "--save-wavs", str(wavs),
                 "--max-ar-steps", "20", "--asr", "none", "--speaker-encoder", "none", "--seed", "3",
                 "--no-progress"]) == 0
    table = capsys.readouterr().out
    print(table)
    rep = _strict_json(out)
    assert rep["mode"] == "model" and rep["n_items"] == 2 and rep["settings"]["ar"]["seed"] == 3
    assert rep["settings"]["max_ar_steps"] == 20
    assert [r["id"] for r in rep["items"]] == ["utt0", "utt1"]
    for r in rep["items"]:
        assert 0 < r["seconds"] <= 20 * 320 / SR + 1e-3  # the step cap (seconds are rounded to ms)
        assert r["mcd_dtw"] is None or r["mcd_dtw"] > 0  # an untrained model: far from the reference
    assert set(rep["unavailable"]) >= {"speaker_similarity", "wer", "cer"}
    assert "MCD-DTW" in table and "utt0" in table and "not measured: wer" in table and str(out) in table
    # the saved wavs evaluate to the same numbers in --wavs mode
    out2 = tmp_path / "report2.json"
    assert main(["--wavs", str(wavs), "--list", str(listing), "--out", str(out2), "--asr", "none",
                 "--speaker-encoder", "none", "--no-progress"]) == 0
    rep2 = _strict_json(out2)
    assert rep2["mode"] == "wavs"
    for a, b in zip(rep["items"], rep2["items"]):
        assert a["seconds"] == b["seconds"]
        if a["mcd_dtw"] is not None:
            assert b["mcd_dtw"] == pytest.approx(a["mcd_dtw"], abs=0.3)  # 16-bit files vs float audio


def test_cli_wavs_mode_tsv_all_metrics(clips, tmp_path, capsys):
    """A TSV list in --wavs mode with whatever recognizer and speaker encoder are installed."""
    from vall_e.evaluation.evaluate import main
    from vall_e.utils.audio import save_audio

    save_audio(tmp_path / "prompt.wav", clips["other"], SR)
    save_audio(tmp_path / "ref.wav", clips["a"], SR)
    (tmp_path / "out").mkdir()
    save_audio(tmp_path / "out" / "x1.wav", clips["slow"], SR)
    (tmp_path / "l.tsv").write_text(f"id\ttext\tprompt\treference\nx1\t{S1}\tprompt.wav\tref.wav\n")
    assert main(["--wavs", str(tmp_path / "out"), "--list", str(tmp_path / "l.tsv"), "--out",
                 str(tmp_path / "r.json"), "--score-references", "--no-progress"]) == 0
    print(capsys.readouterr().out)
    rep = _strict_json(tmp_path / "r.json")
    (row,) = rep["items"]
    assert row["mcd_dtw"] < 8 and row["f0_rmse_cents"] < 150
    if HAS_POCKETSPHINX:
        assert rep["recognizer"].startswith("pocketsphinx") and row["wer"] >= 0 and row["reference_wer"] >= 0
    else:
        assert row["wer"] is None and "pocketsphinx" in rep["unavailable"]["wer"]
    if HAS_RESEMBLYZER:
        assert 0.5 < row["speaker_similarity"] <= 1.0
    else:
        assert "resemblyzer" in rep["unavailable"]["speaker_similarity"]


def _error_line(capsys, argv) -> str:
    from vall_e.evaluation.evaluate import main

    with pytest.raises(SystemExit) as e:
        run_main(main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_lists_are_one_line_errors(listing, tmp_path, capsys):
    d = tmp_path
    common = ["--wavs", str(d), "--asr", "none", "--speaker-encoder", "none", "--out", str(d / "r.json")]
    cases = {
        "nocol.jsonl": ('{"prompt": "p.wav"}\n', "missing or empty 'text'"),
        "latin1.tsv": ("text\tprompt\ncaf\xe9\tp.wav\n".encode("latin-1"), "not UTF-8"),
        "badjson.jsonl": ('{"text": "hi"\n', "not a JSON object"),
        "noheader.tsv": ("hello there\tp.wav\n", "header row"),
        "dup.jsonl": ('{"id": "a", "text": "hi"}\n{"id": "a", "text": "yo"}\n', "appears twice"),
        "extra.jsonl": ('{"text": "hi", "voice": "x"}\n', "unknown column"),
        "noaudio.jsonl": ('{"text": "hi", "reference": "nowhere.wav"}\n', "nowhere.wav not found"),
        "empty.tsv": ("", "empty"),
    }
    for name, (content, msg) in cases.items():
        p = d / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        err = _error_line(capsys, ["--list", str(p), *common])
        assert msg in err and name in err, (name, err)
    (d / "corrupt.wav").write_bytes(b"RIFF1234WAVEjunk")
    (d / "corrupt.jsonl").write_text('{"text": "hi", "reference": "corrupt.wav"}\n')
    assert "corrupt.wav" in _error_line(capsys, ["--list", str(d / "corrupt.jsonl"), *common])
    # model mode needs a prompt for every item
    (d / "noprompt.jsonl").write_text('{"text": "hi"}\n')
    assert "no 'prompt'" in _error_line(capsys, ["--list", str(d / "noprompt.jsonl"), "--model", "m.safetensors"])
    # --wavs mode: a missing {id}.wav, a missing folder, a bad recognizer name
    assert "no utt0.wav" in _error_line(capsys, ["--list", str(listing), *common])
    assert "not found" in _error_line(capsys, ["--list", str(listing), "--wavs", str(d / "nope")])
    assert "--asr 'vosk'" in _error_line(capsys, ["--list", str(listing), "--wavs", str(d), "--asr", "vosk"])
    assert not (d / "r.json").exists()  # nothing half-written

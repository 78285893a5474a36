"""`python -m vall_e.emb.transcribe`: long recordings -> utterances cut at pauses + Whisper transcripts.

A tiny randomly initialised Whisper and its tokenizer are built here and saved with `save_pretrained`,
then loaded by the command through `--model DIR`, the path a hub id takes. Its text is noise, so the
checks are on the plumbing: cuts in pauses (the generator knows where the speech is), durations, the
layout and manifest, resume, bad files. A slow test transcribes with a real cached checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from vall_e.data.synthetic import make_sentences, speakers, synthesize
from vall_e.emb.segment import SegmentConfig, find_phrases, plan_utterances
from vall_e.emb.transcribe import MANIFEST, RECORD_DIR, clean_text, main
from vall_e.utils.errors import UserError

RATE = 16_000
LANGS = ("en", "de", "fr", "es")


def make_tiny_whisper(folder: Path, max_length: int = 20) -> Path:
    """A randomly initialised Whisper of a few thousand weights with a byte-level tokenizer (letters and
    spaces only may be generated) and the multilingual generation config, saved to `folder`."""
    import torch
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(byte_chars.values())}
    specials = (["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{lang}|>" for lang in LANGS]
                + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
                   "<|notimestamps|>"])
    stamps = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]  # timestamps follow <|notimestamps|>, as in Whisper
    tok = WhisperTokenizer(vocab=vocab, merges=[])
    tok.add_tokens(specials + stamps, special_tokens=True)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    allowed = {vocab[byte_chars[b]] for b in b" abcdefghijklmnopqrstuvwxyz"}
    eos, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    cfg = WhisperConfig(vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        num_mel_bins=80, max_source_positions=1500, max_target_positions=64,
                        decoder_start_token_id=sot, eos_token_id=eos, pad_token_id=eos, bos_token_id=eos)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eos, pad_token_id=eos, bos_token_id=eos,
        lang_to_id={f"<|{lang}|>": ids[f"<|{lang}|>"] for lang in LANGS},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"], is_multilingual=True, max_initial_timestamp_index=50,
        max_length=max_length, begin_suppress_tokens=[eos, vocab[byte_chars[32]]],
        suppress_tokens=[i for i in range(256) if i not in allowed])
    model.save_pretrained(folder)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok).save_pretrained(folder)
    return folder


def make_recording(path: Path, n_sentences: int, seed: int, voice_index: int = 0,
                   noise_db: float = -55.0) -> tuple[np.ndarray, list[str]]:
    """Espeak sentences joined with 0.5-1.2 s pauses plus faint noise, written to `path` at 16 kHz.
    Returns the clean signal (to tell speech from pauses) and the sentences."""
    rng = np.random.default_rng(seed)
    voice = speakers(voice_index + 1)[voice_index]
    sentences = make_sentences(n_sentences, seed=seed)
    parts = [np.zeros(int(0.4 * RATE), np.float32)]
    for s in sentences:
        parts += [synthesize(s, voice, RATE), np.zeros(int(rng.uniform(0.5, 1.2) * RATE), np.float32)]
    clean = np.concatenate(parts)
    noisy = clean + rng.standard_normal(clean.size).astype(np.float32) * 10 ** (noise_db / 20)
    sf.write(path, noisy, RATE, subtype="PCM_16")
    return clean, sentences


def is_pause(clean: np.ndarray, t: float, half: float = 0.02) -> bool:
    """No speech in the clean signal within `half` seconds of time t."""
    a, b = max(0, int((t - half) * RATE)), min(clean.size, int((t + half) * RATE))
    return a >= b or float(np.abs(clean[a:b]).max()) < 1e-3


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's matrices are small: one thread is several times faster on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory) -> Path:
    return make_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny")


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """IN_DIR/alice/ (one 35-45 s file), IN_DIR/bob/ (another, plus a corrupt, a silent and an m4a)."""
    root = tmp_path_factory.mktemp("raw") / "podcast"
    (root / "alice").mkdir(parents=True)
    (root / "bob").mkdir()
    clean = {"alice/take1.wav": make_recording(root / "alice" / "take1.wav", 12, seed=1, voice_index=0)[0],
             "bob/show.wav": make_recording(root / "bob" / "show.wav", 11, seed=2, voice_index=1)[0]}
    (root / "bob" / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    sf.write(root / "bob" / "quiet.wav", np.zeros(RATE * 2, np.float32), RATE)
    (root / "bob" / "phone.m4a").write_bytes(b"\x00\x00\x00\x18ftypM4A ")
    (root / "bob" / "notes.md").write_text("not audio, ignored\n")
    return root, clean


@pytest.fixture(scope="module")
def transcribed(recordings, tiny_whisper, tmp_path_factory):
    root, clean = recordings
    out = tmp_path_factory.mktemp("out") / "dataset"
    code = main([str(root), str(out), "--model", str(tiny_whisper), "--device", "cpu", "--quiet"])
    assert code == 0
    return root, clean, out


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST).read_text(encoding="utf-8").splitlines()]


def test_recordings_are_long_with_pauses(recordings):
    _, clean = recordings
    for wav in clean.values():
        assert 30 <= wav.size / RATE <= 60


def test_cuts_fall_in_pauses_and_durations_stay_in_bounds(transcribed):
    _, clean, out = transcribed
    rows = manifest(out)
    assert len(rows) >= 4
    cfg = SegmentConfig()
    for r in rows:
        assert cfg.min_seconds - 1e-3 <= r["end"] - r["start"] <= cfg.max_seconds + 1e-3, r
        wav = clean[r["source"]]
        assert is_pause(wav, r["start"]) and is_pause(wav, r["end"]), f"cut in speech: {r}"
    # the kept segments do not overlap and cover most of the speech of each file
    for src, wav in clean.items():
        mine = sorted((r["start"], r["end"]) for r in rows if r["source"] == src)
        assert all(a[1] <= b[0] + 1e-6 for a, b in zip(mine, mine[1:]))
        speech = np.abs(wav) > 1e-3
        covered = np.zeros_like(speech)
        for a, b in mine:
            covered[int(a * RATE):int(b * RATE)] = True
        assert covered[speech].mean() > 0.8


def test_layout_and_manifest(transcribed):
    root, clean, out = transcribed
    rows = manifest(out)
    group = root.name
    assert {r["source"] for r in rows} == set(clean)
    for r in rows:
        speaker = r["source"].split("/")[0]
        wav_path = out / r["path"]
        assert wav_path.parent == out / group / speaker
        assert wav_path.name == f"{r['id']}.wav" and r["id"].startswith(Path(r["source"]).stem + "_")
        text = wav_path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert text == r["text"] and text == clean_text(text) and any(c.isalpha() for c in text)
        assert r["language"] in LANGS and 0.0 < r["confidence"] <= 1.0
        data, sr = sf.read(wav_path, dtype="float32")
        assert sr == RATE  # the source's rate is kept
        assert abs(data.size / sr - (r["end"] - r["start"])) < 2e-3
        src, _ = sf.read(root / r["source"], dtype="float32", start=int(round(r["start"] * RATE)),
                         stop=int(round(r["start"] * RATE)) + data.size)
        assert np.abs(src - data).max() < 1e-3  # the clip is the source's audio there
    for src in clean:  # ids numbered from 0 per source
        ids = sorted(r["id"] for r in rows if r["source"] == src)
        assert ids == [f"{Path(src).stem}_{n:04d}" for n in range(len(ids))]
    assert not list(out.rglob("*.tmp*"))


def test_bad_files_reported_and_resume_skips_finished(transcribed, tiny_whisper, capsys):
    root, _, out = transcribed
    records = sorted(p.relative_to(out / RECORD_DIR).as_posix() for p in (out / RECORD_DIR).rglob("*.jsonl"))
    assert records == [f"{root.name}/alice/take1.jsonl", f"{root.name}/bob/show.jsonl"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.wav")}
    # a third recording arrives; the two finished ones are not transcribed again
    make_recording(root / "alice" / "take2.wav", 5, seed=3, voice_index=0)
    try:
        assert main([str(root), str(out), "--model", str(tiny_whisper), "--device", "cpu", "--quiet"]) == 0
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("skipped: ")]
        assert len(lines) == 3
        assert any("broken.wav" in line and "corrupt" in line for line in lines)
        assert any("quiet.wav" in line and "silent" in line for line in lines)
        assert any("phone.m4a" in line and "unsupported" in line for line in lines)
        assert "transcribed 1 files" in err and "2 files already done" in err and "h kept" in err
        assert all(p.stat().st_mtime_ns == t for p, t in before.items())
        assert {r["source"] for r in manifest(out)} == {"alice/take1.wav", "alice/take2.wav", "bob/show.wav"}
    finally:
        (root / "alice" / "take2.wav").unlink()


def test_unfinished_source_is_redone_cleanly(tmp_path, tiny_whisper):
    src = tmp_path / "in" / "carol"
    src.mkdir(parents=True)
    make_recording(src / "a.wav", 5, seed=4, voice_index=2)
    out = tmp_path / "out"
    stale = out / "in" / "carol" / "a_0042.wav"  # left by a killed run (no record written)
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    assert main([str(tmp_path / "in"), str(out), "--model", str(tiny_whisper), "--device", "cpu", "--quiet",
                 "--min-seconds", "2", "--max-seconds", "8"]) == 0
    assert not stale.exists()
    rows = manifest(out)
    assert rows and all(2 - 1e-3 <= r["end"] - r["start"] <= 8 + 1e-3 for r in rows)


def test_plan_never_cuts_speech_and_respects_bounds():
    """The planner alone, on a made-up energy pattern: bursts of noise (speech) and silences."""
    rng = np.random.default_rng(0)
    parts, speech = [], []
    t = 0.0
    for _ in range(30):
        d, gap = rng.uniform(0.3, 3.0), rng.choice([0.05, 0.1, 0.3, 0.8, 2.5])
        parts += [rng.standard_normal(int(d * RATE)).astype(np.float32) * 0.1, np.zeros(int(gap * RATE), np.float32)]
        speech.append((t, t + d))
        t += d + gap
    wav = np.concatenate(parts)
    cfg = SegmentConfig()
    phrases = find_phrases(wav, RATE, cfg)
    utts, dropped = plan_utterances(phrases, cfg)
    assert utts
    for u in utts:
        assert cfg.min_seconds <= u.seconds <= cfg.max_seconds
        for a, b in speech:
            assert not a + 0.02 < u.start < b - 0.02 and not a + 0.02 < u.end < b - 0.02
    kept = sum(p.seconds for u in utts for p in phrases[u.first:u.last + 1])
    total = sum(p.seconds for p in phrases)
    assert abs(kept + sum(dropped.values()) - total) < 1e-6


def test_sentence_ends_from_whisper_are_reused_and_other_cuts_transcribed_again():
    """Whisper's segment boundaries near a pause mark it as a sentence end (the text on each side is
    known); a boundary in the middle of speech is not trusted."""
    from vall_e.emb.segment import Phrase
    from vall_e.emb.transcribe import Piece, spans_of_chunk, text_from_spans

    # three phrases: 1-4 s, 5-8 s, 8.4-11 s; pauses 0 (4-5 s) and 1 (8-8.4 s)
    phrases = [Phrase(1, 4, 0, 4.5), Phrase(5, 8, 4.5, 8.2), Phrase(8.4, 11, 8.2, 12)]
    chunk = (0, 2, 0.5, 11.5)
    pieces = [Piece(0.5, 4.1, " One two.", -1.0, 2), Piece(4.6, 7.0, " Three", -1.0, 2),  # ends at 7.5 s: speech
              Piece(7.0, 10.0, " four five.", -2.0, 2)]
    spans = spans_of_chunk(phrases, chunk, pieces, "en")
    assert [(s.left, s.right, s.text) for s in spans] == [(-1, 0, " One two."), (0, 2, " Three  four five.")]
    assert text_from_spans(spans, -1, 0)[0] == " One two."
    text, conf, lang = text_from_spans(spans, -1, 2)
    assert clean_text(text) == "One two. Three four five." and lang == "en"
    assert conf == pytest.approx(np.exp(-4.0 / 6))
    assert text_from_spans(spans, 0, 1) is None and text_from_spans(spans, 1, 2) is None


def test_errors_are_one_line(tmp_path, tiny_whisper, monkeypatch):
    (tmp_path / "in").mkdir()
    with pytest.raises(UserError, match="--diarize"):
        main([str(tmp_path / "in"), str(tmp_path / "out"), "--diarize"])
    with pytest.raises(UserError, match="no such folder"):
        main([str(tmp_path / "nope"), str(tmp_path / "out")])
    with pytest.raises(UserError, match="--min-seconds"):
        main([str(tmp_path / "in"), str(tmp_path / "out"), "--min-seconds", "5", "--max-seconds", "4"])
    make_recording(tmp_path / "in" / "x.wav", 2, seed=5)
    with pytest.raises(UserError, match="no such folder ./missing"):
        main([str(tmp_path / "in"), str(tmp_path / "out"), "--model", "./missing", "--device", "cpu"])
    with pytest.raises(UserError, match="not a language"):
        main([str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tiny_whisper), "--device", "cpu",
              "--language", "xx"])
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: the variable comes late
    with pytest.raises(UserError, match="could not load Whisper model 'nobody/no-such-whisper'"):
        main([str(tmp_path / "in"), str(tmp_path / "out"), "--model", "nobody/no-such-whisper", "--device", "cpu"])


# ---------------------------------------------------------------------------------------------
# a real checkpoint, where one is cached


def _cached_whisper() -> str | None:
    try:
        from huggingface_hub import scan_cache_dir

        repos = [r.repo_id for r in scan_cache_dir().repos if r.repo_type == "model"]
    except Exception:
        return None
    found = [r for r in repos if "whisper" in r.lower()]
    return sorted(found, key=lambda r: ("tiny" not in r, "base" not in r, r))[0] if found else None


def word_error_rate(refs: list[str], hyps: list[str]) -> float:
    """Word edit distance over all references / their word count (lower case, punctuation dropped)."""
    import re

    def words(s: str) -> list[str]:
        return re.sub(r"[^\w\s']", " ", s.lower()).split()

    errors = total = 0
    for ref, hyp in zip(refs, hyps):
        r, h = words(ref), words(hyp)
        d = list(range(len(h) + 1))
        for i in range(1, len(r) + 1):
            prev, d[0] = d[0], i
            for j in range(1, len(h) + 1):
                prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
        errors += d[len(h)]
        total += len(r)
    return errors / max(total, 1)


@pytest.mark.slow
def test_real_whisper_transcribes_espeak_recordings(tmp_path):
    name = _cached_whisper()
    if name is None:
        pytest.skip("no Whisper checkpoint in the Hugging Face cache")
    (tmp_path / "in" / "alice").mkdir(parents=True)
    sentences = make_recording(tmp_path / "in" / "alice" / "long.wav", 12, seed=7)[1]
    out = tmp_path / "out"
    assert main([str(tmp_path / "in"), str(out), "--model", name, "--language", "en", "--quiet"]) == 0
    rows = manifest(out)
    assert rows
    wer = word_error_rate([" ".join(sentences)], [" ".join(r["text"] for r in rows)])
    print(f"{name}: WER {wer:.3f} over {len(rows)} segments")
    assert wer < 0.5

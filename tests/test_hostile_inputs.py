"""Hostile inputs to every command: each gives a one-line error naming the problem (and the file),
a non-zero exit code, no traceback, nothing half-written, and no code ever runs from a file.

Every command runs at least once as a real `python -m ...` subprocess (under a memory cap, so a
regression cannot take the machine down); the remaining cases call the same `main` in-process
through `run_main`, which is exactly what `python -m` runs, to keep the file fast. Property-based
tests at the end cover what tests/test_text.py, test_config.py and test_data.py do not: the YAML
file parser, stored symbol/language maps, a tampered HDF5 dataset, arbitrary audio bytes, and
batched G2P.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vall_e.utils.errors import UserError, run_main

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SR = 24_000
MEM_CAP = 6 << 30  # address-space cap of every subprocess: a runaway allocation fails, not the machine
TEXTS = ["Hello there, how are you?", "The quick brown fox jumps over the lazy dog.", "Good morning."]
UNKNOWN_TEXT = "Thirty thin thieves thought."  # θ: absent from a map built from TEXTS
LONG_CHARS = 100_000


# ==============================================================================================
# helpers
# ==============================================================================================

@dataclass
class Result:
    code: int | None
    out: str
    err: str
    seconds: float = 0.0


def run_cmd(args: Sequence[str | bytes], cwd: Path, timeout: float = 120, mem: int = MEM_CAP) -> Result:
    """`python ARGS...` as a real subprocess: one thread, offline, address space capped at `mem`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))

    t = time.perf_counter()
    p = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, preexec_fn=cap)
    return Result(p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace"),
                  time.perf_counter() - t)


def call(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str], capsys: pytest.CaptureFixture[str]
         ) -> Result:
    """`main(argv)` through `run_main`, as `python -m` runs it. Any exception other than the
    wrapper's SystemExit escapes (a bug: bad input must never end in a traceback)."""
    capsys.readouterr()
    t = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        run_main(main, list(argv))
    out = capsys.readouterr()
    return Result(e.value.code, out.out, out.err, time.perf_counter() - t)


def one_line_error(r: Result, *names: str | Path, code: int = 2) -> str:
    """Assert `r` failed with exactly one `error:` line, last on stderr, naming every `names`."""
    both = r.out + r.err
    assert r.code == code, f"exit {r.code}\n{both[-3000:]}"
    assert "Traceback" not in both, both[-3000:]
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.err[-3000:]
    for n in names:
        n = n.name if isinstance(n, Path) else n
        assert n in errors[0], (n, errors[0])
    return errors[0]


def succeeded(r: Result) -> None:
    assert r.code == 0, (r.out + r.err)[-3000:]
    assert "Traceback" not in r.out + r.err


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def temp_files(root: Path) -> list[Path]:
    """Leftovers of atomic writes: `.{name}.XXXX.tmp...` files/folders and `.{name}.old` folders."""
    return [p for p in root.rglob(".*") if ".tmp" in p.name or p.name.endswith(".old")]


def assert_untouched(root: Path, before: set[str]) -> None:
    """Nothing was written under `root` (no partial output) and no temporary file is left."""
    assert files_under(root) == before, sorted(files_under(root) ^ before)
    assert not temp_files(root), temp_files(root)


class RunsCode:
    """Pickles to `open(marker, "w")`: unpickling it with plain pickle creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def code_pickles(marker: Path) -> dict[str, bytes]:
    """A raw pickle and a torch.save zip, both running code when loaded unsafely."""
    raw = pickle.dumps(RunsCode(marker), protocol=2)
    pickle.loads(raw).close()  # sanity: plain unpickling really runs it
    assert marker.exists()
    marker.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"format": "vall-e-checkpoint", "codes": RunsCode(marker)}, Path(tmp) / "z.pt")
        zipped = (Path(tmp) / "z.pt").read_bytes()
    return {"raw": raw, "zip": zipped}


# ==============================================================================================
# fixtures: a tiny model, hostile audio, a tiny corpus, a checkpoint
# ==============================================================================================

def _long_text() -> str:
    rng = random.Random(0)
    parts, n = [], 0
    while n < LONG_CHARS:
        s = rng.choice(TEXTS)
        parts.append(s)
        n += len(s) + 1
    return " ".join(parts)[:LONG_CHARS].rsplit(" ", 1)[0] + "."


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory, tiny_encodec_dir: Path) -> Path:
    """A tiny untrained ar+nar model (smaller than conftest's) whose symbol map covers TEXTS only."""
    from tests.conftest import build_tiny_model, export_tiny_model
    from vall_e.text.phonemes import phonemize

    model, cfg, symmap = build_tiny_model(TEXTS, d_model=16, n_layers=1)
    bare = lambda t: t.replace("ː", "").replace("ˈ", "").replace("ˌ", "")  # noqa: E731
    known = {bare(s) for s in symmap.symbols}
    assert any(bare(t) not in known for t in phonemize(UNKNOWN_TEXT)), "UNKNOWN_TEXT must have an unknown phone"
    return export_tiny_model(tmp_path_factory.mktemp("model") / "model.safetensors", model, cfg, symmap,
                             tiny_encodec_dir)


def _pcm16_wav_header(frames: int, sr: int) -> bytes:
    return (b"RIFF" + struct.pack("<I", 36 + 2 * frames) + b"WAVE" + b"fmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, sr, 2 * sr, 2, 16) + b"data" + struct.pack("<I", 2 * frames))


@pytest.fixture(scope="module")
def audio(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> file: a good voice and every kind of hostile audio."""
    from vall_e.codecs.tiny_encodec import speechlike_audio
    from vall_e.utils.audio import save_audio

    d = tmp_path_factory.mktemp("audio")
    voice = speechlike_audio(2.0, seed=3).numpy()
    files = {k: d / f"{k}.wav" for k in ("voice", "corrupt", "truncated", "empty", "silent", "notaudio",
                                          "ch8", "sr8k", "header2h")}
    save_audio(files["voice"], voice, SR)
    good = files["voice"].read_bytes()
    files["corrupt"].write_bytes(good[:12] + b"fmt garbage!" + bytes(range(256)) * 8)
    files["truncated"].write_bytes(good[: len(good) // 3])
    files["empty"].write_bytes(b"")
    sf.write(files["silent"], np.zeros(SR, np.float32), SR)
    files["notaudio"].write_text("I am not audio at all, just text.\n")
    sf.write(files["ch8"], np.stack([voice * (0.5 + 0.05 * c) for c in range(8)], 1), SR)
    import soxr

    sf.write(files["sr8k"], soxr.resample(voice, SR, 8000), 8000)
    # a header that claims two hours, followed by two seconds of audio
    files["header2h"].write_bytes(_pcm16_wav_header(2 * 3600 * SR, SR) + (voice * 32767).astype("<i2").tobytes())
    # a real two-hour file: two seconds of speech, then silence (FLAC packs it into ~200 kB)
    files["real2h"] = d / "real2h.flac"
    lo = soxr.resample(voice, SR, 8000).astype(np.float32)
    with sf.SoundFile(files["real2h"], "w", 8000, 1, format="FLAC", subtype="PCM_16") as f:
        f.write(lo)
        zeros = np.zeros(8000 * 600, np.float32)
        left = 2 * 3600 * 8000 - len(lo)
        while left > 0:
            f.write(zeros[: min(left, len(zeros))])
            left -= len(zeros)
    assert sf.info(str(files["real2h"])).duration == pytest.approx(7200.0)
    return files


SPEC = {"name": "test", "frame_rate": 75.0, "n_levels": 2, "n_codes": 1024}
PHONES = "h ə l o ʊ | ð ɛ ɹ | w ɜː l d".split()


def make_corpus(root: Path, n: int = 4, frames: int = 150) -> Path:
    """{root}/grp/spk/u{i}.qnt.pt + .phn.txt (2 levels) and {root}/config.yaml for data and training."""
    from vall_e.emb.codes import save_codes

    d = root / "grp" / "spk"
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        save_codes(d / f"u{i}.qnt.pt", torch.randint(0, 1024, (frames + 10 * i, 2), generator=g), SPEC)
        (d / f"u{i}.phn.txt").write_text(" ".join(PHONES), encoding="utf-8")
    y = root / "config.yaml"
    y.write_text("device: cpu\n"
                 "dataset: {training: [grp/spk], validation_fraction: 0.25, min_utterances: 1, prompt_duration: 0.5}\n"
                 "model: {name: tiny, size: tiny, d_model: 16, n_heads: 2, n_layers: 1, n_levels: 2, n_codes: 1024,\n"
                 "  n_text_tokens: 128, n_langs: 2, dropout: 0.0}\n"
                 "hyperparameters: {batch_size: 2, scheduler: constant}\n"
                 "trainer: {iterations: 2, save_frequency: 1, tensorboard: false}\n"
                 "evaluation: {frequency: 0, synthesize: 0}\n")
    return y


def make_checkpoint(root: Path, step: int = 3) -> Path:
    """A real checkpoint of the tiny model of `make_corpus`'s config; returns its folder."""
    from vall_e.config import load_config
    from vall_e.models.build import build_models, model_config_dict
    from vall_e.models.weights import flat_weights
    from vall_e.training.engines.checkpoint import save_checkpoint

    cfg = load_config(root / "config.yaml")
    torch.manual_seed(0)
    models = build_models(cfg.model, 16, 1)
    symmap = {"<pad>": 0, "<s>": 1, "</s>": 2, " ": 3, **{p: 4 + i for i, p in enumerate(sorted(set(PHONES) - {"|"}))}}
    meta = {"models": {n: model_config_dict(m) for n, m in models.items()}, "symmap": json.dumps(symmap),
            "langmap": json.dumps({"en": 0}), "codec": dict(SPEC)}
    return save_checkpoint(cfg.ckpt_dir / "tiny", step, flat_weights({n: m.state_dict() for n, m in models.items()}),
                           {"step": step, "samples": 4, "tokens": 100, "meta": meta})


def rehash(step_dir: Path) -> None:
    """Make the manifest match edited files, as an attacker who edits a checkpoint would."""
    m = json.loads((step_dir / "manifest.json").read_text())
    for rel in m["files"]:
        data = (step_dir / rel).read_bytes()
        m["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step_dir / "manifest.json").write_text(json.dumps(m))


# ==============================================================================================
# python -m vall_e  (synthesis)
# ==============================================================================================

def tts_argv(text: str, ref: Path | str, out: Path, model: Path, *extra: str) -> list[str]:
    return [text, str(ref), str(out), "--model", str(model), "--max-ar-steps", "8", "--max-nar-levels", "2",
            "--seed", "1", *extra]


@pytest.mark.parametrize("name", ["corrupt", "truncated", "empty", "silent", "notaudio", "header2h"])
def test_tts_bad_reference_audio(name: str, audio: dict[str, Path], model_file: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from vall_e.serving.synthesize import main

    out = tmp_path / "out.wav"
    one_line_error(call(main, tts_argv(TEXTS[2], audio[name], out, model_file), capsys), audio[name])
    assert_untouched(tmp_path, set())


@pytest.mark.parametrize("name", ["ch8", "sr8k"])
def test_tts_eight_channels_and_8khz_references_work(name: str, audio: dict[str, Path], model_file: Path,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Downmixed and resampled, not refused."""
    from vall_e.serving.synthesize import main

    out = tmp_path / "out.wav"
    succeeded(call(main, tts_argv(TEXTS[2], audio[name], out, model_file), capsys))
    wav, sr = sf.read(out, dtype="float32")
    assert sr == SR and wav.ndim == 1 and 0 < len(wav) <= 8 * 320 + 1 and np.isfinite(wav).all()
    assert not temp_files(tmp_path)


def test_tts_text_cases(model_file: Path, audio: dict[str, Path], tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    """Empty text, a non-UTF-8 batch file, an unsupported language, phonemes the model lacks."""
    from vall_e.serving.synthesize import main

    out, voice = tmp_path / "out" / "x.wav", audio["voice"]
    one_line_error(call(main, tts_argv("", voice, out, model_file), capsys), "empty text")
    one_line_error(call(main, tts_argv(" \n\t\n", voice, out, model_file), capsys), "empty text")
    batch = tmp_path / "texts.txt"
    batch.write_bytes(b"Good morning.\n\xff\xfe not utf-8\n")
    one_line_error(call(main, tts_argv("-", voice, out, model_file, "--batch-file", str(batch)), capsys),
                   batch, "UTF-8")
    for lang in ("xx-klingon", "tlh", " "):
        err = one_line_error(call(main, tts_argv(TEXTS[2], voice, out, model_file, "--language", lang), capsys))
        assert "language" in err
    err = one_line_error(call(main, tts_argv(UNKNOWN_TEXT, voice, out, model_file), capsys), "phoneme")
    assert "θ" in err
    assert not (tmp_path / "out").exists() and not temp_files(tmp_path)


def test_tts_config_and_output_errors(model_file: Path, audio: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from vall_e.serving.synthesize import main

    voice, out = audio["voice"], tmp_path / "out.wav"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n\tsize: tiny\n")
    one_line_error(call(main, tts_argv(TEXTS[2], voice, out, model_file, f"yaml={bad}"), capsys), bad, "YAML")
    one_line_error(call(main, tts_argv(TEXTS[2], voice, out, model_file, "inference.wieght_dtype=float32"), capsys),
                   "inference.wieght_dtype", "inference.weight_dtype")
    one_line_error(call(main, tts_argv(TEXTS[2], voice, tmp_path / "out.xyz", model_file), capsys), "out.xyz")
    one_line_error(call(main, tts_argv(TEXTS[2], ";;", out, model_file), capsys), "reference")
    assert_untouched(tmp_path, {"bad.yaml"})


def _edit_model(src: Path, dst: Path, **metadata: str) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        md = dict(f.metadata())
    md.update(metadata)
    save_file(tensors, str(dst), metadata=md)
    return dst


def test_tts_damaged_or_tampered_model(model_file: Path, audio: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from vall_e.serving.synthesize import main

    data = model_file.read_bytes()
    cases: dict[str, bytes | Path] = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "flipped": data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:],  # a weight byte: checksum
    }
    marker = tmp_path / "PWNED"
    for kind, blob in code_pickles(marker).items():
        cases[f"pickle_{kind}"] = blob
    md = {"codec_list": {"codec": "[1, 2]"}, "symmap_garbage": {"symmap": "{oops"},
          "langmap_list": {"langmap": "[1]"}, "models_garbage": {"models": "{oops"},
          "config_junk": {"models": json.dumps({"ar+nar": {"d_model": "wide"}})},
          "newer": {"format_version": "99"}, "foreign": {"format": "something-else"}}
    models = tmp_path / "models"
    models.mkdir()
    for name, blob in cases.items():
        (models / f"{name}.safetensors").write_bytes(blob)
    for name, meta in md.items():
        _edit_model(model_file, models / f"{name}.safetensors", **meta)
    outs = tmp_path / "outs"
    for f in sorted(models.iterdir()):
        one_line_error(call(main, tts_argv(TEXTS[2], audio["voice"], outs / f"{f.stem}.wav", f), capsys), f)
    assert not marker.exists()
    assert not outs.exists() and not temp_files(tmp_path)


def test_tts_subprocess_non_utf8_argv(model_file: Path, audio: dict[str, Path], tmp_path: Path) -> None:
    """Real `python -m vall_e`: undecodable bytes in the text argument still synthesize."""
    out = tmp_path / "ok.wav"
    r = run_cmd(["-m", "vall_e", b"Good \xff\xfe morning.", str(audio["voice"]), str(out), "--model",
                 str(model_file), "--max-ar-steps", "8", "--max-nar-levels", "1"], tmp_path)
    succeeded(r)
    assert sf.info(str(out)).samplerate == SR and not temp_files(tmp_path)


def test_tts_two_hour_reference_is_refused_from_its_header(model_file: Path, audio: dict[str, Path],
                                                           tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    r = run_cmd(["-m", "vall_e", TEXTS[2], str(audio["real2h"]), str(out), "--model", str(model_file),
                 "--max-ar-steps", "8"], tmp_path, timeout=180, mem=3 << 30)
    one_line_error(r, audio["real2h"])
    assert r.seconds < 60 and not out.exists() and not temp_files(tmp_path)


def test_tts_100k_characters_unsplit_is_a_clean_error(model_file: Path, audio: dict[str, Path],
                                                      tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    r = run_cmd(["-m", "vall_e", _long_text(), str(audio["voice"]), str(out), "--model", str(model_file),
                 "--max-ar-steps", "1", "--no-split"], tmp_path, timeout=180, mem=4 << 30)
    one_line_error(r)
    assert r.seconds < 60 and not out.exists() and not temp_files(tmp_path)


@pytest.mark.slow
def test_tts_100k_characters_split_works_in_bounded_time(model_file: Path, audio: dict[str, Path],
                                                         tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """~3000 sentences: synthesized (or refused cleanly) in bounded time and memory (about a minute)."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("about a minute: run with -m slow")
    out = tmp_path / "out.wav"
    r = run_cmd(["-m", "vall_e", _long_text(), str(audio["voice"]), str(out), "--model", str(model_file),
                 "--max-ar-steps", "1", "--max-nar-levels", "0"], tmp_path, timeout=240)
    if r.code == 0:
        assert sf.info(str(out)).duration > 0
    else:
        one_line_error(r)
    assert not temp_files(tmp_path)


# ==============================================================================================
# python -m vall_e.emb.g2p
# ==============================================================================================

def test_g2p_subprocess_non_utf8_stops_cleanly(tmp_path: Path) -> None:
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.txt").write_text("Good morning.", encoding="utf-8")
    (d / "b.txt").write_bytes(b"caf\xe9 latin-1\n")
    (d / "c.txt").write_text("Hello there.", encoding="utf-8")
    r = run_cmd(["-m", "vall_e.emb.g2p", str(d), "--quiet"], tmp_path)
    one_line_error(r, d / "b.txt", "UTF-8")
    # the files before the bad one are done (complete); nothing for it or after it; no temp files
    assert files_under(d) == {"a.txt", "b.txt", "c.txt", "a.phn.txt"} and not temp_files(d)


def test_g2p_hostile_text_and_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vall_e.emb.g2p import main

    d = tmp_path / "data"
    d.mkdir()
    (d / "empty.txt").write_text("   \n", encoding="utf-8")
    one_line_error(call(main, [str(d), "--quiet"], capsys), d / "empty.txt", "empty")
    (d / "empty.txt").unlink()
    (d / "punct.txt").write_text("?!... ,,", encoding="utf-8")
    one_line_error(call(main, [str(d), "--quiet"], capsys), d / "punct.txt")
    (d / "punct.txt").unlink()
    (d / "long.txt").write_text(_long_text(), encoding="utf-8")
    before = files_under(tmp_path)
    one_line_error(call(main, [str(d), "--quiet", "--language", "tlh"], capsys), "tlh")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [unclosed\n")
    one_line_error(call(main, [str(d), "--quiet", f"yaml={bad}"], capsys), bad, "YAML")
    one_line_error(call(main, [str(d), "--quiet", "dataset.langauge=de"], capsys), "dataset.language")
    assert_untouched(tmp_path, before | {"bad.yaml"})
    r = call(main, [str(d), "--quiet"], capsys)  # 100k characters: done, and quickly
    succeeded(r)
    assert r.seconds < 30
    assert len((d / "long.phn.txt").read_text(encoding="utf-8").split()) > 30_000


# ==============================================================================================
# python -m vall_e.emb.qnt
# ==============================================================================================

def _qnt_folder(root: Path, audio: dict[str, Path], *names: str) -> Path:
    d = root / "_".join(names)
    d.mkdir()
    for n in names:
        shutil.copy(audio[n], d / f"{n}{audio[n].suffix}")
    return d


def test_qnt_subprocess_eight_channels_and_8khz_work(audio: dict[str, Path], tiny_encodec_dir: Path,
                                                     tmp_path: Path) -> None:
    from vall_e.emb.codes import load_codes

    d = _qnt_folder(tmp_path, audio, "ch8", "sr8k")
    r = run_cmd(["-m", "vall_e.emb.qnt", str(d), f"codec.model={tiny_encodec_dir}"], tmp_path)
    succeeded(r)
    for n in ("ch8", "sr8k"):
        codes = load_codes(d / f"{n}.qnt.pt")
        assert codes.shape == (150, 8)  # 2 s at 75 frames/s, whatever the channels or rate were
    assert not temp_files(d)


def test_qnt_subprocess_two_hour_file_refused_from_header(audio: dict[str, Path], tiny_encodec_dir: Path,
                                                          tmp_path: Path) -> None:
    """A real two-hour FLAC would need tens of GB to encode in one pass: refused before decoding."""
    d = _qnt_folder(tmp_path, audio, "real2h")
    r = run_cmd(["-m", "vall_e.emb.qnt", str(d), "--suffix", ".flac", f"codec.model={tiny_encodec_dir}"],
                tmp_path, mem=3 << 30)
    one_line_error(r, "real2h.flac", "7200")
    assert files_under(d) == {"real2h.flac"} and not temp_files(d)


@pytest.mark.parametrize("name", ["corrupt", "truncated", "empty", "silent", "notaudio", "header2h"])
def test_qnt_bad_audio(name: str, audio: dict[str, Path], tiny_encodec_dir: Path, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    from vall_e.emb.qnt import main

    d = _qnt_folder(tmp_path, audio, name)
    one_line_error(call(main, [str(d), f"codec.model={tiny_encodec_dir}"], capsys), f"{name}.wav")
    assert files_under(d) == {f"{name}.wav"} and not temp_files(d)


def test_qnt_config_errors(audio: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vall_e.emb.qnt import main

    d = _qnt_folder(tmp_path, audio, "voice")
    bad = tmp_path / "bad.yaml"
    bad.write_text("codec: {name: encodec, name: world}\n")  # a duplicate key is an error, not "last wins"
    one_line_error(call(main, [str(d), f"yaml={bad}"], capsys), bad, "duplicate key")
    one_line_error(call(main, [str(d), "codec.bandwith=6"], capsys), "codec.bandwidth")
    one_line_error(call(main, [str(d), "--max-seconds", "-1"], capsys), "--max-seconds")
    assert files_under(d) == {"voice.wav"} and not temp_files(tmp_path)


# ==============================================================================================
# python -m vall_e.data and the dataset reader: .qnt.pt of the wrong shape or dtype, code pickles
# ==============================================================================================

def _bad_codes(kind: str, marker: Path) -> bytes | dict | torch.Tensor:
    g = torch.Generator().manual_seed(1)
    good = torch.randint(0, 1024, (120, 2), generator=g)
    return {
        "float": {"codes": good.float(), "codec": SPEC},
        "bool": {"codes": good > 5, "codec": SPEC},
        "1d": {"codes": good[:, 0], "codec": SPEC},
        "4d": good[None, None],
        "empty": {"codes": good[:0], "codec": SPEC},
        "one_level": {"codes": good[:, :1], "codec": SPEC},
        "out_of_range": {"codes": good + 2000, "codec": SPEC},
        "negative": good.to(torch.int16) - 2000,
        "not_codes": {"audio": good},
        "spec_junk": {"codes": good, "codec": {"n_codes": "many"}},
        "truncated": b"PK\x03\x04 cut short",
        "zero_bytes": b"",
        "pickle_raw": code_pickles(marker)["raw"],
        "pickle_zip": code_pickles(marker)["zip"],
    }[kind]


QNT_KINDS = ["float", "bool", "1d", "4d", "empty", "one_level", "out_of_range", "negative", "not_codes",
             "spec_junk", "truncated", "zero_bytes", "pickle_raw", "pickle_zip"]


def _plant(corpus_yaml: Path, kind: str, marker: Path) -> Path:
    bad = corpus_yaml.parent / "grp" / "spk" / "u1.qnt.pt"
    obj = _bad_codes(kind, marker)
    if isinstance(obj, bytes):
        bad.write_bytes(obj)
    else:
        torch.save(obj, bad)
    return bad


@pytest.mark.parametrize("kind", QNT_KINDS)
def test_data_hdf5_with_bad_codes_file(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vall_e.config import load_config
    from vall_e.data.__main__ import main
    from vall_e.data.dataset import VALLEDataset

    y = make_corpus(tmp_path)
    marker = tmp_path / "PWNED"
    bad = _plant(y, kind, marker)
    before = files_under(tmp_path)
    one_line_error(call(main, [f"yaml={y}", "--action", "hdf5"], capsys), bad)
    assert not (tmp_path / "data.h5").exists()
    with pytest.raises(UserError, match="u1.qnt.pt") as e:  # the reader, straight from the folders
        VALLEDataset(load_config(y), "train")
    assert "\n" not in str(e.value)
    assert_untouched(tmp_path, before)
    assert not marker.exists()


def test_data_subprocess_pickle_in_dataset(tmp_path: Path) -> None:
    y = make_corpus(tmp_path)
    marker = tmp_path / "PWNED"
    bad = _plant(y, "pickle_zip", marker)
    before = files_under(tmp_path)
    one_line_error(run_cmd(["-m", "vall_e.data", f"yaml={y}", "--action", "hdf5"], tmp_path), bad, "refused")
    assert_untouched(tmp_path, before)
    assert not marker.exists()


def test_data_hostile_config_metadata_and_symmap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Malformed YAML, unknown keys, bad folders; an edited metadata.json cache is re-measured, not
    trusted; a garbage symmap.json is named."""
    from vall_e.config import load_config
    from vall_e.data.__main__ import main
    from vall_e.data.listing import list_split

    y = make_corpus(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset:\n  training: [grp/spk\n")
    one_line_error(call(main, [f"yaml={bad}", "--action", "hdf5"], capsys), bad, "YAML")
    one_line_error(call(main, [f"yaml={y}", "dataset.trainig=[grp/spk]"], capsys), "dataset.training")
    one_line_error(call(main, [f"yaml={y}", "--action", "metadata", "dataset.training=[grp/spk/u0.qnt.pt]"], capsys),
                   "u0.qnt.pt", "not a folder")
    one_line_error(call(main, [f"yaml={y}", "--action", "hdf5", "dataset.training=[nowhere/nobody]"], capsys),
                   "nobody")
    assert not (tmp_path / "data.h5").exists() and not temp_files(tmp_path)
    cfg = load_config(y)
    frames = {u.id: u.frames for u in list_split(cfg, "training")}  # writes grp/spk/metadata.json
    meta_path = tmp_path / "grp" / "spk" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    for uid, junk in zip(sorted(meta["utterances"]), ("many", -5, [1], None)):
        meta["utterances"][uid]["frames"] = junk  # the size/mtime stamps still match the files
    meta_path.write_text(json.dumps(meta))
    assert {u.id: u.frames for u in list_split(cfg, "training")} == frames
    (tmp_path / "symmap.json").write_bytes(b"\xff{not json")
    one_line_error(call(main, [f"yaml={y}", "--action", "sample"], capsys), "symmap.json")


def _tamper_h5(path: Path, kind: str) -> None:
    import h5py

    with h5py.File(path, "r+") as f:
        key = next(k for k in _h5_keys(f))
        g = f[key]
        if kind in ("audio_float", "audio_1d", "audio_big", "audio_missing"):
            a = g["audio"][()]
            del g["audio"]
            if kind != "audio_missing":
                new = {"audio_float": a.astype("float32"), "audio_1d": a[:, 0],
                       "audio_big": (a.astype("int32") + 3000).astype("int16")}[kind]
                g.create_dataset("audio", data=new)
        elif kind in ("text_float", "text_big"):
            t = g["text"][()]
            del g["text"]
            g.create_dataset("text", data=t.astype("float32") if kind == "text_float" else t + 500)
        elif kind == "frames_junk":
            g.attrs["frames"] = "many"
        elif kind in ("symmap_junk", "codec_junk"):
            name = kind.split("_")[0]
            del f[name]
            f.create_dataset(name, data="[1, 2" if kind == "symmap_junk" else "[1, 2]")


def _h5_keys(f) -> list[str]:
    keys: list[str] = []
    f.visititems(lambda name, obj: keys.append(name) if "audio" in getattr(obj, "keys", lambda: [])() else None)
    return sorted(keys)


H5_KINDS = ["audio_float", "audio_1d", "audio_big", "audio_missing", "text_float", "text_big", "frames_junk",
            "symmap_junk", "codec_junk"]


def test_tampered_hdf5_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every item of a damaged data.h5 either reads correctly or raises a one-line UserError naming it."""
    from vall_e.config import load_config
    from vall_e.data.dataset import VALLEDataset
    from vall_e.data.hdf5 import build_hdf5

    y = make_corpus(tmp_path, n=3)
    cfg = load_config(y, {"dataset.use_hdf5": "true", "dataset.validation_fraction": "0"})
    build_hdf5(cfg, progress=False, version=1)  # the version-1 reader; the index: test_data_index
    good = (tmp_path / "data.h5").read_bytes()
    for kind in H5_KINDS:
        (tmp_path / "data.h5").write_bytes(good)
        _tamper_h5(tmp_path / "data.h5", kind)
        ds = None
        try:
            with pytest.raises(UserError, match="data.h5") as e:
                ds = VALLEDataset(cfg, "train")
                for i in range(len(ds)):
                    ds[i]
        finally:
            if ds is not None and ds._h5 is not None:
                ds._h5.close()
        assert "\n" not in str(e.value), kind


# ==============================================================================================
# python -m vall_e.train and python -m vall_e.export: damaged and tampered checkpoints
# ==============================================================================================

def _tamper_checkpoint(step_dir: Path, kind: str, marker: Path) -> Path:
    """Damage one file of a checkpoint; returns the file the error must name."""
    w, s, m = step_dir / "model.safetensors", step_dir / "state.pt", step_dir / "manifest.json"
    if kind == "weights_truncated":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        return w
    if kind == "weights_truncated_rehashed":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
        rehash(step_dir)
        return w
    if kind == "weights_flipped":
        data = bytearray(w.read_bytes())
        data[-7] ^= 0xFF
        w.write_bytes(bytes(data))
        return w
    if kind == "weights_wrong_shape_rehashed":
        from safetensors.torch import load_file, save_file

        t = load_file(str(w))
        k = sorted(t)[0]
        t[k] = torch.zeros(3, 3)
        save_file(t, str(w), metadata={"format": "vall-e-checkpoint", "version": "1"})
        rehash(step_dir)
        return w
    if kind == "state_truncated":
        s.write_bytes(s.read_bytes()[:200])
        rehash(step_dir)
        return s
    if kind == "state_counter_junk":
        state = torch.load(s, weights_only=True)
        state["step"] = "three"
        torch.save(state, s)
        rehash(step_dir)
        return s
    if kind in ("state_pickle_zip", "state_pickle_raw"):
        s.write_bytes(code_pickles(marker)[kind.rsplit("_", 1)[1]])
        rehash(step_dir)
        return s
    if kind == "manifest_missing":
        m.unlink()
        return m
    if kind == "manifest_garbage":
        m.write_text("{not json")
        return m
    if kind == "manifest_bad_entry":
        m.write_text(json.dumps({"format": "vall-e-checkpoint", "version": 1,
                                 "files": {"state.pt": {"size": "big", "sha256": 5}}}))
        return m
    if kind == "manifest_escapes":
        m.write_text(json.dumps({"format": "vall-e-checkpoint", "version": 1,
                                 "files": {"../../../../etc/passwd": {"size": 1, "sha256": "0"}}}))
        return m
    if kind == "latest_garbage":
        (step_dir.parent / "latest").write_bytes(b"\xff\xfe3\n")
        return step_dir.parent / "latest"
    raise AssertionError(kind)


CKPT_KINDS = ["weights_truncated", "weights_truncated_rehashed", "weights_flipped", "state_truncated",
              "state_counter_junk", "state_pickle_zip", "state_pickle_raw", "manifest_missing", "manifest_garbage",
              "manifest_bad_entry", "manifest_escapes", "latest_garbage"]


@pytest.mark.parametrize("kind", CKPT_KINDS)
def test_train_resume_and_export_refuse_a_damaged_checkpoint(kind: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from vall_e.training.export import main as export_main
    from vall_e.training.trainer import main as train_main

    y = make_corpus(tmp_path)
    step_dir = make_checkpoint(tmp_path)
    marker = tmp_path / "PWNED"
    named = _tamper_checkpoint(step_dir, kind, marker)
    ckpt_before = files_under(tmp_path / "ckpt")
    one_line_error(call(train_main, [f"yaml={y}"], capsys), named)
    one_line_error(call(export_main, [f"yaml={y}"], capsys), named)
    one_line_error(call(export_main, [f"yaml={y}", "--out", str(tmp_path / "x.safetensors")], capsys), named)
    assert_untouched(tmp_path / "ckpt", ckpt_before)  # no new checkpoint, no export, `latest` unchanged
    assert not (tmp_path / "x.safetensors").exists() and not temp_files(tmp_path)
    assert not marker.exists()


def test_export_refuses_weights_that_do_not_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A consistent manifest over edited weights: export refuses instead of writing a broken model file."""
    from vall_e.training.export import main as export_main

    y = make_corpus(tmp_path)
    step_dir = make_checkpoint(tmp_path)
    named = _tamper_checkpoint(step_dir, "weights_wrong_shape_rehashed", tmp_path / "PWNED")
    before = files_under(tmp_path)
    one_line_error(call(export_main, [f"yaml={y}"], capsys), named, "shape")
    assert_untouched(tmp_path, before)


def test_train_and_export_subprocess_code_pickle_checkpoint(tmp_path: Path) -> None:
    y = make_corpus(tmp_path)
    step_dir = make_checkpoint(tmp_path)
    marker = tmp_path / "PWNED"
    named = _tamper_checkpoint(step_dir, "state_pickle_zip", marker)
    ckpt_before = files_under(tmp_path / "ckpt")
    one_line_error(run_cmd(["-m", "vall_e.train", f"yaml={y}"], tmp_path), named, "refused")
    one_line_error(run_cmd(["-m", "vall_e.export", f"yaml={y}"], tmp_path), named, "refused")
    assert_untouched(tmp_path / "ckpt", ckpt_before)
    assert not marker.exists()


def test_train_hostile_config_data_and_exported_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vall_e.training.trainer import main as train_main

    y = make_corpus(tmp_path)
    bad = tmp_path / "bad.yaml"
    for text, words in (("trainer: {iterations: 3\n", ["YAML"]), ("trainer:\n  iteratons: 3\n", ["trainer.iterations"]),
                        ("trainer:\n  iterations: lots\n", ["trainer.iterations"]),
                        ("hyperparameters:\n  batch_size: -2\n", ["batch_size"]),
                        ("hyperparameters:\n  learning_rate: .nan\n", ["learning_rate"])):
        bad.write_text(text)
        one_line_error(call(train_main, [f"yaml={bad}"], capsys), *words)
    one_line_error(call(train_main, [f"yaml={y}", "trainer.iterashuns=3"], capsys), "trainer.iterations")
    # a bad .qnt.pt in the training data
    marker = tmp_path / "PWNED"
    planted = _plant(y, "float", marker)
    one_line_error(call(train_main, [f"yaml={y}"], capsys), planted, "integers")
    # trainer.load_state_dict=true from a tampered exported model
    (tmp_path / "ckpt" / "tiny").mkdir(parents=True, exist_ok=True)
    exported = tmp_path / "ckpt" / "tiny" / "model.safetensors"
    exported.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    one_line_error(call(train_main, [f"yaml={y}", "trainer.load_state_dict=true"], capsys), exported)
    assert sorted(p.name for p in (tmp_path / "ckpt" / "tiny").iterdir()) == ["model.safetensors"]
    assert not temp_files(tmp_path)


# ==============================================================================================
# python -m vall_e.config: malformed, hostile and mistyped YAML
# ==============================================================================================

BOMB = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
               for p, c in zip(["", "a", "b", "c", "d", "e", "f", "g"], "abcdefgh"))


def _yaml_cases(marker: Path) -> dict[str, tuple[str | bytes, list[str]]]:
    def nest(s: str) -> str:  # under trainer.deepspeed.config, a free-form mapping
        return "trainer:\n  deepspeed:\n    config:\n" + "".join("      " + ln + "\n" for ln in s.splitlines())

    return {
        "tab": ("trainer:\n\titerations: 3\n", ["malformed YAML", "line 2"]),
        "unclosed": ("trainer: {iterations: 3\n", ["malformed YAML"]),
        "not_utf8": (b"trainer:\n  iterations: \xff\xfe\n", ["UTF-8"]),
        "a_list": ("- trainer\n- model\n", ["mapping"]),
        "python_tag": (f"trainer: !!python/object/apply:builtins.open ['{marker}', 'w']\n", ["malformed YAML"]),
        "python_name": ("trainer: !!python/name:os.system\n", ["malformed YAML"]),
        "duplicate_key": ("trainer:\n  iterations: 3\n  iterations: 4\n", ["duplicate key 'iterations'"]),
        "alias_bomb": (nest(BOMB), ["100000 values"]),
        "recursive_alias": (nest("a: &a [*a]"), ["100000 values"]),
        "deep_nesting": (nest("x: " + "[" * 5000 + "]" * 5000), ["nested too deeply"]),
        "unknown_key": ("trainer:\n  iterashuns: 3\n", ["trainer.iterashuns", "trainer.iterations"]),
        "unknown_section": ("trainr:\n  iterations: 3\n", ["trainr", "trainer"]),
        "mistyped": ("trainer:\n  iterations: many\n", ["trainer.iterations", "int"]),
        "section_scalar": ("trainer: 5\n", ["trainer", "section"]),
        "bad_choice": ("model:\n  backbone: gpt5\n", ["model.backbone"]),
        "infinite": ("hyperparameters:\n  learning_rate: .inf\n", ["learning_rate", "finite"]),
        "negative": ("dataset:\n  workers: -4\n", ["dataset.workers", "negative"]),
        "name_format_attr": ("dataset:\n  speaker_name_format: '{group.__class__}'\n  training: [g/s]\n", None),
    }


def test_config_subprocess_malformed_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n\titerations: 3\n")
    one_line_error(run_cmd(["-m", "vall_e.config", f"yaml={bad}"], tmp_path), bad, "malformed YAML")


def test_config_hostile_yaml_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vall_e.config.__main__ import main

    marker = tmp_path / "PWNED"
    for name, (text, words) in _yaml_cases(marker).items():
        if words is None:
            continue
        f = tmp_path / f"{name}.yaml"
        f.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        r = call(main, [f"yaml={f}"], capsys)
        one_line_error(r, f, *words)
        assert r.seconds < 10, (name, r.seconds)
    assert not marker.exists()
    # plain YAML types that JSON lacks (dates, binary) in a free-form section still print
    f = tmp_path / "dates.yaml"
    f.write_text("trainer:\n  deepspeed:\n    config: {when: 2001-12-14, blob: !!binary aGVsbG8=}\n")
    r = call(main, [f"yaml={f}"], capsys)
    succeeded(r)
    assert json.loads(r.out)["trainer"]["deepspeed"]["config"]["when"] == "2001-12-14"


def test_config_hostile_overrides(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from vall_e.config.__main__ import main

    for arg, words in ((f"trainer.deepspeed.config={{x: {'[' * 4000}{']' * 4000}}}", ["nested too deeply"]),
                       ("trainer.deepspeed.config={a: &a [" + ",".join("x" * 10) + "], "
                        + ", ".join(f"{c}: &{c} [{','.join([f'*{p}'] * 10)}]" for p, c in zip("abcd", "bcde")) + "}",
                        ["100000 values"]),
                       ("trainer.iterations=!!python/object/apply:os.system [true]", ["trainer.iterations"]),
                       ("hyperparameters.learning_rate=nan", ["finite"]),
                       ("yaml=/nonexistent/config.yaml", ["config.yaml", "not found"]),
                       (f"yaml={tmp_path}", ["cannot read"]),
                       ("model.n_levels=0", ["model.n_levels"])):
        r = call(main, [arg], capsys)
        one_line_error(r, *words)
        assert r.seconds < 10


def test_speaker_name_format_cannot_reach_python_attributes(tmp_path: Path) -> None:
    from vall_e.config import load_config
    from vall_e.data.listing import list_split

    y = make_corpus(tmp_path)
    for fmt in ("{group.__class__}", "{speaker.__init__.__globals__}", "{group[0]}", "{0}", "{group!r}"):
        cfg = load_config(y, {"dataset.speaker_name_format": f"'{fmt}'"})
        with pytest.raises(UserError, match="speaker_name_format"):
            list_split(cfg, "training")


# ==============================================================================================
# python -m vall_e.eval
# ==============================================================================================

def _eval_list(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_eval_subprocess_non_utf8_list(tmp_path: Path) -> None:
    lst = tmp_path / "items.jsonl"
    lst.write_bytes(b'{"text": "caf\xe9", "prompt": "v.wav"}\n')
    (tmp_path / "wavs").mkdir()
    r = run_cmd(["-m", "vall_e.eval", "--wavs", "wavs", "--list", str(lst), "--asr", "none",
                 "--speaker-encoder", "none", "--out", "report.json", "--no-progress"], tmp_path)
    one_line_error(r, lst, "UTF-8")
    assert not (tmp_path / "report.json").exists()


def test_eval_hostile_lists_and_audio(audio: dict[str, Path], model_file: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from vall_e.evaluation.evaluate import main

    wavs = tmp_path / "wavs"
    wavs.mkdir()
    shutil.copy(audio["voice"], wavs / "0001.wav")
    report = tmp_path / "report.json"
    base = ["--asr", "none", "--speaker-encoder", "none", "--out", str(report), "--no-progress"]
    lst = tmp_path / "items.jsonl"
    v = str(audio["voice"])
    cases = [
        ([], [lst.name, "empty"]),
        ([{"text": "", "prompt": v}], ["text"]),
        ([{"text": "Hello", "prompt": v, "evil": "1"}], ["evil"]),
        ([{"text": "Hello", "prompt": str(audio["real2h"])}], ["real2h.flac", "7200"]),
        ([{"text": "Hello", "prompt": v, "reference": str(audio["header2h"])}], ["header2h.wav"]),
        ([{"text": "Hello", "prompt": str(audio["corrupt"])}], ["corrupt.wav"]),
        ([{"text": "Hello", "prompt": str(audio["empty"])}], ["empty.wav"]),
        ([{"text": "Hello", "prompt": str(tmp_path / "missing.wav")}], ["missing.wav"]),
    ]
    for rows, words in cases:
        _eval_list(lst, rows)
        r = call(main, ["--wavs", str(wavs), "--list", str(lst), *base], capsys)
        one_line_error(r, *words)
        assert r.seconds < 20 and not report.exists()
    # a hostile synthesized clip in the --wavs folder
    _eval_list(lst, [{"text": "Hello there", "prompt": v}])
    for name in ("corrupt", "truncated", "header2h"):
        shutil.copy(audio[name], wavs / "0001.wav")
        one_line_error(call(main, ["--wavs", str(wavs), "--list", str(lst), *base], capsys), "0001.wav")
        assert not report.exists()
    # a tampered model
    edited = _edit_model(model_file, tmp_path / "edited.safetensors", codec="[1]")
    one_line_error(call(main, ["--model", str(edited), "--list", str(lst), *base], capsys), edited)
    # 100k characters of text: scored, quickly (no recognizer: only the text's normalisation runs)
    shutil.copy(audio["voice"], wavs / "0001.wav")
    _eval_list(lst, [{"text": _long_text(), "prompt": v}])
    r = call(main, ["--wavs", str(wavs), "--list", str(lst), *base], capsys)
    succeeded(r)
    assert r.seconds < 30 and json.loads(report.read_text())["n_items"] == 1
    assert not temp_files(tmp_path)


# ==============================================================================================
# property-based tests (what tests/test_text.py, test_config.py and test_data.py do not cover)
# ==============================================================================================

_yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True),
                          st.text(max_size=12))
_yaml_values = st.recursive(_yaml_scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                               st.dictionaries(st.text(max_size=10), c, max_size=4)),
                            max_leaves=12)
_config_keys = st.sampled_from(["trainer", "model", "dataset", "hyperparameters", "codec", "seed", "device",
                                "evaluation", "inference", "bitsandbytes", "cfg_path", "trainr", "x"])
_field_keys = st.sampled_from(["iterations", "size", "training", "batch_size", "name", "speaker_languages",
                               "learning_rate", "deepspeed", "config", "betas", "duration_range", "nope"])
_config_trees = st.dictionaries(_config_keys, st.one_of(_yaml_values, st.dictionaries(_field_keys, _yaml_values,
                                                                                      max_size=4)), max_size=4)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@example(tree={"cfg_path": {}}, noise="", cut=0)  # was accepted as the folder "{}"
@given(tree=_config_trees, noise=st.text(alphabet=st.sampled_from(list(":-[]{}&*!|>'\"#%@`\t\n ,?")), max_size=8),
       cut=st.integers(0, 400))
def test_property_yaml_files_load_or_raise_one_line_user_error(tree: dict, noise: str, cut: int) -> None:
    """Any YAML text (valid, cut short, or with stray syntax) loads into a Config or raises one line."""
    from vall_e.config import Config, load_config

    text = yaml.safe_dump(tree, allow_unicode=True)
    text = text[:cut] + noise + text[cut:]
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "c.yaml"
        f.write_text(text, encoding="utf-8")
        try:
            cfg = load_config(f)
        except UserError as e:
            assert str(e) and "\n" not in str(e)
            return
        assert isinstance(cfg, Config)
        parsed = yaml.safe_load(text)
        if isinstance(parsed, dict) and "cfg_path" in parsed:  # only a scalar can name the folder
            v = parsed["cfg_path"]
            assert isinstance(v, (str, int, float)) and not isinstance(v, bool) and cfg.cfg_path == Path(str(v))
        else:
            assert cfg.cfg_path == Path(tmp)
        json.dumps(cfg.to_dict(), default=str)


_json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(), st.text(max_size=4)),
                            lambda c: st.one_of(st.lists(c, max_size=5), st.dictionaries(st.text(max_size=4), c,
                                                                                        max_size=5)),
                            max_leaves=20)


@settings(max_examples=150, deadline=None)
@given(data=st.one_of(_json_values, st.dictionaries(st.sampled_from(["<pad>", "<s>", "</s>", " ", "a", "b", "ə", ""]),
                                                    st.integers(-1, 8), max_size=8)),
       as_text=st.booleans())
def test_property_stored_maps_parse_or_raise_user_error(data: Any, as_text: bool) -> None:
    """A symbol or language map from a file (JSON of any shape) parses into a consistent map or raises."""
    from vall_e.text.languages import LanguageMap
    from vall_e.text.symmap import SPECIALS, Symmap

    raw = json.dumps(data) if as_text else data
    try:
        sm = Symmap.from_json(raw, source="s.json")
    except UserError as e:
        assert "\n" not in str(e)
    else:
        assert sm.symbols[: len(SPECIALS)] == list(SPECIALS)
        assert Symmap.from_json(sm.to_json()) == sm and [sm[s] for s in sm.symbols] == list(range(len(sm)))
    try:
        lm = LanguageMap.from_json(raw, source="l.json")
    except UserError as e:
        assert "\n" not in str(e)
    else:
        assert sorted(lm.to_dict().values()) == list(range(len(lm))) and LanguageMap.from_json(lm.to_json()) == lm


@pytest.fixture(scope="module")
def h5_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    from vall_e.config import load_config
    from vall_e.data.hdf5 import build_hdf5

    root = tmp_path_factory.mktemp("h5prop")
    y = make_corpus(root, n=3)
    build_hdf5(load_config(y, {"dataset.validation_fraction": "0"}), progress=False, version=1)
    return y, (root / "data.h5").read_bytes()


_h5_edits = st.sampled_from(["none", "dtype", "ndim", "values", "levels", "text_values", "text_dtype", "frames",
                             "phones", "symmap", "codec", "drop_audio", "drop_text"])


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(edit=_h5_edits, which=st.integers(0, 2), value=st.integers(-40000, 40000),
       dtype=st.sampled_from(["int8", "uint16", "int32", "int64", "float16", "float64"]))
def test_property_hdf5_reader_loads_or_raises_user_error(h5_corpus: tuple[Path, bytes], edit: str, which: int,
                                                         value: int, dtype: str) -> None:
    """A data.h5 edited anywhere: items load with valid shapes and ranges, or a one-line UserError."""
    import h5py

    from vall_e.config import load_config
    from vall_e.data.dataset import VALLEDataset

    y, good = h5_corpus
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(y.parent / "grp", root / "grp")
        shutil.copy(y, root / "config.yaml")
        (root / "data.h5").write_bytes(good)
        with h5py.File(root / "data.h5", "r+") as f:
            g = f[_h5_keys(f)[which]]
            a, t = g["audio"][()], g["text"][()]
            if edit in ("dtype", "ndim", "values", "levels", "drop_audio"):
                del g["audio"]
                a = {"dtype": a.astype(dtype), "ndim": a.reshape(-1), "levels": a[:, :1], "drop_audio": None,
                     "values": np.full_like(a, value % 32768) - (value < 0)}[edit]
                if a is not None:
                    g.create_dataset("audio", data=a)
            elif edit in ("text_values", "text_dtype", "drop_text"):
                del g["text"]
                t = {"text_values": np.full_like(t, value % 32768), "text_dtype": t.astype(dtype),
                     "drop_text": None}[edit]
                if t is not None:
                    g.create_dataset("text", data=t)
            elif edit in ("frames", "phones"):
                g.attrs[edit] = value
            elif edit in ("symmap", "codec"):
                del f[edit]
                f.create_dataset(edit, data=json.dumps(value) if value % 2 else "{" + str(value))
        cfg = load_config(root / "config.yaml", {"dataset.use_hdf5": "true", "dataset.validation_fraction": "0",
                                                 "dataset.validate": "false"})
        ds = None
        try:
            ds = VALLEDataset(cfg, "train")
            for i in range(len(ds)):
                it = ds[i]
                assert it["resps"].dtype == torch.long and it["resps"].dim() == 2 and it["resps"].shape[1] == 2
                assert 0 <= int(it["resps"].min()) and int(it["resps"].max()) < 1024
                assert int(it["text"].min()) >= 0 and int(it["text"].max()) < len(ds.symmap)
        except UserError as e:
            assert str(e) and "\n" not in str(e)
        finally:
            if ds is not None and ds._h5 is not None:
                ds._h5.close()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(cut=st.integers(0, 4000), flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(1, 255)), max_size=4),
       fmt=st.sampled_from(["WAV", "FLAC", "RAW"]), channels=st.integers(1, 3))
def test_property_audio_bytes_load_or_raise_user_error(cut: int, flips: list[tuple[int, int]], fmt: str,
                                                       channels: int) -> None:
    """Any prefix of an audio file with any bytes flipped: mono float32 finite audio, or one line."""
    from vall_e.utils.audio import load_audio

    rng = np.random.default_rng(cut)
    x = (0.3 * rng.standard_normal((1600, channels))).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / f"a.{fmt.lower()}"
        if fmt == "RAW":
            f.write_bytes(rng.bytes(cut))
        else:
            sf.write(f, x, 16000, format=fmt)
            data = bytearray(f.read_bytes()[: max(cut, 1)] if cut < 4000 else f.read_bytes())
            for pos, b in flips:
                if data:
                    data[pos % len(data)] ^= b
            f.write_bytes(bytes(data))
        try:
            wav = load_audio(f, SR, max_seconds=5)
        except UserError as e:
            assert str(e) and "\n" not in str(e) and "a." in str(e)
            return
        assert wav.dtype == torch.float32 and wav.ndim == 1 and wav.numel() > 0 and torch.isfinite(wav).all()


_texts = st.one_of(st.text(max_size=30),
                   st.sampled_from(TEXTS + ["", " ", "\ud800", "\x00\x01", "?!", "ǅ", "e\u0301", "A" * 600, "١٢٣"]))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@example(texts=["«", "«"])  # phonemizer joined the two lines: the whole batch failed, naming no file
@given(texts=st.lists(_texts, min_size=1, max_size=5))
def test_property_batched_g2p_matches_single_and_isolates_errors(texts: list[str]) -> None:
    """phonemize_many(on_error="return"): each text gets exactly what phonemize gives it alone (tokens
    or a one-line UserError), so one bad transcript never changes or hides the others' output."""
    from vall_e.text.phonemes import phonemize, phonemize_many

    batch = phonemize_many(texts, on_error="return")
    assert len(batch) == len(texts)
    for text, got in zip(texts, batch):
        try:
            alone: Any = phonemize(text)
        except UserError as e:
            alone = e
        if isinstance(alone, UserError):
            assert isinstance(got, UserError) and "\n" not in str(got)
        else:
            assert got == alone

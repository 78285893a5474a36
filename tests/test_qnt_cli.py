"""The `.qnt.pt` codes format and the `python -m vall_e.emb.qnt` command."""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from vall_e.emb.codes import load_codes, read_codes, save_codes
from vall_e.emb.qnt import main as qnt_main
from vall_e.utils.errors import UserError, run_main

SPEC = {"name": "encodec", "n_levels": 8, "n_codes": 1024, "sample_rate": 24000, "frame_rate": 75.0}


# ----- the codes file -----

def test_codes_round_trip(tmp_path: Path) -> None:
    codes = torch.randint(0, 1024, (37, 8))
    f = save_codes(tmp_path / "a.qnt.pt", codes, SPEC)
    raw = torch.load(f, weights_only=True)
    assert raw["codes"].dtype == torch.int16 and raw["codes"].shape == (37, 8) and raw["codec"] == SPEC
    back, spec = read_codes(f)
    assert back.dtype == torch.long and torch.equal(back, codes) and spec == SPEC
    assert [p.name for p in tmp_path.iterdir()] == ["a.qnt.pt"]


def test_reference_format_is_accepted(tmp_path: Path) -> None:
    codes = torch.randint(0, 1024, (1, 8, 50), dtype=torch.int64)  # the reference's [1, L, T]
    f = tmp_path / "ref.qnt.pt"
    torch.save(codes, f)
    back, spec = read_codes(f)
    assert spec is None and back.shape == (50, 8) and torch.equal(back, codes[0].t())


def bad(path: Path, match: str, **kw) -> None:
    with pytest.raises(UserError) as e:
        load_codes(path, **kw)
    assert str(path) in str(e.value) and match in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bad_codes_files(tmp_path: Path) -> None:
    bad(tmp_path / "missing.qnt.pt", "no such")
    cases = {
        "float": {"codes": torch.rand(10, 8), "codec": SPEC},
        "shape": {"codes": torch.zeros(2, 10, 8, dtype=torch.int16), "codec": SPEC},
        "empty": {"codes": torch.zeros(0, 8, dtype=torch.int16), "codec": SPEC},
        "range": {"codes": torch.full((10, 8), 1024, dtype=torch.int16), "codec": SPEC},
        "negative": {"codes": torch.full((10, 8), -1, dtype=torch.int16), "codec": SPEC},
        "nokey": {"tokens": torch.zeros(10, 8, dtype=torch.int16)},
        "levels": {"codes": torch.zeros(10, 4, dtype=torch.int16), "codec": SPEC},
        "list": [1, 2, 3],
    }
    expected = {"float": "integers", "shape": "shape", "empty": "empty", "range": "[0, 1024)",
                "negative": "[0, 1024)", "nokey": "'codes'", "levels": "4 code levels, 8 needed", "list": "list"}
    for name, obj in cases.items():
        f = tmp_path / f"{name}.qnt.pt"
        torch.save(obj, f)
        bad(f, expected[name])
    # The caller's code range wins over the stored one.
    ok = tmp_path / "ok.qnt.pt"
    save_codes(ok, torch.full((4, 8), 600), SPEC)
    bad(ok, "[0, 512)", n_codes=512)
    # Truncated and garbage files.
    trunc = tmp_path / "trunc.qnt.pt"
    trunc.write_bytes(ok.read_bytes()[: ok.stat().st_size // 2])
    bad(trunc, "corrupt or truncated")
    junk = tmp_path / "junk.qnt.pt"
    junk.write_bytes(b"\x00not a torch file at all")
    with pytest.raises(UserError, match="junk.qnt.pt"):
        load_codes(junk)


class _Exploit:
    """Unpickling this would create the file `marker` (a harmless stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    zip_file = tmp_path / "zip.qnt.pt"
    torch.save({"codes": torch.zeros(3, 8, dtype=torch.int16), "codec": _Exploit(marker)}, zip_file)
    raw_file = tmp_path / "raw.qnt.pt"
    raw_file.write_bytes(pickle.dumps(_Exploit(marker), protocol=2))
    # Sanity check: plain unpickling really would run it.
    pickle.loads(raw_file.read_bytes()).close()
    assert marker.exists()
    marker.unlink()
    for f in (zip_file, raw_file):
        with pytest.raises(UserError, match="refused to load"):
            load_codes(f)
        assert not marker.exists()


def test_save_codes_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        save_codes(tmp_path / "x.qnt.pt", torch.zeros(8), SPEC)
    with pytest.raises(ValueError):
        save_codes(tmp_path / "x.qnt.pt", torch.full((3, 8), 40_000), SPEC)
    assert list(tmp_path.iterdir()) == []


# ----- the qnt command -----

def write_wav(path: Path, seconds: float, sr: int = 24_000, seed: int = 0) -> Path:
    from vall_e.codecs.tiny_encodec import speechlike_audio

    path.parent.mkdir(parents=True, exist_ok=True)
    wav = speechlike_audio(seconds, sample_rate=sr, seed=seed).numpy()
    sf.write(path, wav, sr)
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    write_wav(root / "g" / "spk1" / "a.wav", 0.6, seed=1)
    write_wav(root / "g" / "spk1" / "b.normalized.wav", 0.9, sr=16_000, seed=2)
    write_wav(root / "g" / "spk2" / "c.wav", 0.3, sr=44_100, seed=3)
    write_wav(root / "g" / "spk2" / "d.flac", 0.5, seed=4)
    return root


def run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        run_main(qnt_main, argv)
    return int(e.value.code)


def outputs(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.qnt.pt"))


def test_qnt_writes_skips_and_matches_codec(corpus: Path, tiny_encodec_dir: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from vall_e.codecs import build_codec
    from vall_e.utils.audio import load_audio

    model = f"codec.model={tiny_encodec_dir}"
    assert run([str(corpus), model, "--batch-size", "2"]) == 0
    assert outputs(corpus) == ["g/spk1/a.qnt.pt", "g/spk1/b.qnt.pt", "g/spk2/c.qnt.pt"]
    codec = build_codec({"name": "encodec", "model": str(tiny_encodec_dir)})
    for name, seconds in (("g/spk1/a", 0.6), ("g/spk1/b", 0.9), ("g/spk2/c", 0.3)):
        codes, spec = read_codes(corpus / f"{name}.qnt.pt")
        assert codes.shape == (math.ceil(seconds * 75 - 1e-9), 8)
        assert spec["name"] == "encodec" and spec["model"] == str(tiny_encodec_dir) and spec["n_levels"] == 8
        wav_name = next((corpus / name).parent.glob(Path(name).name + ".*wav"))
        expect = codec.encode(load_audio(wav_name, 24_000))
        assert (codes != expect).any(1).float().mean() <= 0.05
    # A re-run skips finished files without rewriting them.
    stamps = {p: p.stat().st_mtime_ns for p in corpus.rglob("*.qnt.pt")}
    capsys.readouterr()
    assert run([str(corpus), model]) == 0
    assert "already encoded" in capsys.readouterr().err
    assert stamps == {p: p.stat().st_mtime_ns for p in corpus.rglob("*.qnt.pt")}
    # Another suffix picks the other files; one missing output is filled in.
    (corpus / "g/spk1/a.qnt.pt").unlink()
    assert run([str(corpus), model, "--suffix", ".flac"]) == 0
    assert "g/spk2/d.qnt.pt" in outputs(corpus) and "g/spk1/a.qnt.pt" not in outputs(corpus)
    assert run([str(corpus), model]) == 0
    assert len(outputs(corpus)) == 4
    assert not [p for p in corpus.rglob("*") if p.name.startswith(".")]  # no temporary files


def test_qnt_bad_file_stops_with_one_line(corpus: Path, tiny_encodec_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    bad_wav = corpus / "g" / "spk2" / "broken.wav"
    bad_wav.write_bytes((corpus / "g/spk1/a.wav").read_bytes()[:30])
    silent = corpus / "g" / "spk2" / "zz_silent.wav"
    sf.write(silent, np.zeros(2400, np.float32), 24_000)
    capsys.readouterr()
    assert run([str(corpus), f"codec.model={tiny_encodec_dir}", "--batch-size", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {bad_wav}: cannot read audio")
    # Files before the bad one (in sorted order) are finished; nothing partial is left for it.
    assert outputs(corpus) == ["g/spk1/a.qnt.pt", "g/spk1/b.qnt.pt"]
    assert not [p for p in corpus.rglob("*") if p.name.startswith(".")]
    bad_wav.unlink()
    assert run([str(corpus), f"codec.model={tiny_encodec_dir}"]) == 2
    assert f"error: {silent}: the audio is silent" in capsys.readouterr().err
    assert "g/spk2/c.qnt.pt" in outputs(corpus)


def test_qnt_argument_errors(corpus: Path, tmp_path: Path, tiny_encodec_dir: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    model = f"codec.model={tiny_encodec_dir}"
    assert run([str(tmp_path / "nowhere"), model]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert run([str(corpus), model, "--fit"]) == 2
    assert "--fit only applies to codec.name=world" in capsys.readouterr().err
    assert run([str(corpus), "codec.name=nope"]) == 2
    assert "unknown codec 'nope'" in capsys.readouterr().err
    write_wav(corpus / "g" / "spk1" / "a.other.wav", 0.2)
    assert run([str(corpus), model]) == 2
    assert "same id 'a'" in capsys.readouterr().err
    assert outputs(corpus) == []


def test_qnt_fit_world(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    world = pytest.importorskip("vall_e.codecs.world")
    try:
        world.import_pyworld()
    except Exception as e:  # pyworld is an optional dependency
        pytest.skip(f"pyworld unavailable: {e}")
    assert run([str(corpus), "codec.name=world", "--fit"]) == 0
    books = corpus / "codebooks.safetensors"
    assert books.is_file()
    codes, spec = read_codes(corpus / "g/spk1/a.qnt.pt")
    assert spec["name"] == "world" and Path(spec["codebooks"]) == books.resolve()
    assert codes.shape == (45, 8)
    assert "fitted codebooks" in capsys.readouterr().err

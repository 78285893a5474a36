"""`python -m vall_e.emb.g2p`: writes {id}.phn.txt beside transcripts, resumes, stops cleanly on bad files."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vall_e.emb.g2p import main
from vall_e.text import phonemize, read_phonemes
from vall_e.utils.errors import run_main

ROOT = Path(__file__).resolve().parents[1]


def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(main, [*argv, "--quiet"])
    return e.value.code, capsys.readouterr()


def _hidden(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".")]


def test_writes_phonemes_recursively_and_skips_existing(tmp_path, capsys):
    (tmp_path / "grp" / "spk").mkdir(parents=True)
    (tmp_path / "grp" / "spk" / "u1.normalized.txt").write_text("Hello world.", encoding="utf-8")
    (tmp_path / "top.txt").write_text("Good morning, friend!", encoding="utf-8")
    done = tmp_path / "old.phn.txt"
    (tmp_path / "old.txt").write_text("Not phonemized again.", encoding="utf-8")
    done.write_text("SENTINEL", encoding="utf-8")

    code, out = _run([str(tmp_path)], capsys)
    assert code == 0, out.err
    u1 = tmp_path / "grp" / "spk" / "u1.phn.txt"
    assert read_phonemes(u1) == phonemize("Hello world.")
    assert read_phonemes(tmp_path / "top.phn.txt") == phonemize("Good morning, friend!")
    assert done.read_text(encoding="utf-8") == "SENTINEL"  # existing output untouched
    assert "wrote 2" in out.out and "1 already" in out.out

    mtime = u1.stat().st_mtime_ns
    code, out = _run([str(tmp_path)], capsys)
    assert code == 0 and "wrote 0" in out.out and u1.stat().st_mtime_ns == mtime
    assert not _hidden(tmp_path)


def test_language_flag_and_config_override(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("Guten Tag", encoding="utf-8")
    code, out = _run([str(tmp_path), "--language", "de"], capsys)
    assert code == 0, out.err
    assert read_phonemes(tmp_path / "a.phn.txt") == phonemize("Guten Tag", "de")
    (tmp_path / "a.phn.txt").unlink()
    code, out = _run([str(tmp_path), "dataset.language=de"], capsys)
    assert code == 0, out.err
    assert read_phonemes(tmp_path / "a.phn.txt") == phonemize("Guten Tag", "de")


def test_non_utf8_file_stops_with_path_and_exit_2(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("First file.", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 latin-1")
    (tmp_path / "c.txt").write_text("Third file.", encoding="utf-8")
    code, out = _run([str(tmp_path)], capsys)
    assert code == 2
    lines = out.err.strip().splitlines()
    assert lines[-1].startswith("error: ") and str(tmp_path / "b.txt") in lines[-1] and "UTF-8" in lines[-1]
    assert (tmp_path / "a.phn.txt").is_file()  # done before the bad file: kept
    assert not (tmp_path / "b.phn.txt").exists()
    assert not _hidden(tmp_path)  # no temporary or partial outputs


def test_empty_transcript_and_bad_arguments(tmp_path, capsys):
    (tmp_path / "e.txt").write_text("   \n", encoding="utf-8")
    code, out = _run([str(tmp_path)], capsys)
    assert code == 2 and f"{tmp_path / 'e.txt'}: text is empty" in out.err
    assert not (tmp_path / "e.phn.txt").exists()

    code, out = _run([str(tmp_path / "missing")], capsys)
    assert code == 2 and "not a folder" in out.err
    code, out = _run([str(tmp_path), "--suffix", ".lab"], capsys)
    assert code == 2 and "no *.lab files" in out.err
    code, out = _run([str(tmp_path), "--language", "xx"], capsys)
    assert code == 2 and "unsupported language 'xx'" in out.err


def test_two_transcripts_for_one_output_is_an_error(tmp_path, capsys):
    (tmp_path / "u.original.txt").write_text("One.", encoding="utf-8")
    (tmp_path / "u.normalized.txt").write_text("One.", encoding="utf-8")
    code, out = _run([str(tmp_path)], capsys)
    assert code == 2 and "--suffix" in out.err and "u.phn.txt" in out.err
    code, out = _run([str(tmp_path), "--suffix", ".normalized.txt"], capsys)
    assert code == 0 and (tmp_path / "u.phn.txt").is_file()


def test_command_line_exit_code(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"\xff\xff")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "vall_e.emb.g2p", str(tmp_path), "--quiet"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'x.txt'}:")
    assert "Traceback" not in r.stderr

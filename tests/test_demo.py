"""`vall-e demo` end to end on a reduced budget (slow): corpus -> g2p -> WORLD fit + qnt -> train ->
export -> synthesize held-out sentences -> MCD table.

What this shows is the plumbing: every stage runs offline and writes its outputs. It does not show
that the model learns to speak; at this budget it cannot (see the README's "Where it stands")."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_on_a_reduced_budget(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "vall_e.demo", "--out", str(out), "--speakers", "2", "--utterances", "10",
           "--heldout", "2", "--train-minutes", "0.5", "--codes", "64", "--d-model", "64", "--layers", "2",
           "--heads", "4", "--batch-size", "4", "--threads", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "minutes in all" in proc.stdout  # says up front how long it will take
    report = json.loads((out / "metrics.json").read_text())
    items = report["mcd_dtw_db"]["items"]
    assert len(items) == 2 * 2  # 2 voices x 2 held-out sentences (a third clip per voice is the prompt)
    for row in items:
        for col in ("trained", "trained_other_text", "untrained", "other_sentence"):
            assert math.isfinite(row[col]) and row[col] > 0, row
    wavs = sorted(p.name for p in (out / "wavs").glob("*.wav"))
    assert len(wavs) == 4 * len(items)  # trained, trained with the other text, untrained, espeak
    for name in wavs:
        info = sf.info(out / "wavs" / name)
        assert info.samplerate == 24_000 and info.frames > 0
    assert (out / "loss.png").stat().st_size > 0 and (out / "metrics.md").exists()
    assert list((out / "ckpt").rglob("model.safetensors"))
    print("\n" + (out / "metrics.md").read_text())

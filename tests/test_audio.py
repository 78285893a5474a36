"""Audio loading/saving: downmix, resampling, formats, and one-line errors for bad files."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from vall_e.utils import audio
from vall_e.utils.audio import audio_to_bytes, concat_with_pauses, load_audio, peak_normalize, save_audio
from vall_e.utils.errors import UserError


def sine(freq: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def dominant_freq(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * sr / len(x))


def check_error(path: Path, match: str, **kw) -> str:
    with pytest.raises(UserError) as e:
        load_audio(path, **kw)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    assert match in msg, msg
    return msg


# ----- loading -----

def test_eight_channels_are_averaged(tmp_path: Path) -> None:
    base = sine(300, 0.5, 16_000)
    chans = np.stack([base * (c + 1) / 8 for c in range(8)], axis=1)  # channel c = base * (c+1)/8
    chans[:, 0] = 0.0  # channel 0 silent: keeping only it (the reference's behaviour) would fail
    f = tmp_path / "eight.wav"
    sf.write(f, chans, 16_000, subtype="FLOAT")
    wav = load_audio(f, 16_000)
    assert wav.dtype == torch.float32 and wav.ndim == 1 and wav.numel() == len(base)
    np.testing.assert_allclose(wav.numpy(), chans.mean(axis=1), atol=1e-6)


@pytest.mark.parametrize("sr_in,channels", [(8_000, 1), (44_100, 2), (24_000, 1)])
def test_resampled_to_target_rate(tmp_path: Path, sr_in: int, channels: int) -> None:
    x = sine(440, 1.0, sr_in, amp=0.4)
    data = np.stack([x] * channels, axis=1) if channels > 1 else x
    f = tmp_path / f"in_{sr_in}.flac"
    sf.write(f, data, sr_in)
    wav = load_audio(f, 24_000).numpy()
    assert abs(len(wav) - 24_000) <= 2
    assert abs(dominant_freq(wav, 24_000) - 440) < 3
    assert abs(np.abs(wav[2000:-2000]).max() - 0.4) < 0.02


def test_mp3_and_ogg_load(tmp_path: Path) -> None:
    x = sine(500, 1.0, 24_000)
    for ext in ("mp3", "ogg"):
        f = tmp_path / f"a.{ext}"
        sf.write(f, x, 24_000)
        wav = load_audio(f, 24_000).numpy()
        assert abs(len(wav) - len(x)) < 2400
        assert abs(dominant_freq(wav, 24_000) - 500) < 3


def test_missing_and_zero_byte_files(tmp_path: Path) -> None:
    check_error(tmp_path / "nope.wav", "no such audio file")
    f = tmp_path / "zero.wav"
    f.write_bytes(b"")
    check_error(f, "empty")


def test_corrupt_and_truncated_files(tmp_path: Path) -> None:
    good = tmp_path / "good.wav"
    sf.write(good, sine(200, 1.0, 24_000), 24_000)
    raw = good.read_bytes()
    header_only = tmp_path / "header.wav"
    header_only.write_bytes(raw[:30])
    check_error(header_only, "cannot read audio")
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF" + bytes(range(256)) * 8)
    check_error(garbage, "cannot read audio")
    half = tmp_path / "half.wav"
    half.write_bytes(raw[: len(raw) // 2])
    check_error(half, "truncated")
    flac = tmp_path / "good.flac"
    sf.write(flac, sine(200, 1.0, 24_000), 24_000)
    half_flac = tmp_path / "half.flac"
    half_flac.write_bytes(flac.read_bytes()[: flac.stat().st_size // 2])
    with pytest.raises(UserError, match="half.flac"):
        load_audio(half_flac)
    assert load_audio(good).numel() == 24_000  # the intact file still loads


def test_empty_and_silent_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 24_000)
    check_error(empty, "no audio samples")
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(24_000, np.float32), 24_000)
    check_error(silent, "silent")
    hiss = tmp_path / "hiss.wav"
    sf.write(hiss, (np.random.default_rng(0).standard_normal(24_000) * 1e-6).astype(np.float32), 24_000,
             subtype="FLOAT")
    check_error(hiss, "silent")
    assert load_audio(silent, allow_silent=True).abs().max() == 0


def test_too_long_is_rejected_from_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "long.wav"
    sf.write(f, sine(200, 3.0, 8_000), 8_000)

    def no_read(*a, **k):
        raise AssertionError("the samples must not be decoded")

    monkeypatch.setattr(audio.sf, "read", no_read)
    check_error(f, "longer than", max_seconds=2.0)
    monkeypatch.undo()
    assert load_audio(f, 8_000, max_seconds=3.5).numel() == 24_000


# ----- saving -----

@pytest.mark.parametrize("ext", ["wav", "flac"])
def test_save_lossless_round_trip(tmp_path: Path, ext: str) -> None:
    x = torch.from_numpy(sine(330, 0.5, 22_050))
    f = save_audio(tmp_path / f"out.{ext}", x, 22_050)
    back = load_audio(f, 22_050)
    assert torch.allclose(back, x, atol=1.5 / 32768)
    assert sf.info(f).format == ext.upper()
    assert [p.name for p in tmp_path.iterdir()] == [f"out.{ext}"]  # no temporary files left


@pytest.mark.parametrize("ext", ["mp3", "ogg"])
def test_save_lossy_formats_decode(tmp_path: Path, ext: str) -> None:
    x = torch.from_numpy(sine(440, 1.0, 24_000))
    f = save_audio(tmp_path / f"out.{ext}", x, 24_000)
    back = load_audio(f, 24_000).numpy()
    assert abs(len(back) - 24_000) < 2400
    assert abs(dominant_freq(back, 24_000) - 440) < 3
    assert 0.3 < np.abs(back).max() < 0.7


def test_save_format_argument_and_errors(tmp_path: Path) -> None:
    x = torch.from_numpy(sine(440, 0.2, 24_000))
    f = save_audio(tmp_path / "noext", x, 24_000, format="flac")
    assert sf.info(f).format == "FLAC"
    with pytest.raises(UserError, match="unsupported audio format 'xyz'"):
        save_audio(tmp_path / "a.xyz", x, 24_000)
    with pytest.raises(UserError, match="unsupported"):
        save_audio(tmp_path / "nosuffix", x, 24_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noext"]


def test_save_clips_instead_of_wrapping(tmp_path: Path) -> None:
    x = torch.full((1000,), 1.5)
    x[500:] = -3.0
    back = load_audio(save_audio(tmp_path / "loud.wav", x, 24_000), 24_000)
    assert back[:500].min() > 0.99 and back[500:].max() < -0.99


def test_audio_to_bytes() -> None:
    x = torch.from_numpy(sine(440, 0.5, 24_000))
    pcm = audio_to_bytes(x, 24_000, "pcm")
    assert len(pcm) == 2 * x.numel()
    ints = np.frombuffer(pcm, dtype="<i2")
    np.testing.assert_allclose(ints / 32767.0, x.numpy(), atol=1 / 32767)
    for fmt in ("wav", "flac", "mp3", "ogg"):
        data, sr = sf.read(io.BytesIO(audio_to_bytes(x, 24_000, fmt)), dtype="float32")
        assert sr == 24_000 and abs(len(data) - x.numel()) < 2400, fmt
        assert abs(dominant_freq(data, sr) - 440) < 5, fmt
    with pytest.raises(UserError):
        audio_to_bytes(x, 24_000, "aac")


def test_peak_normalize_and_concat() -> None:
    x = torch.tensor([0.1, -0.2, 0.05])
    y = peak_normalize(x, 0.9)
    assert torch.isclose(y.abs().max(), torch.tensor(0.9)) and torch.allclose(y / y.abs().max(), x / 0.2)
    z = torch.zeros(5)
    assert torch.equal(peak_normalize(z), z)
    a, b = torch.ones(100), 2 * torch.ones(50)
    out = concat_with_pauses([a, b], 1000, 0.02)
    assert out.numel() == 170
    assert torch.equal(out[:100], a) and out[100:120].abs().sum() == 0 and torch.equal(out[120:], b)
    assert torch.equal(concat_with_pauses([a], 1000, 1.0), a)
    assert concat_with_pauses([], 1000, 1.0).numel() == 0

"""The EnCodec codec through transformers, on a tiny EnCodec saved and reloaded like a hub model."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from vall_e.codecs import build_codec, clear_codec_cache
from vall_e.codecs.encodec import EncodecCodec
from vall_e.codecs.tiny_encodec import speechlike_audio
from vall_e.utils.errors import UserError


@pytest.fixture(scope="module")
def codec(tiny_encodec_dir: Path) -> EncodecCodec:
    torch.set_num_threads(1)
    c = build_codec({"name": "encodec", "model": str(tiny_encodec_dir)})
    assert isinstance(c, EncodecCodec)
    return c


def test_folder_looks_like_a_hub_checkpoint(tiny_encodec_dir: Path) -> None:
    names = {p.name for p in tiny_encodec_dir.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= names
    assert json.loads((tiny_encodec_dir / "preprocessor_config.json").read_text())["sampling_rate"] == 24_000
    assert json.loads((tiny_encodec_dir / "config.json").read_text())["model_type"] == "encodec"


def test_layout_and_spec(codec: EncodecCodec, tiny_encodec_dir: Path) -> None:
    assert (codec.sample_rate, codec.frame_rate, codec.n_levels, codec.n_codes) == (24_000, 75.0, 8, 1024)
    spec = codec.spec()
    assert spec["name"] == "encodec" and spec["model"] == str(tiny_encodec_dir) and spec["bandwidth"] == 6.0
    assert spec["n_levels"] == 8
    # A stored spec (with extra keys) and a config-like object rebuild the same cached codec.
    assert build_codec(spec) is codec
    cfg = type("CodecConfig", (), {})()
    cfg.name, cfg.model, cfg.bandwidth, cfg.codebooks = "encodec", str(tiny_encodec_dir), 6.0, ""
    assert build_codec(cfg) is codec


def test_encode_shape_and_variety(codec: EncodecCodec) -> None:
    wav = speechlike_audio(2.0, seed=11)
    codes = codec.encode(wav)
    assert codes.dtype == torch.long and codes.shape == (150, 8)
    assert codes.min() >= 0 and codes.max() < 1024
    for level in range(8):  # an untrained EnCodec would give all zeros
        assert codes[:, level].unique().numel() > 5, level
    assert codec.encode(speechlike_audio(1.01, seed=1)).shape == (76, 8)
    other = codec.encode(speechlike_audio(2.0, seed=12))
    assert (other != codes).float().mean() > 0.5


def test_decode_lengths_and_fewer_levels(codec: EncodecCodec) -> None:
    wav = speechlike_audio(1.3, seed=3)
    codes = codec.encode(wav)
    full = codec.decode(codes)
    assert full.dtype == torch.float32 and full.ndim == 1
    assert full.numel() == codes.shape[0] * 320 and 0 <= full.numel() - wav.numel() < 320
    assert torch.isfinite(full).all() and full.abs().max() > 1e-3
    prev_err = None
    for levels in (1, 4, 8):
        part = codec.decode(codes[:, :levels])
        assert part.shape == full.shape
        err = (part - full).pow(2).mean().item()
        if prev_err is not None:
            assert err < prev_err  # more levels -> closer to the full decode
        prev_err = err
    assert prev_err == 0.0
    assert codec.decode(codes[:, 0]).shape == full.shape  # [T] means one level
    with pytest.raises(ValueError, match="levels"):
        codec.decode(torch.zeros(10, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="1024"):
        codec.decode(torch.full((10, 8), 1024))


def test_batch_equals_single(codec: EncodecCodec) -> None:
    seconds = [0.4, 1.9, 0.77, 0.1, 0.05, 1.2, 0.013, 0.11]
    wavs = [speechlike_audio(s, seed=20 + i) for i, s in enumerate(seconds)]
    single = [codec.encode(w) for w in wavs]
    batch = codec.encode_batch(wavs)
    for s, a, b in zip(seconds, single, batch):
        assert a.shape == b.shape
        if a.shape[0] < codec.min_batch_frames:
            assert torch.equal(a, b), s  # short clips would see the batch padding: they are coded alone
        else:
            # Batched kernels round differently, which can flip a near-tie in a rare frame.
            assert (a != b).any(1).float().mean() <= 0.05, s
    mixed = [single[0], single[1][:, :4], single[2], single[3], single[4][:, :2], single[6]]
    for codes, wav in zip(mixed, codec.decode_batch(mixed)):
        assert torch.allclose(codec.decode(codes), wav, atol=1e-4)


def test_other_bandwidth(tiny_encodec_dir: Path) -> None:
    c = build_codec({"name": "encodec", "model": str(tiny_encodec_dir), "bandwidth": 3.0})
    assert c.n_levels == 4
    assert c.encode(speechlike_audio(0.5, seed=5)).shape == (38, 4)
    with pytest.raises(UserError, match="codec.bandwidth=12.0 is not supported.*1.5, 3, 6"):
        build_codec({"name": "encodec", "model": str(tiny_encodec_dir), "bandwidth": 12.0})


def test_missing_models_are_user_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    clear_codec_cache()
    # No network here: offline mode makes the hub lookup fail at once instead of retrying.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        build_codec({"name": "encodec", "model": "nobody/no-such-encodec"})
    msg = str(e.value)
    assert "codec.model" in msg and "nobody/no-such-encodec" in msg and "codec.model=DIR" in msg and "\n" not in msg
    assert time.monotonic() - start < 30
    with pytest.raises(UserError, match="no such folder"):
        build_codec({"name": "encodec", "model": str(tmp_path / "missing" / "model")})
    with pytest.raises(UserError, match="no config.json"):
        build_codec({"name": "encodec", "model": str(tmp_path)})
    with pytest.raises(UserError, match="unknown codec 'nope'; available: .*encodec"):
        build_codec({"name": "nope"})

"""Our Vocos (EnCodec variant) against the original's output at random weights.

tests/fixtures/vallex/vocos.json (tensors as text): gemelo-ai/vocos@c859e3b's own Vocos (torchaudio and encodec
stubbed), weights `random_vocos_state_dict(77)`, 2 x 30 frames of 8-level codes decoded at 6 kbps
(bandwidth id 2), as VALL-E X decodes (scripts/make_vallex_fixtures.py --parts vocos).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vall_e.codecs.vocos import VocosDecoding, load_vocos, random_vocos_state_dict
from vall_e.utils.errors import UserError

from tests.tensor_fixtures import read_tensor_json

FIXTURE = Path(__file__).parent / "fixtures" / "vallex" / "vocos.json"

# charactr/vocos-encodec-24khz's config.yaml: the model section of vocos' configs/vocos-encodec.yaml
CONFIG = """\
feature_extractor:
  class_path: vocos.feature_extractors.EncodecFeatures
  init_args:
    encodec_model: encodec_24khz
    bandwidths: [1.5, 3.0, 6.0, 12.0]
    train_codebooks: false
backbone:
  class_path: vocos.models.VocosBackbone
  init_args:
    input_channels: 128
    dim: 384
    intermediate_dim: 1152
    num_layers: 8
    adanorm_num_embeddings: 4
head:
  class_path: vocos.heads.ISTFTHead
  init_args:
    dim: 384
    n_fft: 1280
    hop_length: 320
    padding: same
"""


@pytest.fixture(scope="module")
def vocos_dir(tmp_path_factory) -> Path:
    """A folder laid out like the hub repo: config.yaml + pytorch_model.bin (a torch.save'd state dict)."""
    d = tmp_path_factory.mktemp("vocos")
    (d / "config.yaml").write_text(CONFIG)
    torch.save(random_vocos_state_dict(77), d / "pytorch_model.bin")
    return d


def test_waveform_matches_original(vocos_dir):
    ref, _ = read_tensor_json(FIXTURE)
    model = load_vocos(vocos_dir)
    with torch.inference_mode():
        wav = model(ref["codes"], bandwidth_id=2)
    assert wav.shape == ref["wav"].shape
    diff = float((wav - ref["wav"]).abs().max())
    print(f"vocos: max abs sample diff {diff:.2e} (peak {float(ref['wav'].abs().max()):.3f})")
    assert diff < 1e-4


def test_a_wrong_bandwidth_changes_the_waveform(vocos_dir):
    """The comparison can fail: the 12 kbps conditioning gives another waveform."""
    ref, _ = read_tensor_json(FIXTURE)
    with torch.inference_mode():
        wav = load_vocos(vocos_dir)(ref["codes"], bandwidth_id=3)
    assert float((wav - ref["wav"]).abs().max()) > 1e-3


def test_pickle_with_code_is_refused(vocos_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(vocos_dir, bad)
    torch.save({"x": Path("/etc")}, bad / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin"):
        load_vocos(bad)


def test_missing_folder_and_offline_hub_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="needs config.yaml"):
        load_vocos(tmp_path)
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)  # read at import: the variable alone comes too late
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(UserError, match="not in huggingface_hub's cache; give --vocoder a folder") as e:
        load_vocos("charactr/vocos-encodec-24khz")
    assert "\n" not in str(e.value)


def test_vocos_needs_an_encodec_codec(vocos_dir):
    class World:
        name = "world"

    with pytest.raises(UserError, match="EnCodec"):
        VocosDecoding(World(), source=vocos_dir)


def test_engine_decodes_through_vocos_from_a_folder(vocos_dir, tiny_encodec_dir):
    """`--vocoder DIR`: the engine's codec decodes with our Vocos (the tiny EnCodec is 24 kHz, hop 320)."""
    from vall_e.codecs import build_codec
    from vall_e.generation.tts import _with_vocoder

    codec = build_codec({"name": "encodec", "model": str(tiny_encodec_dir), "bandwidth": 6.0})
    assert _with_vocoder(codec, {}, None, None) is codec  # a model without a default keeps EnCodec
    vocos = _with_vocoder(codec, {}, str(vocos_dir), None)
    ref, _ = read_tensor_json(FIXTURE)
    wav = vocos.decode(ref["codes"][0])
    assert torch.allclose(wav, ref["wav"][0], atol=1e-4)
    with pytest.raises(UserError, match="Vocos folder"):
        _with_vocoder(codec, {}, "/no/such/folder", None)

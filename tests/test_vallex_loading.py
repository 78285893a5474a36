"""Loading published VALL-E checkpoints: the restricted unpickler, the converter, and the engine end to end.

The files are made here like VALL-E X's: `torch.save({"model": state_dict, ...})` with a
`pathlib.WindowsPath` in it (tiny random weights in their layout, `random_state_dict`).
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vall_e.utils.errors import UserError
from vall_e.models.vallex import VallexConfig
from vall_e.models.vallex_checkpoint import load_pickled_checkpoint, load_vallex_model, random_state_dict, resolve

REPO = Path(__file__).resolve().parents[1]
TINY = VallexConfig(d_model=32, n_heads=2, n_layers=2)


class _WindowsPathLike:
    """Pickles as pathlib.WindowsPath('exp', 'valle') the way a Windows machine's torch.save does."""

    def __reduce__(self):
        return (pathlib.WindowsPath, ("exp", "valle"))


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def vallex_pt(tmp_path) -> Path:
    path = tmp_path / "vallex-checkpoint.pt"
    torch.save({"model": random_state_dict(TINY, 5), "args": {"exp_dir": _WindowsPathLike()}}, path)
    return path


def test_checkpoint_with_windows_path_loads(vallex_pt):
    obj = load_pickled_checkpoint(vallex_pt)
    assert str(obj["args"]["exp_dir"]) == "exp/valle"
    model, local, kind = load_vallex_model(vallex_pt, n_heads=2)
    assert kind == "vallex" and local == vallex_pt
    assert model.config.n_langs == 3 and model.config.prepend_bos and model.config.tied_heads


def test_any_other_global_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Evil(marker)}, path)
    with pytest.raises(UserError) as e:
        load_pickled_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "system" in msg
    assert not marker.exists()


def test_damaged_and_wrong_files_are_one_line_errors(tmp_path, vallex_pt):
    short = tmp_path / "short.pt"
    short.write_bytes(vallex_pt.read_bytes()[:1000])
    with pytest.raises(UserError, match="short.pt"):
        load_pickled_checkpoint(short)
    other = tmp_path / "other.pt"
    torch.save({"model": {"decoder.weight": torch.zeros(2)}}, other)
    with pytest.raises(UserError, match="no VALL-E weights"):
        load_vallex_model(other)
    with pytest.raises(UserError, match="not found"):
        load_pickled_checkpoint(tmp_path / "missing.pt")


def test_offline_hub_address_is_one_line_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError) as e:
        resolve("hf://Plachta/VALL-E-X")
    assert "vallex-checkpoint.pt" in str(e.value) and "cache" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="name the file"):
        resolve("hf://someone/unknown")


def test_convert_writes_a_self_contained_file_with_the_same_logits(vallex_pt, tmp_path, tiny_encodec_dir):
    from vall_e.models.vallex_convert import convert
    from vall_e.models.model_file import load_exported

    out = convert(vallex_pt, tmp_path / "vallex.safetensors", n_heads=2, codec_model=str(tiny_encodec_dir))
    models, meta = load_exported(out)
    original, _, _ = load_vallex_model(vallex_pt, n_heads=2)
    ours = models["ar+nar"]
    assert json.loads(meta["extra"]["text_frontend"])["name"] == "vallex"
    assert meta["extra"]["vocoder"] == "vocos" and meta["codec"]["bandwidth"] == 6.0
    text, prompt = torch.tensor([16, 24, 49, 2048 + 30]), torch.randint(0, 1024, (6, 8))
    with torch.inference_mode():
        a, _ = ours.ar_prefill([text], None, [prompt], 4)
        b, _ = original.ar_prefill([text], None, [prompt], 4)
        assert torch.equal(a, b)
        resp = torch.randint(0, 1024, (5, 8))
        assert torch.equal(ours.nar_pass([text], None, [prompt], [resp], 3)[0],
                           original.nar_pass([text], None, [prompt], [resp], 3)[0])


def test_engine_synthesizes_with_a_converted_model_and_reference_text(vallex_pt, tiny_encodec_dir):
    from vall_e.codecs import build_codec
    from vall_e.models.vallex_convert import load_foreign
    from vall_e.generation.settings import GenerationSettings
    from vall_e.generation.tts import TTS
    from vall_e.generation.sampling import SamplingParams
    from vall_e.text.vallex import VallexFrontend

    models, meta = load_foreign(vallex_pt, n_heads=2)
    codec = build_codec({"name": "encodec", "model": str(tiny_encodec_dir), "bandwidth": 6.0})
    tts = TTS(models, meta, codec)
    plain = tts.encode_text("Hello there.", "en")
    with_ref = tts.encode_text("Hello there.", "en", reference_text="Good morning.")
    front = VallexFrontend()
    assert plain.tolist() == front.encode("Hello there.", "en")
    assert with_ref.tolist() == front.encode("Good morning.", "en", force_language="en") + plain.tolist()
    ref = 0.1 * torch.randn(24_000)
    greedy = SamplingParams(temperature=0.0, ras_window=0)
    settings = GenerationSettings(ar=greedy, nar=greedy, max_ar_steps=12, reference_text="Good morning.")
    assert tts._own_length("Hello there.", with_ref, "en", settings) == len(plain)  # STOP floor: the text's own ids
    wav = tts.synthesize(["Hello there."], ref, settings)[0]
    assert wav.ndim == 1 and 0 < wav.numel() <= 12 * 320 and torch.isfinite(wav).all()
    chunks = list(tts.stream("Hello there.", ref, settings, chunk_frames=4, first_chunk_frames=4, lookahead=2))
    assert torch.isfinite(torch.cat(chunks)).all()


def _converted_model_and_reference(vallex_pt, tmp_path, tiny_encodec_dir):
    """(subprocess env, `python -m vall_e.convert`'s output, a 1 s noise reference wav) for the CLI tests."""
    import soundfile as sf

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    model = tmp_path / "vallex.safetensors"
    r = subprocess.run([sys.executable, "-m", "vall_e.convert", str(vallex_pt), str(model), "--n-heads", "2",
                        "--codec-model", str(tiny_encodec_dir)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ref = tmp_path / "ref.wav"
    sf.write(ref, (0.1 * torch.randn(24_000)).numpy(), 24_000)
    return env, model, ref


def test_cli_runs_a_converted_checkpoint(vallex_pt, tmp_path, tiny_encodec_dir):
    """`python -m vall_e.convert` then `python -m vall_e --model X.safetensors --vocoder encodec`."""
    import soundfile as sf

    env, model, ref = _converted_model_and_reference(vallex_pt, tmp_path, tiny_encodec_dir)
    out = tmp_path / "out.wav"
    r = subprocess.run([sys.executable, "-m", "vall_e", "Hello there.", str(ref), str(out), "--model", str(model),
                        "--vocoder", "encodec", "--max-ar-steps", "10", "--reference-text", "Good morning.",
                        "--device", "cpu", "--seed", "1"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    wav, sr = sf.read(out)
    assert sr == 24_000 and 0 < len(wav) <= 10 * 320
    bad = subprocess.run([sys.executable, "-m", "vall_e.convert", str(tmp_path / "nope.pt")], capture_output=True,
                         text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nope.pt" in bad.stderr


def test_cli_speaks_japanese_with_a_converted_checkpoint(vallex_pt, tmp_path, tiny_encodec_dir):
    """`python -m vall_e "[JA]...[JA]"` (several sentences, no spaces) with a Japanese prompt
    transcript; needs the vallex-ja extra."""
    pytest.importorskip("pyopenjtalk")
    import soundfile as sf

    env, model, ref = _converted_model_and_reference(vallex_pt, tmp_path, tiny_encodec_dir)
    out = tmp_path / "out.wav"
    r = subprocess.run([sys.executable, "-m", "vall_e", "[JA]こんにちは。今日はいい天気ですね。[JA]", str(ref), str(out),
                        "--model", str(model), "--vocoder", "encodec", "--max-ar-steps", "6",
                        "--reference-text", "おはようございます。", "--language", "auto", "--device", "cpu",
                        "--pause", "0.5", "--seed", "1"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    wav, sr = sf.read(out)
    assert sr == 24_000 and 12_000 < len(wav) <= 12_000 + 2 * 6 * 320  # two sentences of <= 6 frames, one pause


def test_amphion_checkpoint_folder_loads_and_speaks(tmp_path, tiny_encodec_dir):
    """An Amphion-style folder: pytorch_model.bin (a plain state dict) under checkpoint/..., with
    args.json (heads, prefix mode) and symbols.dict at the top."""
    from vall_e.codecs import build_codec
    from vall_e.models.vallex_convert import load_foreign
    from vall_e.generation.settings import GenerationSettings
    from vall_e.generation.tts import TTS
    from vall_e.generation.sampling import SamplingParams
    from vall_e.text.amphion import phones

    config = VallexConfig(d_model=32, n_heads=2, n_layers=2, n_text_tokens=512, n_langs=0, prepend_bos=False,
                          nar_prompt_all_levels=False)
    ckpt = tmp_path / "checkpoint" / "final_epoch" / "pytorch_model.bin"
    ckpt.parent.mkdir(parents=True)
    torch.save(random_state_dict(config, 9), ckpt)
    (tmp_path / "args.json").write_text(json.dumps({"model": {"nhead": 2, "prefix_mode": 0}}))
    symbols = sorted(set(phones("Hello there.")))
    (tmp_path / "symbols.dict").write_text("".join(f"{p} {i}\n" for i, p in enumerate(symbols)))
    models, meta = load_foreign(ckpt)
    assert models["ar+nar"].config == config
    assert json.loads(meta["extra"]["text_frontend"])["name"] == "amphion" and meta["extra"]["vocoder"] == "encodec"
    tts = TTS(models, meta, build_codec({"name": "encodec", "model": str(tiny_encodec_dir), "bandwidth": 6.0}))
    greedy = SamplingParams(temperature=0.0, ras_window=0)
    wav = tts.synthesize("Hello there.", 0.1 * torch.randn(24_000),
                         GenerationSettings(ar=greedy, nar=greedy, max_ar_steps=8))[0]
    assert 0 < wav.numel() <= 8 * 320
    with pytest.raises(UserError, match="lacks"):
        tts.encode_text("Zebras jump.")


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_engine_options_run_a_vallex_model(dtype):
    """bfloat16, int8 (dynamically quantized linears, tied heads included), beam search and a
    rolling AR context on the ported model."""
    import json as _json

    from vall_e.generation.tts import TTS
    from vall_e.models.vallex_checkpoint import build_from_state_dict
    from vall_e.generation.sampling import SamplingParams
    from vall_e.text.symmap import Symmap
    from vall_e.text.vallex import VallexFrontend

    model = build_from_state_dict(random_state_dict(TINY, 3), "seed 3", n_heads=2)
    meta = {"symmap": Symmap().to_json(), "extra": {"text_frontend": _json.dumps(VallexFrontend().spec())}}
    tts = TTS({"ar+nar": model}, meta, codec=None, dtype=dtype)
    ids = [tts.encode_text("Hello there.", "en")]
    langs, prompt = torch.zeros(1, dtype=torch.long), [torch.randint(0, 1024, (10, 8))]
    greedy = SamplingParams(temperature=0.0, ras_window=0, max_ar_context=8)
    level0 = tts.generate_ar(ids, langs, prompt, greedy, [20], max_repeat_frames=10**6)
    codes = tts.generate_nar(ids, langs, prompt, level0, greedy)
    assert codes[0].shape == (20, 8)
    beam = tts.generate_ar(ids, langs, prompt, SamplingParams(temperature=1.0, beam_width=3), [12])
    assert 0 < len(beam[0]) <= 12

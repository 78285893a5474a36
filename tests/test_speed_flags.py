"""The engine's speed options as user flags: `--dtype int8` and `--compile` in the CLI, the HTTP server
and the web UI reach `TTS.from_pretrained`; int8 really quantizes; bad combinations are one-line errors;
and (slow) the compiled AR decode step gives the eager engine's greedy codes."""
from __future__ import annotations

import copy
import importlib.util
import shutil
import time
from pathlib import Path

import pytest
import soundfile as sf
import torch

from vall_e.utils.errors import UserError, run_main

torch.set_num_threads(1)

TEXTS = ["Hello there, how are you?", "Good morning."]


def _tiny_model(d_model: int = 32, n_heads: int = 2, n_layers: int = 2):
    """A tiny untrained ar+nar model and its symbol map."""
    from tests.conftest import build_tiny_model

    return build_tiny_model(TEXTS, d_model, n_heads, n_layers)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, tiny_encodec_dir) -> Path:
    """The tiny model exported with the tiny EnCodec's spec."""
    from tests.conftest import export_tiny_model

    model, cfg, symmap = _tiny_model()
    return export_tiny_model(tmp_path_factory.mktemp("model") / "model.safetensors", model, cfg, symmap,
                             tiny_encodec_dir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    from tests.conftest import write_reference

    return write_reference(tmp_path_factory.mktemp("ref") / "voice.wav")


class _Loaded(Exception):
    """Raised by a stand-in `from_pretrained` to stop a command right after it asked for the model."""


@pytest.fixture
def capture_load(monkeypatch):
    """Replace TTS.from_pretrained with one that records its arguments and stops the command."""
    from vall_e.generation.tts import TTS

    calls: list[tuple[tuple, dict]] = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        raise _Loaded

    monkeypatch.setattr(TTS, "from_pretrained", staticmethod(fake))
    return calls


def _linears(tts) -> tuple[int, int]:
    """(plain float nn.Linear count, dynamically quantized Linear count) over the engine's models."""
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    plain = quant = 0
    for model in tts.models.values():
        for m in model.modules():
            plain += type(m) is torch.nn.Linear
            quant += isinstance(m, QLinear)
    return plain, quant


# ------------------------------------------------------------------ CLI


def test_cli_int8_writes_audio_with_quantized_linears(model_file, reference, tmp_path, monkeypatch):
    from vall_e.generation.tts import TTS
    from vall_e.serving.synthesize import main

    engines = []
    real = TTS.from_pretrained

    def spy(*args, **kwargs):
        engines.append(real(*args, **kwargs))
        return engines[-1]

    monkeypatch.setattr(TTS, "from_pretrained", staticmethod(spy))
    out = tmp_path / "out.wav"
    assert main(["Hello there.", str(reference), str(out), "--model", str(model_file), "--device", "cpu",
                 "--dtype", "int8", "--max-ar-steps", "20", "--max-nar-levels", "2", "--seed", "1"]) == 0
    info = sf.info(out)
    assert info.frames > 0 and info.samplerate == engines[0].sample_rate
    tts, = engines
    assert tts.quantized and tts.dtype == torch.float32  # activations stay float32
    plain, quant = _linears(tts)
    assert plain == 0 and quant > 0, (plain, quant)


def test_cli_passes_dtype_and_compile(capture_load, model_file, reference, tmp_path):
    from vall_e.serving.synthesize import build_parser, main

    args = build_parser().parse_args(["t", "r"])
    assert (args.dtype, args.compile) == ("float32", False)
    for extra, want in ((["--dtype", "int8"], ("int8", False)), (["--compile"], ("float32", True)),
                        (["--dtype", "bfloat16", "--compile"], ("bfloat16", True))):
        with pytest.raises(_Loaded):
            main(["Hi.", str(reference), str(tmp_path / "x.wav"), "--model", str(model_file), *extra])
        _, kwargs = capture_load[-1]
        assert (kwargs["dtype"], kwargs["compile"]) == want
    with pytest.raises(SystemExit):
        build_parser().parse_args(["t", "r", "--dtype", "int4"])


def test_cli_bad_combinations_are_one_line_errors(model_file, reference, tmp_path, capsys):
    """int8 is CPU-only dynamic quantization, and the compiled step needs float weights: the engine
    refuses both before any work, and the CLI shows one line, no traceback, no output file."""
    from vall_e.serving.synthesize import main

    out = tmp_path / "x.wav"
    for extra, words in ((["--device", "cuda", "--dtype", "int8"], "int8"),
                         (["--device", "cpu", "--dtype", "int8", "--compile"], "compile")):
        with pytest.raises(SystemExit) as e:
            run_main(main, ["Hi.", str(reference), str(out), "--model", str(model_file), *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
        assert "Traceback" not in err
    assert not out.exists()


# ------------------------------------------------------------------ server and web UI


def test_server_passes_dtype_and_compile(capture_load, model_file):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from vall_e.serving import server

    args = server.build_parser().parse_args([])
    assert (args.dtype, args.compile) == ("float32", False)
    with pytest.raises(_Loaded):  # stops before uvicorn starts
        server.main(["--model", str(model_file), "--port", "0", "--device", "cpu", "--dtype", "int8", "--compile"])
    (path, *_), kwargs = capture_load[-1]
    assert Path(path) == model_file
    assert kwargs == {"device": "cpu", "dtype": "int8", "compile": True}


def test_webui_engine_passes_dtype_and_compile():
    from vall_e.serving.options import ENGINE_DTYPES
    from vall_e.serving.webui import Engine, build_parser

    assert "int8" in ENGINE_DTYPES
    args = build_parser().parse_args(["--dtype", "int8", "--compile"])
    assert (args.dtype, args.compile) == ("int8", True)
    assert build_parser().parse_args([]).compile is False
    loads = []

    def loader(path, **kwargs):
        loads.append((path, kwargs))
        return object()

    Engine(loader=loader, compile=True).get("m.safetensors", "cpu", "int8")
    Engine(loader=loader).get("m.safetensors", "cpu", "float32")
    assert loads[0] == ("m.safetensors", {"device": "cpu", "dtype": "int8", "compile": True})
    assert loads[1][1].get("compile", False) is False


def test_webui_main_passes_dtype_and_compile(capture_load, model_file):
    pytest.importorskip("gradio")
    from vall_e.serving import webui

    with pytest.raises(_Loaded):  # the fail-fast load, before the page is built
        webui.main(["--model", str(model_file), "--device", "cpu", "--dtype", "int8", "--compile"])
    (path, *_), kwargs = capture_load[-1]
    assert path == str(model_file)
    assert kwargs == {"device": "cpu", "dtype": "int8", "compile": True}


def test_webui_int8_on_cuda_is_a_user_error(model_file):
    from vall_e.serving.webui import Engine

    with pytest.raises(UserError, match="int8"):
        Engine().get(str(model_file), "cuda", "int8")


# ------------------------------------------------------------------ compiled decode step


def _compile_unavailable() -> str | None:
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "no C++ compiler: torch.compile's CPU backend cannot build"
    if importlib.util.find_spec("torch._inductor") is None:
        return "this torch has no inductor"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_compile_unavailable() is not None, reason=str(_compile_unavailable()))
def test_compiled_decode_gives_the_eager_greedy_codes():
    """Greedy AR codes of TTS(compile=True) equal the eager engine's on the same tiny model and inputs
    (d_model 64, 2 layers, 30 forced steps, a batch of two with different prefix lengths)."""
    import torch._dynamo

    from vall_e.generation.sampling import SamplingParams
    from vall_e.generation.tts import TTS

    model, _, symmap = _tiny_model(d_model=64, n_heads=4, n_layers=2)
    meta = {"symmap": symmap}
    eager = TTS({"ar+nar": copy.deepcopy(model)}, meta, codec=None, device="cpu")
    compiled = TTS({"ar+nar": copy.deepcopy(model)}, meta, codec=None, device="cpu", compile=True)
    assert compiled.ar_model.backbone._compiled is not None and eager.ar_model.backbone._compiled is None

    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 1024, (n, 8), generator=g) for n in (12, 20)]
    text_ids = [eager.encode_text(t) for t in TEXTS]
    langs = torch.zeros(len(TEXTS), dtype=torch.long)
    greedy = SamplingParams(temperature=0.0, ras_window=0)
    steps = [30, 30]

    want = eager.generate_ar(text_ids, langs, prompts, greedy, steps, min_steps=steps)
    torch._dynamo.utils.counters.clear()
    start = time.perf_counter()
    got = compiled.generate_ar(text_ids, langs, prompts, greedy, steps, min_steps=steps)
    elapsed = time.perf_counter() - start
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the compiled graph really ran
    assert [w.shape[0] for w in want] == [30, 30]
    for w, c in zip(want, got):
        assert torch.equal(w, c), (w, c)
    print(f"compiled greedy AR (compilation included): {elapsed:.1f} s")

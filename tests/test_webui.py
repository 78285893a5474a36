"""The Gradio web UI: every control reaches the settings, the handler passes them to the TTS, and a
real headless Chromium synthesizes speech through the page served by `python -m vall_e.webui`."""
from __future__ import annotations

import importlib.util
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import soundfile as sf
import torch

from vall_e.serving.webui import (CONTROL_NAMES, CONTROLS, DEFAULTS, Engine, parse_listen, settings_from_ui,
                                  synthesize_to_file)
from vall_e.generation.settings import GenerationSettings
from vall_e.utils.errors import UserError

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("VALLE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HAVE_GRADIO = importlib.util.find_spec("gradio") is not None

# control name -> (a non-default value, where it lands in GenerationSettings, the value expected there,
#                  other controls it needs to act). Every control must be listed (see the next test).
EXPECTED = {
    "ar_temp": (0.5, lambda s: s.ar.temperature, 0.5, {}),
    "nar_temp": (0.7, lambda s: s.nar.temperature, 0.7, {}),
    "max_seconds": (2.0, lambda s: s.max_ar_steps, 150, {}),
    "input_prompt_length": (5.0, lambda s: s.input_prompt_length, 5.0, {}),
    "language": ("de", lambda s: s.language, "de", {}),
    "seed": (42, lambda s: (s.ar.seed, s.nar.seed), (42, 42), {}),
    "top_p": (0.8, lambda s: s.ar.top_p, 0.8, {}),
    "top_k": (25, lambda s: s.ar.top_k, 25, {}),
    "min_p": (0.05, lambda s: s.ar.min_p, 0.05, {}),
    "repetition_penalty": (1.3, lambda s: s.ar.repetition_penalty, 1.3, {}),
    "repetition_penalty_decay": (0.5, lambda s: s.ar.repetition_penalty_decay, 0.5, {}),
    "length_penalty": (0.4, lambda s: s.ar.length_penalty, 0.4, {}),
    "beam_width": (4, lambda s: s.ar.beam_width, 4, {}),  # the reference parsed and dropped this one
    "beam_length_alpha": (0.6, lambda s: s.ar.beam_length_alpha, 0.6, {}),
    "mirostat_tau": (3.0, lambda s: s.ar.mirostat_tau, 3.0, {}),
    "mirostat_eta": (0.3, lambda s: s.ar.mirostat_eta, 0.3, {}),
    "ras_window": (20, lambda s: s.ar.ras_window, 20, {}),
    "ras_ratio": (0.3, lambda s: s.ar.ras_ratio, 0.3, {}),
    "dynamic_temperature": (True, lambda s: (s.ar.min_temperature, s.nar.min_temperature), (0.85, 0.2), {}),
    "min_ar_temp": (0.5, lambda s: s.ar.min_temperature, 0.5, {"dynamic_temperature": True}),
    "min_nar_temp": (0.1, lambda s: s.nar.min_temperature, 0.1, {"dynamic_temperature": True}),
    "dynamic_temperature_mode": ("entropy", lambda s: (s.ar.dynamic_temperature_mode, s.nar.dynamic_temperature_mode),
                                 ("entropy", "entropy"), {"dynamic_temperature": True}),
    "context_seconds": (2.0, lambda s: s.ar.max_ar_context, 150, {}),  # also dropped by the reference
    "max_nar_levels": (3, lambda s: s.max_nar_levels, 3, {}),
    "max_repeat_seconds": (1.0, lambda s: s.max_repeat_frames, 75, {}),
    "pitch_guard": (4.0, lambda s: s.pitch_guard, 4.0, {}),
    "medusa": (True, lambda s: s.ar.medusa, True, {}),
    "medusa_tree": ("16,8,4", lambda s: s.ar.medusa_tree, "16,8,4", {}),
    "split_sentences": (False, lambda s: s.split_sentences, False, {}),
    "pause": (0.5, lambda s: s.pause, 0.5, {}),
}


# ------------------------------------------------------------------ the UI -> settings mapping


def test_every_control_has_a_mapping_test():
    assert set(EXPECTED) == set(CONTROL_NAMES)
    assert len(CONTROL_NAMES) == len(set(CONTROL_NAMES))


@pytest.mark.parametrize("name", CONTROL_NAMES)
def test_every_control_changes_the_settings(name):
    alt, get, expected, context = EXPECTED[name]
    control = next(c for c in CONTROLS if c.name == name)
    assert alt != control.default
    if control.kind == "slider":
        assert control.minimum <= alt <= control.maximum
    if control.kind == "dropdown" and control.choices:
        assert alt in control.choices
    base = settings_from_ui({**DEFAULTS, **context}, frame_rate=75.0)
    changed = settings_from_ui({**DEFAULTS, **context, name: alt}, frame_rate=75.0)
    assert get(changed) == expected
    assert get(base) != expected
    assert changed != base


def test_defaults_are_the_settings_defaults_and_in_range():
    s = settings_from_ui(DEFAULTS, frame_rate=75.0)
    assert s == GenerationSettings()  # the page shows what every front end uses (tests/test_settings.py)
    assert (s.ar.temperature, s.nar.temperature) == (0.95, 0.2)
    assert s.max_ar_steps == 0 and DEFAULTS["max_seconds"] == 0.0  # follow the text length
    assert s.ar.max_ar_context == -1  # context length 0 = all
    assert not s.ar.dynamic and not s.nar.dynamic
    assert s.ar.seed is None and s.nar.seed is None  # -1 = random
    for c in CONTROLS:
        if c.kind == "slider":
            assert c.minimum <= c.default <= c.maximum, c.name
            assert c.panel in ("basic", "advanced")


def test_seconds_follow_the_codec_frame_rate():
    s = settings_from_ui({**DEFAULTS, "max_seconds": 2.0, "context_seconds": 1.0, "max_repeat_seconds": 3.0},
                         frame_rate=50.0)
    assert (s.max_ar_steps, s.ar.max_ar_context, s.max_repeat_frames) == (100, 50, 150)
    assert settings_from_ui({**DEFAULTS, "max_seconds": 0.0}).max_ar_steps == 0  # follow the text length


def test_mapping_rejects_missing_unknown_and_invalid_values():
    with pytest.raises(ValueError, match="missing"):
        settings_from_ui({k: v for k, v in DEFAULTS.items() if k != "top_k"})
    with pytest.raises(ValueError, match="unknown"):
        settings_from_ui({**DEFAULTS, "typo_temp": 1.0})
    with pytest.raises(UserError, match="mirostat"):
        settings_from_ui({**DEFAULTS, "beam_width": 4, "mirostat_tau": 2.0})
    with pytest.raises(UserError, match="language"):
        settings_from_ui({**DEFAULTS, "language": " "})


# ------------------------------------------------------------------ the Generate handler


class _FakeCodec:
    sample_rate = 16_000
    frame_rate = 50.0


class _FakeTTS:
    """Records what the handler hands to `synthesize`."""

    def __init__(self, path, device, dtype):
        self.key = (path, device, dtype)
        self.codec = _FakeCodec()
        self.sample_rate = self.codec.sample_rate
        self.calls = []

    def synthesize(self, text, references, settings):
        self.calls.append((text, references, settings))
        return [torch.full((1600,), 0.1)]


def test_handler_passes_every_setting_and_reloads_on_model_change(tmp_path):
    loads = []

    def loader(path, device, dtype):
        loads.append((path, device, dtype))
        return _FakeTTS(path, device, dtype)

    engine = Engine("a.safetensors", device="cpu", dtype="float32", loader=loader)
    values = {**DEFAULTS, **{name: alt for name, (alt, _, _, _) in EXPECTED.items()}, "mirostat_tau": 0.0}
    progress = []
    path, info = synthesize_to_file(engine, tmp_path, "Hello.", "ref.wav", "a.safetensors", "cpu", "float32",
                                    values, progress=lambda frac, desc=None: progress.append(desc))
    tts = engine.get("a.safetensors", "cpu", "float32")
    assert len(loads) == 1  # the same model, device and dtype are reused
    text, refs, settings = tts.calls[0]
    assert (text, refs) == ("Hello.", "ref.wav")
    assert settings == settings_from_ui(values, frame_rate=50.0)  # seconds at the codec's frame rate
    assert settings.ar.beam_width == 4 and settings.ar.max_ar_context == 100
    wav, sr = sf.read(path)
    assert sr == 16_000 and len(wav) == 1600
    assert "0.10 s of audio" in info and progress[0] == "Loading model"
    for key in [("b.safetensors", "cpu", "float32"), ("b.safetensors", "cuda", "float32"),
                ("b.safetensors", "cuda", "bfloat16")]:
        synthesize_to_file(engine, tmp_path, "Hi.", "ref.wav", *key, values)
    assert loads[1:] == [("b.safetensors", "cpu", "float32"), ("b.safetensors", "cuda", "float32"),
                         ("b.safetensors", "cuda", "bfloat16")]


def test_failed_reload_then_back_to_the_old_model():
    def loader(path, device, dtype):
        if path == "bad":
            raise UserError("bad: model file not found")
        return _FakeTTS(path, device, dtype)

    engine = Engine(loader=loader)
    assert engine.get("a", "cpu", "float32").key == ("a", "cpu", "float32")
    with pytest.raises(UserError, match="bad"):
        engine.get("bad", "cpu", "float32")
    assert engine.get("a", "cpu", "float32").key == ("a", "cpu", "float32")  # reloaded, not a stale None


def test_handler_user_errors(tmp_path):
    engine = Engine(loader=lambda p, device, dtype: _FakeTTS(p, device, dtype))
    with pytest.raises(UserError, match="empty text"):
        synthesize_to_file(engine, tmp_path, "  ", "ref.wav", "a", "cpu", "float32", DEFAULTS)
    with pytest.raises(UserError, match="reference"):
        synthesize_to_file(engine, tmp_path, "Hi.", None, "a", "cpu", "float32", DEFAULTS)
    with pytest.raises(UserError, match="no model"):
        synthesize_to_file(engine, tmp_path, "Hi.", "ref.wav", "", "cpu", "float32", DEFAULTS)
    with pytest.raises(UserError, match="dtype"):
        synthesize_to_file(engine, tmp_path, "Hi.", "ref.wav", "a", "cpu", "int3", DEFAULTS)


@pytest.mark.skipif(not HAVE_GRADIO, reason="gradio is not installed (pip install 'vall-e[webui]')")
def test_generate_button_is_wired_to_every_control():
    from vall_e.serving.webui import build_ui

    ui = build_ui(Engine("model.safetensors", device="cpu"))
    assert set(ui.controls) == set(CONTROL_NAMES)
    assert all(ui.controls[n] in ui.generate_inputs for n in CONTROL_NAMES)
    config = ui.demo.get_config_file() if hasattr(ui.demo, "get_config_file") else ui.demo.config
    click = [d for d in config["dependencies"] if (ui.generate_button._id, "click") in map(tuple, d["targets"])]
    assert len(click) == 1
    assert {ui.controls[n]._id for n in CONTROL_NAMES} <= set(click[0]["inputs"])
    for c in CONTROLS:  # the widgets carry the declared defaults and ranges
        w = ui.controls[c.name]
        assert w.value == c.default, c.name
        if c.kind == "slider":
            assert (w.minimum, w.maximum) == (c.minimum, c.maximum), c.name


# ------------------------------------------------------------------ command line


def test_parse_listen():
    assert parse_listen("127.0.0.1:7860") == ("127.0.0.1", 7860)
    assert parse_listen("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    for bad in ("7860", "localhost:", "host:port", "host:70000", ":80"):
        with pytest.raises(UserError, match="--listen"):
            parse_listen(bad)


def test_missing_gradio_is_a_user_error(monkeypatch):
    from vall_e.serving import webui

    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` raise ImportError
    with pytest.raises(UserError, match=r"pip install 'vall-e\[webui\]'"):
        webui.main(["--model", "whatever.safetensors"])


@pytest.mark.skipif(not HAVE_GRADIO, reason="gradio is not installed (pip install 'vall-e[webui]')")
def test_bad_model_path_fails_before_serving(tmp_path):
    from vall_e.serving import webui

    with pytest.raises(UserError, match="nope.safetensors"):  # raised before launch(), which would block
        webui.main(["--model", str(tmp_path / "nope.safetensors"), "--listen", "127.0.0.1:1"])


# ------------------------------------------------------------------ a real browser


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser_missing() -> str | None:
    if not HAVE_GRADIO:
        return "gradio is not installed (pip install 'vall-e[webui]')"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (.ci/install-browser.sh installs it)"
    if not (os.access(CHROMIUM, os.X_OK) or shutil.which("chromium")):
        return f"no Chromium at {CHROMIUM} (.ci/install-browser.sh installs Debian's chromium)"
    return None


@pytest.fixture
def server(request, model_file, tmp_path):
    """`python -m vall_e.webui` on a free loopback port; killed by a finalizer."""
    port = _free_port()
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "vall_e.webui", "--model", str(model_file), "--listen",
                             f"127.0.0.1:{port}", "--device", "cpu"], cwd=REPO, env=_env(), stdout=log,
                            stderr=subprocess.STDOUT)

    def stop():
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()

    request.addfinalizer(stop)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 150
    while True:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"the web UI exited with {proc.returncode}:\n{log.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            log.seek(0)
            pytest.fail(f"the web UI did not answer on {url}:\n{log.read()[-3000:]}")
        time.sleep(0.5)
    return url, proc, log


def test_browser_generates_speech(server, tmp_path):
    """Headless Chromium: type text, upload a reference, Generate, and the page's audio element holds a wav."""
    missing = _browser_missing()
    if missing:
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    from vall_e.codecs.tiny_encodec import speechlike_audio
    from vall_e.utils.audio import save_audio
    from vall_e.utils.io import atomic_write_bytes

    url, proc, log = server
    reference = tmp_path / "voice.wav"
    save_audio(reference, speechlike_audio(2.0, seed=3), 24_000)
    chromium = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(90_000)
            page.goto(url)
            page.wait_for_selector("#generate-btn")
            page.fill("#text-input textarea", "Hello there, how are you?")
            for name, value in (("max_seconds", "0.5"), ("seed", "1")):  # a short, reproducible run
                box = page.locator(f"#ctl-{name} input[type=number]")
                box.fill(value)
                box.press("Enter")
                box.blur()
            page.set_input_files("#reference-audio input[type=file]", str(reference))
            # the upload is done when the reference component shows its player
            page.wait_for_selector("#reference-audio [data-testid=waveform-controls], #reference-audio audio[src]",
                                   state="attached")
            page.click("#generate-btn")
            try:
                page.wait_for_function(
                    "() => { const a = document.querySelector('#output-audio audio');"
                    " return a && a.src && a.readyState >= 1 && a.duration > 0; }")
            except Exception:
                failure = REPO / "artifacts" / "webui-failure.png"
                failure.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(failure, page.screenshot(full_page=True))
                log.seek(0)
                pytest.fail(f"no audio in the page (screenshot: {failure}); page text:\n"
                            f"{page.inner_text('body')[:2000]}\nserver log:\n{log.read()[-3000:]}")
            src = page.eval_on_selector("#output-audio audio", "a => a.src")
            data = page.request.get(src).body()
            page.wait_for_selector("#output-file a[download], #output-file a[href]", state="attached")
            page.get_by_text("Advanced settings").click()  # show every setting in the kept screenshot
            page.wait_for_selector("#ctl-top_k", state="visible")
            shot = page.screenshot(full_page=True)
        finally:
            browser.close()
    for target in (REPO / "artifacts" / "webui.png", tmp_path / "webui.png"):
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, shot)
    wav, sr = sf.read(io.BytesIO(data))
    assert sr == 24_000
    assert wav.shape[0] > 0
    assert data[:4] == b"RIFF"
    assert proc.poll() is None  # still serving

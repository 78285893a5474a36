"""`python -m vall_e.webui`: a Gradio page for synthesizing speech in the browser.

    python -m vall_e.webui --model model.safetensors [--listen 127.0.0.1:7860] [--share]

Every control of the page is declared once in `CONTROLS`, and one function, `settings_from_ui`,
maps their values to the `GenerationSettings` handed to `tts.synthesize`. The reference's web UI
parsed its context-length and beam-width sliders and then never passed them on
(docs/reference-differences.md #19); here the tests check that every control changes the settings.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from vall_e.config import parse_config
from vall_e.generation.settings import OPTION_NAMES, GenerationSettings, defaults, option, settings_from
from vall_e.generation.tts import TTS
from vall_e.serving.options import ENGINE_DTYPES, add_engine_options
from vall_e.text.languages import supported_languages
from vall_e.utils.audio import save_audio
from vall_e.utils.errors import UserError

DEFAULT_LISTEN = "127.0.0.1:7860"
DEFAULT_TEXT = "The birch canoe slid on the smooth planks."  # Harvard sentence list 1, as the reference
DEVICES = ("auto", "cpu", "cuda", "mps")
OUTPUT_MAX_AGE_S = 3600.0  # finished wavs older than this are deleted from the output folder
GRADIO_MISSING = "the web UI needs: pip install 'vall-e[webui]'"


NOMINAL_FRAME_RATE = 75.0  # frames per second the seconds controls show their defaults at (EnCodec's)
# Where dynamic temperature starts when its checkbox is ticked (it is off by default, as everywhere).
DYNAMIC_PRESETS = {"min_ar_temp": 0.85, "min_nar_temp": 0.2}


def _ui_defaults() -> dict[str, Any]:
    """The page's defaults, all from the settings' own (`vall_e.generation.settings.defaults`):
    seconds shown at NOMINAL_FRAME_RATE, a random seed as -1, a context of all frames as 0 s."""
    d = defaults()
    fr = NOMINAL_FRAME_RATE
    return {**d, "seed": -1 if d["seed"] is None else d["seed"],
            "max_seconds": d["max_ar_steps"] / fr, "context_seconds": max(0, d["max_ar_context"]) / fr,
            "max_repeat_seconds": d["max_repeat_frames"] / fr,
            "dynamic_temperature": GenerationSettings().ar.dynamic, **DYNAMIC_PRESETS}


_UI_DEFAULTS = _ui_defaults()


@dataclass(frozen=True)
class Control:
    """One setting on the page: its widget and range (the reference's, where it had one). Its
    default is the settings' default (`_ui_defaults`); `info` defaults to the option's help."""

    name: str
    label: str
    panel: str  # "basic" or "advanced"
    kind: str = "slider"  # slider | number | dropdown | checkbox
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    info: str = ""

    @property
    def default(self) -> Any:
        return _UI_DEFAULTS[self.name]

    @property
    def help(self) -> str:
        return self.info or (option(self.name).help if self.name in OPTION_NAMES else "")


CONTROLS: tuple[Control, ...] = (
    # basic
    Control("ar_temp", "Temperature (AR)", "basic", minimum=0.0, maximum=1.5, step=0.05),
    Control("nar_temp", "Temperature (NAR)", "basic", minimum=0.0, maximum=1.5, step=0.05),
    Control("max_seconds", "Maximum seconds", "basic", minimum=0.0, maximum=32.0, step=0.1,
            info="cap on the AR's length (seconds x codec frame rate = max AR steps); 0 = follow the text length"),
    Control("input_prompt_length", "Input prompt length (s)", "basic", minimum=0.0, maximum=12.0, step=0.25),
    Control("language", "Language", "basic", kind="dropdown", info="text language (any espeak-ng code is accepted)"),
    Control("seed", "Seed", "basic", kind="number", minimum=-1, step=1,
            info="-1 = random; the same seed and settings give the same audio"),
    # advanced: AR filters and penalties
    Control("top_p", "Top P (AR)", "advanced", minimum=0.01, maximum=1.0, step=0.01),
    Control("top_k", "Top K (AR)", "advanced", minimum=0, maximum=1024, step=1),
    Control("min_p", "Min P (AR)", "advanced", minimum=0.0, maximum=0.95, step=0.01),
    Control("repetition_penalty", "Repetition penalty (AR)", "advanced", minimum=0.1, maximum=2.0, step=0.05),
    Control("repetition_penalty_decay", "Repetition penalty length decay (AR)", "advanced", minimum=0.0,
            maximum=2.0, step=0.05),
    Control("length_penalty", "Length penalty (AR)", "advanced", minimum=-2.0, maximum=2.0, step=0.05),
    Control("beam_width", "Beam width (AR)", "advanced", minimum=0, maximum=32, step=1,
            info="0 or 1 = sampling; > 1 = beam search (not with mirostat)"),
    Control("beam_length_alpha", "Beam length normalisation (AR)", "advanced", minimum=0.0, maximum=2.0, step=0.05),
    Control("mirostat_tau", "Mirostat τ (AR)", "advanced", minimum=0.0, maximum=8.0, step=0.05),
    Control("mirostat_eta", "Mirostat η (AR)", "advanced", minimum=0.0, maximum=2.0, step=0.05),
    Control("ras_window", "Repetition-aware sampling window (AR)", "advanced", minimum=0, maximum=100, step=1),
    Control("ras_ratio", "Repetition-aware sampling ratio (AR)", "advanced", minimum=0.0, maximum=1.0, step=0.01),
    # advanced: dynamic temperature
    Control("dynamic_temperature", "Dynamic temperature", "advanced", kind="checkbox",
            info="scale the temperature between the minimum and the temperature by the model's confidence"),
    Control("min_ar_temp", "Minimum temperature (AR)", "advanced", minimum=0.0, maximum=1.5, step=0.05,
            info="used when dynamic temperature is on and this is below the AR temperature"),
    Control("min_nar_temp", "Minimum temperature (NAR)", "advanced", minimum=0.0, maximum=1.5, step=0.05,
            info="used when dynamic temperature is on and this is below the NAR temperature"),
    Control("dynamic_temperature_mode", "Dynamic temperature mode", "advanced", kind="dropdown",
            choices=("pmax", "entropy")),
    # advanced: lengths and structure
    Control("context_seconds", "AR context length (s)", "advanced", minimum=0.0, maximum=12.0, step=0.25,
            info="if > 0 the AR only attends to this many seconds of its own output; 0 = all"),
    Control("max_nar_levels", "Max NAR levels", "advanced", minimum=0, maximum=7, step=1,
            info="NAR passes (code levels 1..N); fewer = faster, coarser audio"),
    Control("max_repeat_seconds", "Stop on a code repeated for (s)", "advanced", minimum=0.1, maximum=10.0,
            step=0.1, info="a sequence stuck on one code this long is ended"),
    Control("pitch_guard", "Pitch guard (semitones)", "advanced", minimum=0.0, maximum=24.0, step=0.5,
            info="> 0: an output whose median pitch is this far from the reference's is sampled again; 0 = off"),
    Control("medusa", "Medusa heads (AR)", "advanced", kind="checkbox",
            info="models with Medusa heads decode several AR steps per forward pass, with the same output"),
    Control("medusa_tree", "Medusa tree (greedy AR)", "advanced", kind="dropdown",
            choices=("", "16,8,4", "16x2,8,4", "32,16,8"),
            info="with Medusa heads and temperature 0: verify a tree of candidates per pass (for a GPU); "
                 "empty = a chain"),
    Control("split_sentences", "Split into sentences", "advanced", kind="checkbox",
            info="long text is synthesized sentence by sentence in one batch"),
    Control("pause", "Pause between sentences (s)", "advanced", minimum=0.0, maximum=2.0, step=0.05),
)
CONTROL_NAMES = tuple(c.name for c in CONTROLS)
DEFAULTS: dict[str, Any] = {c.name: c.default for c in CONTROLS}
# controls whose value is an option's value as it is (the others are converted in `settings_from_ui`)
_DIRECT = tuple(n for n in CONTROL_NAMES if n in OPTION_NAMES and n not in ("seed", "min_ar_temp", "min_nar_temp"))


def _frames(seconds: float, frame_rate: float) -> int:
    return int(round(float(seconds) * frame_rate))


def settings_from_ui(values: Mapping[str, Any], frame_rate: float = NOMINAL_FRAME_RATE):
    """Map the page's control values (by `Control.name`) to `GenerationSettings`.

    It takes exactly the names in `CONTROLS`, so a control cannot be added without being mapped,
    turns the page's units into the options' (seconds become frames at the codec's `frame_rate`,
    seed -1 = random, context 0 s = all) and hands them to `settings_from`, the builder every front
    end uses. Invalid values raise `UserError`.
    """
    missing = [n for n in CONTROL_NAMES if n not in values]
    unknown = [n for n in values if n not in CONTROL_NAMES]
    if missing or unknown:
        raise ValueError(f"settings_from_ui: missing {missing}, unknown {unknown}")
    v = dict(values)
    options: dict[str, Any] = {}
    for name in _DIRECT:
        kind = option(name).type
        options[name] = kind(v[name]) if kind is not str else str(v[name] or "").strip()
    seed = None if v["seed"] is None or int(v["seed"]) < 0 else int(v["seed"])
    dynamic = bool(v["dynamic_temperature"])
    context = _frames(v["context_seconds"], frame_rate)
    options.update(
        seed=seed,
        min_ar_temp=float(v["min_ar_temp"]) if dynamic else -1.0,
        min_nar_temp=float(v["min_nar_temp"]) if dynamic else -1.0,
        max_ar_context=context if context > 0 else -1,
        max_ar_steps=max(0, _frames(v["max_seconds"], frame_rate)),
        max_repeat_frames=max(1, _frames(v["max_repeat_seconds"], frame_rate)),
    )
    return settings_from(options)


class Engine:
    """The loaded TTS, reloaded when the model path, device or dtype chosen on the page changes.
    `compile` (the `--compile` flag) applies to every load."""

    def __init__(self, model: str | None = None, device: str = "auto", dtype: str = "float32",
                 loader: Callable[..., Any] | None = None, compile: bool = False, vocoder: str | None = None) -> None:
        self.model, self.device, self.dtype = model or "", device, dtype
        self.compile = compile
        self.vocoder = vocoder  # --vocoder: vocos | encodec | None (the model's default)
        self._loader = loader
        self._key: tuple[str, str, str] | None = None
        self._tts: Any = None
        self._lock = threading.Lock()

    def get(self, model: str | None, device: str | None, dtype: str | None) -> Any:
        model = (model or "").strip()
        device = (device or "auto").strip()
        dtype = (dtype or "float32").strip()
        if not model:
            raise UserError("no model: enter the path of a model.safetensors (or a training run's YAML)")
        if dtype not in ENGINE_DTYPES:
            raise UserError(f"dtype {dtype!r}: choose one of {', '.join(ENGINE_DTYPES)}")
        key = (model, device, dtype)
        with self._lock:
            if key != self._key:
                loader = self._loader
                if loader is None:
                    loader = TTS.from_pretrained
                self._tts, self._key = None, None  # free the old model first; a failed load keeps none
                extra = {"compile": True} if self.compile else {}  # loaders without the option still work
                if self.vocoder:
                    extra["vocoder"] = self.vocoder
                self._tts = loader(model, device=device, dtype=dtype, **extra)
                self._key = key
            return self._tts


def _import_gradio():
    try:
        import gradio as gr
    except ImportError:
        raise UserError(GRADIO_MISSING) from None
    return gr


def _prune(folder: Path, max_age: float = OUTPUT_MAX_AGE_S) -> None:
    now = time.time()
    for p in folder.glob("*.wav"):
        try:
            if now - p.stat().st_mtime > max_age:
                p.unlink()
        except OSError:
            pass


def synthesize_to_file(engine: Engine, out_dir: Path, text: str, reference: str | None, model: str,
                       device: str, dtype: str, values: Mapping[str, Any],
                       progress: Callable[..., Any] | None = None) -> tuple[Path, str]:
    """One click of Generate: load (or reuse) the model, synthesize, write a wav. Returns (path, summary)."""
    progress = progress or (lambda *a, **k: None)
    if not text or not text.strip():
        raise UserError("empty text: type something to say")
    if not reference:
        raise UserError("no reference audio: upload or record a few seconds of the voice")
    settings_from_ui(values)  # reject bad settings before a possibly slow model load
    progress(0.05, desc="Loading model")
    tts = engine.get(model, device, dtype)
    settings = settings_from_ui(values, frame_rate=float(tts.codec.frame_rate))
    progress(0.2, desc="Synthesizing")
    t0 = time.perf_counter()
    wav = tts.synthesize(text, reference, settings)[0]
    elapsed = time.perf_counter() - t0
    if wav.numel() == 0:
        raise UserError("the model produced no audio for this text; try another seed or a higher temperature")
    progress(0.95, desc="Saving")
    out_dir.mkdir(parents=True, exist_ok=True)
    _prune(out_dir)
    path = out_dir / f"vall-e-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 1_000_000:06d}.wav"
    save_audio(path, wav, tts.sample_rate)
    seconds = wav.shape[-1] / tts.sample_rate
    summary = (f"{seconds:.2f} s of audio in {elapsed:.2f} s (real-time factor {elapsed / max(seconds, 1e-9):.2f}); "
               f"model {Path(model).name} on {getattr(tts, 'device', device)} in {dtype}")
    return path, summary


def _widget(gr, c: Control):
    if c.kind == "slider":
        return gr.Slider(minimum=c.minimum, maximum=c.maximum, value=c.default, step=c.step, label=c.label,
                         info=c.help or None, elem_id=f"ctl-{c.name}")
    if c.kind == "number":
        return gr.Number(value=c.default, label=c.label, info=c.help or None, precision=0, minimum=c.minimum,
                         step=c.step, elem_id=f"ctl-{c.name}")
    if c.kind == "checkbox":
        return gr.Checkbox(value=c.default, label=c.label, info=c.help or None, elem_id=f"ctl-{c.name}")
    if c.kind == "dropdown":
        choices = list(c.choices)
        if c.name == "language":
            choices = supported_languages()
        if c.name == "medusa_tree":  # the empty value (a chain) gets a visible label
            choices = [(x or "chain", x) for x in choices]
        return gr.Dropdown(choices=choices, value=c.default, label=c.label, info=c.help or None,
                           allow_custom_value=c.name == "language", elem_id=f"ctl-{c.name}")
    raise ValueError(f"unknown control kind {c.kind!r}")


@dataclass
class UI:
    """The built page and its parts (the tests check what the Generate button is wired to)."""

    demo: Any
    controls: dict[str, Any]
    generate_inputs: set[Any]
    generate_button: Any


def build_ui(engine: Engine, out_dir: Path | None = None) -> UI:
    """Build the Gradio Blocks page. Nothing is launched."""
    gr = _import_gradio()
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="vall-e-webui-"))
    controls: dict[str, Any] = {}
    with gr.Blocks(title="VALL-E", delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# VALL-E\nZero-shot text-to-speech: type a text, give a few seconds of the voice, press Generate.")
        with gr.Row():
            with gr.Column(scale=3):
                text = gr.Textbox(value=DEFAULT_TEXT, lines=5, label="Text", elem_id="text-input")
                reference = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Reference voice",
                                     elem_id="reference-audio")
                with gr.Accordion("Basic settings", open=True):
                    with gr.Row():
                        for c in CONTROLS:
                            if c.panel == "basic":
                                controls[c.name] = _widget(gr, c)
                with gr.Accordion("Advanced settings", open=False):
                    advanced = [c for c in CONTROLS if c.panel == "advanced"]
                    for i in range(0, len(advanced), 3):
                        with gr.Row():
                            for c in advanced[i:i + 3]:
                                controls[c.name] = _widget(gr, c)
                with gr.Accordion("Model", open=False):
                    model = gr.Textbox(value=engine.model, label="Model path",
                                       info="model.safetensors or a training run's YAML; reloaded when changed",
                                       elem_id="model-path")
                    with gr.Row():
                        device = gr.Dropdown(choices=list(DEVICES), value=engine.device, label="Device",
                                             allow_custom_value=True, elem_id="model-device")
                        dtype = gr.Dropdown(choices=list(ENGINE_DTYPES), value=engine.dtype, label="Dtype",
                                            elem_id="model-dtype")
            with gr.Column(scale=2):
                button = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                output = gr.Audio(type="filepath", label="Output", interactive=False, elem_id="output-audio",
                                  buttons=["download"],
                                  waveform_options=gr.WaveformOptions(show_recording_waveform=False))
                download = gr.File(label="Download", interactive=False, elem_id="output-file")
                summary = gr.Markdown(elem_id="output-summary")

        # The minimum-temperature sliders only act with dynamic temperature on; grey them out otherwise.
        def toggle(on: bool):
            return gr.update(interactive=bool(on)), gr.update(interactive=bool(on))

        dyn = controls["dynamic_temperature"]
        dyn.change(toggle, dyn, [controls["min_ar_temp"], controls["min_nar_temp"]])
        demo.load(toggle, dyn, [controls["min_ar_temp"], controls["min_nar_temp"]])

        # A set of inputs makes Gradio pass one {component: value} dict, which keeps `progress` a plain
        # positional parameter (Gradio only injects gr.Progress into those, not after *args).
        named = {text: "text", reference: "reference", model: "model", device: "device", dtype: "dtype",
                 **{controls[n]: n for n in CONTROL_NAMES}}
        inputs = set(named)

        def generate(data: dict, progress=gr.Progress()):
            got = {named[c]: v for c, v in data.items()}
            values = {n: got[n] for n in CONTROL_NAMES}
            try:
                path, info = synthesize_to_file(engine, out_dir, got["text"], got["reference"], got["model"],
                                                got["device"], got["dtype"], values, progress=progress)
            except UserError as e:
                raise gr.Error(str(e)) from None
            return str(path), str(path), info

        button.click(generate, inputs, [output, download, summary], concurrency_limit=1)
    return UI(demo=demo, controls=controls, generate_inputs=inputs, generate_button=button)


def parse_listen(value: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:7860`) -> (host, port)."""
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--listen {value!r}: expected host:port, e.g. 127.0.0.1:7860")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vall_e.webui", description="Gradio web UI for VALL-E.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--yaml", default=None, help="training run config; its exported model is used")
    src.add_argument("--model", default=None, help="exported model.safetensors")
    p.add_argument("--listen", default=DEFAULT_LISTEN, help=f"host:port to serve on (default {DEFAULT_LISTEN})")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    add_engine_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from a local tool
    parser = build_parser()
    cfg, args = parse_config(argv, parser)
    host, port = parse_listen(args.listen)
    _import_gradio()
    model = args.model or args.yaml
    if model is None:
        default = cfg.ckpt_dir / cfg.model.full_name / "model.safetensors"
        model = str(default) if default.exists() else None
    engine = Engine(str(model) if model else None, device=args.device, dtype=args.dtype, compile=args.compile,
                    vocoder=args.vocoder or cfg.inference.vocoder or None)
    if model:  # fail fast on a bad path or file, before serving a page that cannot work
        engine.get(str(model), args.device, args.dtype)
    ui = build_ui(engine)
    print(f"serving the VALL-E web UI on http://{host}:{port}", file=sys.stderr, flush=True)
    ui.demo.queue(max_size=8).launch(server_name=host, server_port=port, share=args.share, inbrowser=False,
                                     show_error=True, quiet=False)
    return 0

"""`GenerationSettings` and the one place that builds it from what a user chose.

`GenerationSettings` is everything that shapes one synthesis besides the text and the voice: the
AR and NAR stages each have their `SamplingParams`; the rest bounds the decoding (step cap, NAR
levels, the repeat guard, the STOP floor) and shapes the output (prompt length, language, sentence
splitting and the pauses between sentences).

Every front end (the synthesis command, the HTTP server, the web UI, `vall_e.eval`, training's
evaluation samples) names its settings by the `OPTIONS` below and builds them with `settings_from`
(or `settings_from_args` / `settings_from_config`, which call it). The defaults are the dataclasses'
(`GenerationSettings`, `SamplingParams.ar_defaults`/`nar_defaults`), so they are written once and
every front end shows the same ones.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from vall_e.generation.sampling import SAMPLING_RANGES, Range, SamplingParams, check_fields
from vall_e.utils.errors import UserError

SETTINGS_RANGES: dict[str, Range] = {
    "max_ar_steps": Range(ge=0, note="0 = follow the text length"),
    "max_nar_levels": Range(ge=0),
    "input_prompt_length": Range(ge=0, note="0 = all of it"),
    "max_repeat_frames": Range(ge=1),
    "min_frames_per_phoneme": Range(ge=0),
    "pause": Range(ge=0),
    "pitch_guard": Range(ge=0, note="0 = off"),
}


@dataclass
class GenerationSettings:
    """Everything that shapes one synthesis besides the text and the voice."""

    ar: SamplingParams = field(default_factory=SamplingParams.ar_defaults)
    nar: SamplingParams = field(default_factory=SamplingParams.nar_defaults)
    max_ar_steps: int = 0  # user cap on AR frames; 0 = follow the text length only
    max_nar_levels: int = 7  # NAR passes (levels 1..max_nar_levels)
    input_prompt_length: float = 3.0  # seconds of reference used as the prompt; 0 = all of it
    max_repeat_frames: int = 150  # a level-0 code repeated this many frames in a row ends the sequence
    min_frames_per_phoneme: float = 1.0  # STOP is banned before this many frames per phoneme (premature stops)
    language: str = "en"
    split_sentences: bool = True
    pause: float = 0.25  # seconds of silence between joined sentences
    # > 0: an output whose median pitch is more than this many semitones from its prompt's is sampled
    # again, up to `vall_e.generation.pitch.TRIES` times, keeping the closest (not in streaming)
    pitch_guard: float = 0.0
    # what the reference says: models whose text front end reads it (converted VALL-E X / Amphion
    # checkpoints) put it before the text and take the whole reference as the prompt; others ignore it
    reference_text: str = ""

    def __post_init__(self) -> None:
        check_fields(self, "settings", SETTINGS_RANGES)
        if not self.language.strip():
            raise UserError("settings.language: choose a language code such as en")


# ---------------------------------------------------------------------------------------------
# the options every front end offers


@dataclass(frozen=True)
class Option:
    """One user-facing setting: its name (a JSON key, a web UI control, `--name-with-dashes` on the
    command line) and where it lands in `GenerationSettings` (`targets`: "ar.temperature",
    "max_ar_steps", or several, as the seed sets both stages'). Its type, default and bounds are
    those of the first target's field."""

    name: str
    targets: tuple[str, ...]
    help: str
    flag: str | None = None  # command-line flag, when not --name-with-dashes
    api_name: str | None = None  # the server's JSON field, when not the name (OpenAI's names)

    @property
    def default(self) -> Any:
        return _get(GenerationSettings(), self.targets[0])

    @property
    def type(self) -> type:
        section, _, key = self.targets[0].rpartition(".")
        owner = SamplingParams if section else GenerationSettings
        kind = next(f.type for f in fields(owner) if f.name == key)
        kind = kind if isinstance(kind, str) else kind.__name__
        return {"float": float, "int": int, "str": str, "bool": bool}[kind.split(" |")[0]]

    @property
    def range(self) -> Range | None:
        section, _, key = self.targets[0].rpartition(".")
        return (SAMPLING_RANGES if section else SETTINGS_RANGES).get(key)

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def json_name(self) -> str:
        return self.api_name or self.name


OPTIONS: tuple[Option, ...] = (
    Option("ar_temp", ("ar.temperature",), "AR temperature (0 = greedy)", api_name="temperature"),
    Option("nar_temp", ("nar.temperature",), "NAR temperature (0 = greedy)", api_name="nar_temperature"),
    Option("min_ar_temp", ("ar.min_temperature",), "in [0, ar_temp): dynamic temperature (AR)"),
    Option("min_nar_temp", ("nar.min_temperature",), "in [0, nar_temp): dynamic temperature (NAR)"),
    Option("dynamic_temperature_mode", ("ar.dynamic_temperature_mode", "nar.dynamic_temperature_mode"),
           "dynamic temperature: pmax (the reference's formula) or entropy"),
    Option("top_p", ("ar.top_p",), "nucleus filter (AR; 1 = off)"),
    Option("top_k", ("ar.top_k",), "top-k filter (AR; 0 = off)"),
    Option("min_p", ("ar.min_p",), "min-p filter (AR; 0 = off)"),
    Option("repetition_penalty", ("ar.repetition_penalty",), "penalty on recently used codes (AR; 1 = off)"),
    Option("repetition_penalty_decay", ("ar.repetition_penalty_decay",),
           "fade the repetition penalty with distance (0 = the same at every distance)"),
    Option("length_penalty", ("ar.length_penalty",), "penalty on STOP (AR; > 0 = longer output, 0 = off)"),
    Option("beam_width", ("ar.beam_width",), "> 1: beam search for the AR"),
    Option("beam_length_alpha", ("ar.beam_length_alpha",), "beam scores are divided by length ** this"),
    Option("mirostat_tau", ("ar.mirostat_tau",), "mirostat target surprise (AR; 0 = off)"),
    Option("mirostat_eta", ("ar.mirostat_eta",), "mirostat learning rate"),
    Option("ras_window", ("ar.ras_window",), "repetition-aware sampling window (VALL-E 2: 10; 0 = off)"),
    Option("ras_ratio", ("ar.ras_ratio",), "repetition-aware sampling threshold"),
    Option("max_ar_context", ("ar.max_ar_context",), "if > 0, the AR attends to only its last N frames"),
    Option("medusa", ("ar.medusa",), "decode several AR steps per forward pass with the model's Medusa heads "
           "(model.medusa_heads; exact: same greedy codes, same sampling distribution; off by default: on the CPU "
           "with the demo's model it measured slower than one-step decoding)"),
    Option("medusa_tree", ("ar.medusa_tree",), "with medusa and greedy AR decoding: verify a tree of the heads' "
           "top candidates per pass (e.g. 16,8,4: more steps per pass, more rows per pass; for a GPU, where rows "
           "cost little) instead of a chain of their best (empty)"),
    Option("seed", ("ar.seed", "nar.seed"), "random seed for reproducible output (default: random)"),
    Option("max_ar_steps", ("max_ar_steps",), "cap on AR frames (0: follow the text length)"),
    Option("max_nar_levels", ("max_nar_levels",), "NAR passes (levels 1..N)"),
    Option("input_prompt_length", ("input_prompt_length",),
           "seconds of reference used as the prompt (trimmed or repeated); 0 = all"),
    Option("max_repeat_frames", ("max_repeat_frames",), "a code repeated for this many frames ends the output"),
    Option("min_frames_per_phoneme", ("min_frames_per_phoneme",), "STOP is banned before this many frames per phoneme"),
    Option("language", ("language",), "text language (en, de, fr, es, ...; VALL-E X: en, zh, ja, auto)"),
    Option("reference_text", ("reference_text",), "what the reference says (read by converted VALL-E X / "
           "Amphion models, which then use the whole reference as the prompt)"),
    Option("split_sentences", ("split_sentences",), "split long text into sentences", flag="--no-split"),
    Option("pause", ("pause",), "seconds of silence between joined sentences/lines"),
    Option("pitch_guard", ("pitch_guard",), "if > 0, an output whose median pitch is more than this many "
           "semitones from the reference's is sampled again (up to 3 more tries, the closest kept; "
           "not in streaming): catches the AR drifting into another voice"),
)
OPTION_NAMES = tuple(o.name for o in OPTIONS)
_BY_NAME = {o.name: o for o in OPTIONS}


def option(name: str) -> Option:
    return _BY_NAME[name]


def _get(settings: GenerationSettings, target: str) -> Any:
    section, _, key = target.rpartition(".")
    return getattr(getattr(settings, section) if section else settings, key)


def defaults() -> dict[str, Any]:
    """Every option's default, by name."""
    return {o.name: o.default for o in OPTIONS}


def settings_from(values: Mapping[str, Any], base: GenerationSettings | None = None) -> GenerationSettings:
    """The one builder: option values by name (None = keep `base`'s, by default the defaults) ->
    `GenerationSettings`. An unknown name is a programming error (ValueError); a bad value is a
    `UserError` that names the option."""
    unknown = sorted(set(values) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown generation option(s): {', '.join(unknown)}")
    base = base or GenerationSettings()
    changes: dict[str, dict[str, Any]] = {"ar": {}, "nar": {}, "": {}}
    for name, value in values.items():
        if value is None:
            continue
        for target in _BY_NAME[name].targets:
            section, _, key = target.rpartition(".")
            changes[section][key] = value
    try:
        ar = replace(base.ar, **changes["ar"])
        nar = replace(base.nar, **changes["nar"])
        return replace(base, ar=ar, nar=nar, **changes[""])
    except UserError as e:
        raise UserError(_option_message(str(e), changes)) from None


def _option_message(message: str, changes: dict[str, dict[str, Any]]) -> str:
    """'sampling.temperature=-1: ...' -> 'ar_temp=-1: ...' (the name the user typed)."""
    head, sep, rest = message.partition(": ")
    section, _, key = head.partition("=")[0].rpartition(".")
    for o in OPTIONS:
        for target in o.targets:
            t_section, _, t_key = target.rpartition(".")
            if t_key == key and (section == "settings") == (t_section == "") and key in changes[t_section]:
                return f"{o.name}={changes[t_section][key]!r}{sep}{rest}"
    return message


# ---------------------------------------------------------------------------------------------
# command lines and configuration


def add_generation_flags(parser: argparse.ArgumentParser, overrides: Mapping[str, Any] | None = None) -> None:
    """One flag per option (`--ar-temp`, ..., `--no-split`), defaulting to the settings' defaults
    (or to `overrides`, for a front end with a deliberate default of its own, such as eval's seed)."""
    overrides = dict(overrides or {})
    for o in OPTIONS:
        default = overrides.get(o.name, o.default)
        if o.type is bool:
            parser.add_argument(o.cli_flag, dest=o.name, action="store_false" if default else "store_true",
                                help=o.help)
            continue
        extra = {"choices": ("pmax", "entropy")} if o.name == "dynamic_temperature_mode" else {}
        parser.add_argument(o.cli_flag, dest=o.name, type=o.type, default=default, help=o.help, **extra)


def settings_from_args(args: argparse.Namespace) -> GenerationSettings:
    """GenerationSettings from the flags of `add_generation_flags`."""
    return settings_from({o.name: getattr(args, o.name) for o in OPTIONS})


def settings_from_config(cfg: Any) -> GenerationSettings:
    """GenerationSettings for training's evaluation samples, from the `evaluation` config section."""
    return settings_from({"ar_temp": cfg.evaluation.ar_temperature, "nar_temp": cfg.evaluation.nar_temperature})

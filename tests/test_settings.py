"""One place builds `GenerationSettings`, the defaults live once, and every front end shows the same
defaults (issue K, build point 3); one dtype map."""
from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import pytest

from vall_e.generation.sampling import SamplingParams
from vall_e.generation.settings import (OPTIONS, GenerationSettings, defaults, option, settings_from,
                                        settings_from_args, settings_from_config)
from vall_e.utils.errors import UserError

PACKAGE = Path(__file__).resolve().parents[1] / "vall_e"
DEFAULT = GenerationSettings()


# ------------------------------------------------------------------ every front end, the same defaults


def test_synthesis_command_defaults():
    from vall_e.serving.synthesize import build_parser

    assert settings_from_args(build_parser().parse_args(["Hello.", "voice.wav"])) == DEFAULT


def test_server_request_defaults_and_schema():
    pytest.importorskip("fastapi")
    from tests.conftest import FakeTTS
    from vall_e.serving.routes import SPEECH_OPTIONS, settings_from_request, speech_request_model
    from vall_e.serving.state import ServerState

    state = ServerState.start(FakeTTS(), model_id="m")
    try:
        model = speech_request_model(state)
    finally:
        state.close()
    assert settings_from_request(model.model_validate({"input": "Hi.", "voice": "alice"})) == DEFAULT
    properties = model.model_json_schema()["properties"]
    for name in SPEECH_OPTIONS:  # the schema shows the same defaults as everything else
        assert properties[option(name).json_name]["default"] == defaults()[name], name


def test_web_ui_defaults():
    from vall_e.serving.webui import CONTROLS, DEFAULTS, settings_from_ui

    assert settings_from_ui(DEFAULTS, frame_rate=75.0) == DEFAULT
    for c in CONTROLS:
        if c.name in defaults() and c.name not in ("seed", "min_ar_temp", "min_nar_temp"):
            assert c.default == defaults()[c.name], c.name


def test_eval_defaults_differ_only_in_the_seed():
    from vall_e.evaluation.evaluate import EVAL_SEED, build_parser

    got = settings_from_args(build_parser().parse_args(["--list", "items.jsonl", "--model", "m.safetensors"]))
    assert got == replace(DEFAULT, ar=replace(DEFAULT.ar, seed=EVAL_SEED), nar=replace(DEFAULT.nar, seed=EVAL_SEED))


def test_training_samples_defaults():
    from vall_e.config import Config

    assert settings_from_config(Config()) == DEFAULT


# ------------------------------------------------------------------ the builder


def test_every_setting_has_an_option():
    reached = {t for o in OPTIONS for t in o.targets}
    top = {f.name for f in fields(GenerationSettings)} - {"ar", "nar"}
    assert top <= reached  # every GenerationSettings field can be set
    assert {f"ar.{f.name}" for f in fields(SamplingParams)} <= reached  # every AR sampler option too
    assert {"nar.temperature", "nar.min_temperature", "nar.seed"} <= reached
    assert len({o.name for o in OPTIONS}) == len(OPTIONS)


def test_builder_maps_names_keeps_unset_values_and_names_bad_ones():
    s = settings_from({"ar_temp": 0.5, "seed": 3, "max_ar_steps": 40, "top_k": None})
    assert (s.ar.temperature, s.ar.seed, s.nar.seed, s.max_ar_steps, s.ar.top_k) == (0.5, 3, 3, 40, DEFAULT.ar.top_k)
    assert s.nar.temperature == DEFAULT.nar.temperature
    with pytest.raises(UserError, match=r"ar_temp=-1: must be >= 0 \(0 = greedy\)"):
        settings_from({"ar_temp": -1})
    with pytest.raises(UserError, match=r"max_ar_steps=-5: must be >= 0"):
        settings_from({"max_ar_steps": -5})
    with pytest.raises(UserError, match="language"):
        settings_from({"language": " "})
    with pytest.raises(ValueError, match="ar_tmep"):
        settings_from({"ar_tmep": 1.0})


def test_command_line_flags_reach_the_settings():
    from vall_e.serving.synthesize import build_parser

    args = build_parser().parse_args(["t", "r", "--ar-temp", "0.4", "--nar-temp", "0", "--beam-width", "3",
                                      "--max-repeat-frames", "20", "--no-split", "--seed", "9"])
    s = settings_from_args(args)
    assert (s.ar.temperature, s.nar.temperature, s.ar.beam_width, s.max_repeat_frames) == (0.4, 0.0, 3, 20)
    assert s.split_sentences is False and s.ar.seed == s.nar.seed == 9


# ------------------------------------------------------------------ one dtype map


def test_one_dtype_map():
    holders = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if "torch.bfloat16" in p.read_text(encoding="utf-8")
                     and '"bfloat16"' in p.read_text(encoding="utf-8"))
    assert holders == ["utils/dtypes.py"], holders

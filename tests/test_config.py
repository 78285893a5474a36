"""Configuration: YAML loading, typed overrides, clear errors, help, paths."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vall_e.config import Config, load_config, parse_config, split_overrides
from vall_e.utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_paths_hang_off_yaml_folder(tmp_path):
    y = tmp_path / "run" / "config.yaml"
    y.parent.mkdir()
    y.write_text("trainer:\n  iterations: 7\n")
    cfg = load_config(y)
    assert cfg.trainer.iterations == 7
    assert cfg.cfg_path == y.parent
    assert cfg.ckpt_dir == y.parent / "ckpt"
    assert cfg.log_dir == y.parent / "logs"
    assert cfg.cache_dir == y.parent / ".cache"
    assert cfg.hdf5_path == y.parent / "data.h5"
    assert cfg.metrics_path == y.parent / "metrics.png"


def test_overrides_are_typed():
    cfg, _ = parse_config(["trainer.iterations=10", "hyperparameters.learning_rate=1e-3",
                           "dataset.training=[a, b]", "dataset.use_hdf5=true", "model.size=half"])
    assert cfg.trainer.iterations == 10 and isinstance(cfg.trainer.iterations, int)
    assert cfg.hyperparameters.learning_rate == pytest.approx(1e-3)
    assert cfg.dataset.training == ["a", "b"]
    assert cfg.dataset.use_hdf5 is True
    assert cfg.model.size == "half"


def test_override_beats_yaml(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("trainer:\n  iterations: 7\n")
    cfg, _ = parse_config([f"yaml={y}", "trainer.iterations=9"])
    assert cfg.trainer.iterations == 9


def test_unknown_key_suggests_closest():
    with pytest.raises(UserError, match=r"unknown config key 'trainer.iteration'.*'trainer.iterations'"):
        parse_config(["trainer.iteration=3"])


def test_unknown_key_in_yaml(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("modle:\n  size: tiny\n")
    with pytest.raises(UserError, match="'modle'.*'model'"):
        load_config(y)


def test_mistyped_value():
    with pytest.raises(UserError, match="trainer.iterations.*int"):
        parse_config(["trainer.iterations=many"])


def test_bad_choice():
    with pytest.raises(UserError, match="model.backbone"):
        parse_config(["model.backbone=gpt5"])


@pytest.mark.parametrize("text,match", [("model: [\n", "malformed YAML at line"), ("- a\n- b\n", "expected a mapping"),
                                        ("trainer: 3\n", "is a section")])
def test_malformed_yaml(tmp_path, text, match):
    y = tmp_path / "c.yaml"
    y.write_text(text)
    with pytest.raises(UserError, match=match):
        load_config(y)


def test_non_utf8_and_missing_yaml(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="not UTF-8"):
        load_config(y)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_example_config_loads():
    cfg = load_config(ROOT / "data" / "config.yaml")
    assert cfg.model.size == "quarter" and cfg.codec.name == "world"
    assert cfg.cfg_path == ROOT / "data"


def test_split_overrides_leaves_flags():
    ov, rest = split_overrides(["yaml=x.yaml", "--out-path", "a=b.wav", "hello world", "trainer.iterations=3"])
    assert ov == {"yaml": "x.yaml", "a": "b.wav", "trainer.iterations": "3"}
    assert rest == ["--out-path", "hello world"]


def test_cli_help_and_print(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vall_e.config", "help=true"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "trainer.iterations = 100000" in out.stdout
    out = subprocess.run([sys.executable, "-m", "vall_e.config", "trainer.iterashuns=3"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "trainer.iterations" in out.stderr


@settings(max_examples=60, deadline=None)
@given(key=st.text(min_size=1, max_size=20), value=st.text(max_size=30))
def test_property_overrides_never_crash(key, value):
    """Any key=value either parses into a valid Config or raises UserError, never anything else."""
    try:
        cfg = load_config(None, {key: value})
    except UserError:
        return
    assert isinstance(cfg, Config)


# ---------------------------------------------------------------------------- the model section

def test_dict_size_as_the_readme_writes_it(tmp_path):
    cfg, _ = parse_config(["model.size={d_model: 256, n_heads: 4}"])
    assert cfg.model.size == {"d_model": 256, "n_heads": 4}
    net = cfg.model.networks()["ar+nar"]
    assert (net.d_model, net.n_heads, net.n_layers) == (256, 4, 12)  # layers from `full`
    assert cfg.model.full_name == "ar+nar-d256h4l12"
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  size: {dim: 64, heads: 4, layers: 2}\n")  # the reference's names work too
    from vall_e.models.build import build_models
    model = build_models(load_config(y).model)["ar+nar"]
    assert (model.config.d_model, model.config.n_heads, model.config.n_layers) == (64, 4, 2)
    assert len(model.backbone.layers) == 2
    with pytest.raises(UserError, match="model.size: unknown key"):
        parse_config(["model.size={width: 256}"])
    with pytest.raises(UserError, match="model.d_model 250 must split into 16 heads"):
        parse_config(["model.size={d_model: 250}"])


def test_one_model_definition_with_one_set_of_defaults():
    """The YAML `model` section and a network's `VALLEConfig` share their fields and defaults, so the
    default config builds exactly the default network."""
    from dataclasses import fields

    from vall_e.config.model import ModelConfig, ModelOptions, VALLEConfig
    shared = {f.name for f in fields(ModelOptions)}
    assert shared <= {f.name for f in fields(ModelConfig)} and shared <= {f.name for f in fields(VALLEConfig)}
    assert {"text_head_rate", "ar_group", "n_langs", "p_ar"} <= shared
    assert {f.name for f in fields(VALLEConfig)} - shared == {"kind", "d_model", "n_heads", "n_layers"}
    assert ModelConfig().networks() == {"ar+nar": VALLEConfig()}
    assert VALLEConfig().n_langs == Config().model.n_langs and VALLEConfig().p_ar == Config().model.p_ar == 0.0
    # a model file written before the definitions were merged stored p_ar as null
    assert VALLEConfig.from_dict({**VALLEConfig().to_dict(), "p_ar": None}).p_ar == 0.0


def test_allowed_kinds_and_backbones_come_from_the_registries(monkeypatch):
    from vall_e.config import model as model_config
    from vall_e.models.backbones import build_backbone
    with pytest.raises(UserError, match="model.backbone 'gpt5': choose one of transformer, llama, mixtral, retnet, bitnet"):
        parse_config(["model.backbone=gpt5"])
    with pytest.raises(UserError, match=r"model.kind 'ar': choose one of ar\+nar, ar,nar"):
        parse_config(["model.kind=ar"])
    with pytest.raises(UserError, match=r"model.kind 'both': choose one of ar\+nar, ar, nar"):
        model_config.VALLEConfig(kind="both")
    # a backbone registered in the one registry is accepted by the config and built by build_backbone
    monkeypatch.setitem(model_config.BACKBONES, "gpt5", model_config.BACKBONES["transformer"])
    cfg, _ = parse_config(["model.backbone=gpt5", "model.size=tiny"])
    assert cfg.model.networks()["ar+nar"].backbone == "gpt5"
    assert type(build_backbone("gpt5", d_model=64, n_heads=4, n_layers=1)).__name__ == "TransformerBackbone"
    monkeypatch.delitem(model_config.BACKBONES, "retnet")
    with pytest.raises(UserError, match="model.backbone 'retnet'"):
        parse_config(["model.backbone=retnet"])
    # and so is a pipeline of networks (kind -> the networks it trains)
    monkeypatch.setitem(model_config.PIPELINES, "ar", ("ar",))
    cfg, _ = parse_config(["model.kind=ar", "model.size=tiny"])
    assert list(cfg.model.networks()) == ["ar"]

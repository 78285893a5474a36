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

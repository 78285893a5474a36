"""The reference implementation's config files: `python -m vall_e.config migrate`, and loading one directly.

The test case is the reference's own data/config.yaml at its commit 35d78a2, stored as text in
tests/fixtures/reference/."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vall_e.config import load_config
from vall_e.config.migrate import migrate, reference_keys, speaker_format
from vall_e.utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "reference" / "mrq-vall-e-35d78a2-config.yaml"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vall_e.config", *args], capture_output=True, text=True,
                          cwd=cwd, env=ENV)


def _reference_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "old.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_migrating_the_reference_config(tmp_path):
    out = _cli("migrate", str(FIXTURE))
    assert out.returncode == 0, out.stderr
    new = tmp_path / "new.yaml"
    new.write_text(out.stdout, encoding="utf-8")
    header = [line for line in out.stdout.splitlines() if line.startswith("#")]
    text = "\n".join(header).replace("\n#       ", " ")  # each entry on one line, as before wrapping
    # models._models[] with arch_type, size, resp_levels/prom_levels
    assert "models._models[].arch_type -> model.backbone 'retnet'" in text
    assert "models._models[].resp_levels, prom_levels, models._prom_levels -> model.n_levels 8" in text
    # the speaker-name lambda, translated
    assert "-> dataset.speaker_name_format '{group}_{speaker}'" in text
    # unused keys are listed as ignored, each with its reason
    ignored = text[text.index("# Ignored"):]
    for key in ("dataset.tasks_list", "dataset.hdf5_flag", "dataset.cache", "models._models[ar+nar].version",
                "models._models[ar+nar].tasks", "trainer.gc_mode", "inference.use_vocos", "bitsandbytes.injects"):
        assert re.search(rf"^#   {re.escape(key)}: \S", ignored, flags=re.M), key
    assert "NEEDS A DECISION" not in text
    assert "20 ignored" in out.stderr  # the summary, on stderr

    with_logs = subprocess.run([sys.executable, "-c", f"from vall_e.config import load_config; load_config({str(new)!r})"],
                               capture_output=True, text=True, env=ENV)
    assert with_logs.returncode == 0 and with_logs.stderr == "", with_logs.stderr  # ours now: no warning
    cfg = load_config(new)
    m = cfg.model
    assert (m.kind, m.backbone, m.size, m.n_levels, m.n_langs) == ("ar+nar", "retnet", "full", 8, 1)
    assert cfg.dataset.speaker_name_format == "{group}_{speaker}"
    assert cfg.dataset.phones_range == [4, 512] and cfg.dataset.sample_type == "speaker"
    assert cfg.dataset.validation_fraction == 0.0  # the reference holds nothing out
    assert cfg.hyperparameters.optimizer == "prodigy" and cfg.hyperparameters.learning_rate == 0.0625
    assert cfg.hyperparameters.scheduler == "constant"
    assert cfg.trainer.backend == "deepspeed" and cfg.trainer.weight_dtype == "bfloat16"
    assert cfg.trainer.iterations == 1_000_000 and cfg.trainer.keep_last_checkpoints == 4
    assert cfg.evaluation.nar_temperature == 0.25 and cfg.inference.weight_dtype == "bfloat16"
    assert list(m.networks()) == ["ar+nar"]


def test_loading_the_reference_config_directly_migrates_it_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="vall_e.config"):
        cfg = load_config(FIXTURE)
    assert "python -m vall_e.config migrate" in caplog.text and "reference's layout" in caplog.text
    new = tmp_path / "new.yaml"
    new.write_text(_cli("migrate", str(FIXTURE)).stdout, encoding="utf-8")
    migrated = load_config(new)
    assert cfg.to_dict() == {**migrated.to_dict(), "cfg_path": cfg.to_dict()["cfg_path"]}


def test_a_reference_config_that_needs_a_decision_is_refused_with_one_line(tmp_path):
    flag = tmp_path / "evaluated"
    old = _reference_yaml(tmp_path, "dataset:\n  speaker_name_getter: \"lambda p: p.parts[-2] if "
                                    f"open({str(flag)!r}, 'w') else ''\"\n")
    with pytest.raises(UserError) as e:
        load_config(old)
    assert "python -m vall_e.config migrate" in str(e.value) and "\n" not in str(e.value)
    out = _cli(f"yaml={old}")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "python -m vall_e.config migrate" in out.stderr
    out = _cli("migrate", str(old))  # writes what it can, marks the rest
    assert out.returncode == 1 and "# NEEDS A DECISION" in out.stdout and "dataset.speaker_name_getter" in out.stdout
    assert not flag.exists()  # nothing in the file was run


def test_arch_types_come_from_the_backbone_registry(tmp_path):
    entry = "models:\n  _models:\n  - {{name: ar+nar, resp_levels: 4, arch_type: {arch}, size: {{dim: 128, heads: 4, layers: 3}}}}\n"
    cfg = load_config(_reference_yaml(tmp_path, entry.format(arch="llama")))
    net = cfg.model.networks()["ar+nar"]
    assert (net.backbone, net.n_levels, net.d_model, net.n_heads, net.n_layers) == ("llama", 4, 128, 4, 3)
    with pytest.raises(UserError, match="'gpt5' has no backbone here; choose one of transformer, llama"):
        load_config(_reference_yaml(tmp_path, entry.format(arch="gpt5")))


def test_the_reference_pair_and_its_defaults(tmp_path):
    m = migrate(yaml.safe_load("models:\n  _models:\n  - {name: ar, resp_levels: 1}\n  - {name: nar, resp_levels: 7}\n"
                               "dataset:\n  speaker_group_getter: \"lambda p: f'{p.parts[-3]}'\"\n"))
    assert m.tree["model"]["kind"] == "ar,nar" and m.tree["model"]["n_levels"] == 8
    assert m.tree["model"]["backbone"] == "retnet"  # the reference's default arch_type
    assert m.tree["dataset"]["sample_type"] == "path"  # the reference's default, where ours differs
    assert any(k == "dataset.speaker_group_getter" for k, _ in m.ignored) and not m.decide
    assert not reference_keys(yaml.safe_load((ROOT / "data" / "config.yaml").read_text(encoding="utf-8")))
    out = _cli("migrate", str(ROOT / "data" / "config.yaml"))
    assert out.returncode == 2 and "a config of ours already" in out.stderr


@pytest.mark.parametrize("getter,expected", [
    ("lambda p: f'{p.parts[-3]}_{p.parts[-2]}'", "{group}_{speaker}"),
    ("lambda path: path.parts[-3] + '/' + path.parts[-2]", "{group}/{speaker}"),
    ("lambda p: f'{p.parts[-2]}'", "{speaker}"),
    ("lambda p: 'x{' + p.parts[-2]", "x{{{speaker}"),
    ("lambda p: p.stem", None),
    ("lambda p: p.parts[-1]", None),
    ("lambda p: f'{p.parts[-2]!r}'", None),
    ("lambda p: __import__('os').system('true')", None),
    ("lambda p, q=1: p.parts[-2]", None),
    ("p.parts[-2]", None),
    ("lambda p: (", None),
    (None, None),
])
def test_speaker_name_getters_are_parsed_never_run(getter, expected):
    assert speaker_format(getter) == expected


def test_readme_migrate_example_works_as_written(tmp_path):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S) if "vall_e.config migrate" in b)
    fixture = tmp_path / FIXTURE.relative_to(ROOT)
    fixture.parent.mkdir(parents=True)
    fixture.write_bytes(FIXTURE.read_bytes())
    for line in block.strip().splitlines():
        out = subprocess.run(line.split("#")[0], shell=True, cwd=tmp_path, capture_output=True, text=True,
                             env={**ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{ENV['PATH']}"})
        assert out.returncode == 0, (line, out.stderr)
        if " migrate " not in line:  # the migrated file is a config of ours: no warning
            assert "reference's layout" not in out.stderr and '"backbone": "retnet"' in out.stdout

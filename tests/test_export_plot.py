"""Export (`model.safetensors` with metadata, `load_exported`) and the metrics plot."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vall_e.config import load_config
from vall_e.models.build import build_models, model_config_dict
from vall_e.models.model_file import load_exported, read_export, write_export
from vall_e.models.weights import flat_weights
from vall_e.training.engines.checkpoint import save_checkpoint
from vall_e.training.export import export_checkpoint
from vall_e.training.plot import ema, load_runs
from vall_e.training.plot import main as plot_main
from vall_e.training.plot import resolve
from vall_e.utils.errors import UserError

torch.set_num_threads(1)

SYMMAP = json.dumps({"<pad>": 0, "<s>": 1, "</s>": 2, " ": 3, "a": 4, "b": 5})
LANGMAP = json.dumps({"en": 0, "de": 1})
CODEC = {"name": "encodec", "model": "facebook/encodec_24khz", "bandwidth": 6.0, "n_levels": 2}


def tiny_cfg(tmp_path: Path, kind: str = "ar+nar"):
    return load_config(None, {"cfg_path": str(tmp_path), "model.kind": kind, "model.size": "tiny",
                              "model.d_model": "32", "model.n_heads": "2", "model.n_layers": "1",
                              "model.n_levels": "2", "model.n_codes": "16", "model.n_text_tokens": "8",
                              "model.n_langs": "2"})


def batch(n_levels: int = 2) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"text": [torch.tensor([1, 4, 5, 2]), torch.tensor([1, 5, 4, 4, 2])],
            "lang": torch.tensor([0, 1]),
            "prompt": [torch.randint(0, 16, (5, n_levels), generator=g), torch.randint(0, 16, (4, n_levels), generator=g)],
            "resps": [torch.randint(0, 16, (7, n_levels), generator=g), torch.randint(0, 16, (6, n_levels), generator=g)]}


def outputs(model: torch.nn.Module, levels: list[int]) -> tuple[float, dict]:
    model.eval()
    with torch.no_grad():
        loss, stats = model({**batch(), "levels": torch.tensor(levels)})
    return float(loss), stats


@pytest.mark.parametrize("kind", ["ar+nar", "ar,nar"])
def test_export_round_trip_gives_identical_networks(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    models = build_models(tiny_cfg(tmp_path, kind).model, 6, 2)
    path = write_export(tmp_path / "model.safetensors", {n: m.state_dict() for n, m in models.items()},
                        {n: model_config_dict(m) for n, m in models.items()}, SYMMAP, LANGMAP, CODEC,
                        {"step": 7, "tokens": 99})
    loaded, meta = load_exported(path)
    assert list(loaded) == list(models)
    assert meta["symmap"] == SYMMAP and json.loads(meta["langmap"]) == {"en": 0, "de": 1}
    assert meta["codec"] == CODEC and meta["stats"] == {"step": 7, "tokens": 99} and meta["format_version"] == 1
    for name, m in models.items():
        sd, ld = m.state_dict(), loaded[name].state_dict()
        assert sd.keys() == ld.keys() and all(torch.equal(sd[k], ld[k]) for k in sd)
        assert not loaded[name].training
        levels = [0, 0] if name == "ar" else [1, 1] if name == "nar" else [0, 1]
        assert outputs(m, levels) == outputs(loaded[name], levels)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    if kind == "ar,nar":
        assert all(k.startswith(("ar.", "nar.")) for k in keys)
    else:
        assert set(keys) == set(models["ar+nar"].state_dict())  # a lone network keeps its plain keys


def test_export_dtype_and_loading_into_a_dtype(tmp_path: Path) -> None:
    models = build_models(tiny_cfg(tmp_path).model, 6, 2)
    sd = models["ar+nar"].state_dict()
    path = write_export(tmp_path / "m.safetensors", {"ar+nar": sd}, {"ar+nar": model_config_dict(models["ar+nar"])},
                        SYMMAP, LANGMAP, CODEC, {}, dtype="bfloat16")
    weights, meta = read_export(path)
    assert meta["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in weights["ar+nar"].values() if t.is_floating_point())
    assert path.stat().st_size < 0.6 * sum(t.numel() * 4 for t in sd.values())
    loaded, _ = load_exported(path, dtype="bfloat16")
    assert next(loaded["ar+nar"].parameters()).dtype == torch.bfloat16


def test_damaged_or_foreign_export_is_a_user_error(tmp_path: Path) -> None:
    models = build_models(tiny_cfg(tmp_path).model, 6, 2)
    good = write_export(tmp_path / "m.safetensors", {"ar+nar": models["ar+nar"].state_dict()},
                        {"ar+nar": model_config_dict(models["ar+nar"])}, SYMMAP, LANGMAP, CODEC, {})
    data = good.read_bytes()
    edited = tmp_path / "edited.safetensors"
    b = bytearray(data)
    b[-3] ^= 0x01
    edited.write_bytes(bytes(b))
    with pytest.raises(UserError, match="edited.safetensors.*checksum"):
        load_exported(edited)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.safetensors"):
        load_exported(cut)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(UserError, match="not a vall-e model"):
        load_exported(foreign)
    with pytest.raises(UserError, match="not found"):
        load_exported(tmp_path / "missing.safetensors")


def test_export_command_from_a_checkpoint(tmp_path: Path) -> None:
    from vall_e.training.export import main as export_main

    (tmp_path / "config.yaml").write_text("model: {kind: 'ar,nar', size: tiny, d_model: 32, n_heads: 2, n_layers: 1, "
                                          "n_levels: 2, n_codes: 16, n_text_tokens: 8, n_langs: 2}\n")
    cfg = load_config(tmp_path / "config.yaml")
    with pytest.raises(UserError, match="no training checkpoint"):
        export_main([f"yaml={tmp_path / 'config.yaml'}"])
    models = build_models(cfg.model, 6, 2)
    run_dir = cfg.ckpt_dir / cfg.model.full_name
    meta = {"models": {n: model_config_dict(m) for n, m in models.items()}, "symmap": SYMMAP, "langmap": LANGMAP,
            "codec": CODEC}
    save_checkpoint(run_dir, 12, flat_weights({n: m.state_dict() for n, m in models.items()}),
                    {"step": 12, "samples": 48, "tokens": 900, "val_loss": 2.5, "meta": meta})
    out = tmp_path / "exported.safetensors"
    assert export_main([f"yaml={tmp_path / 'config.yaml'}", "--dtype", "float16", "--out", str(out)]) == 0
    loaded, m = load_exported(out)
    assert m["stats"] == {"step": 12, "samples": 48, "tokens": 900, "val_loss": 2.5}
    assert m["dtype"] == "float16" and set(loaded) == {"ar", "nar"}
    for n in models:
        ref = {k: v.to(torch.float16).float() for k, v in models[n].state_dict().items()}
        got = loaded[n].state_dict()
        assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert export_checkpoint(run_dir / "12", run_dir / "model.safetensors") == run_dir / "model.safetensors"


# ----------------------------------------------------------------------------------------------
# plot
# ----------------------------------------------------------------------------------------------

def write_metrics(path: Path, n: int, scale: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [{"step": 0, "val.loss": 5.0 * scale}]
    for s in range(1, n + 1):
        lines.append({"step": s, "loss": scale * 5 / s, "ar.acc": s / n, "nar.acc": s / (2 * n),
                      "tokens_processed": 100 * s, "lr": 1e-3})
    path.write_text("\n".join(json.dumps(l) for l in lines) + '\n{"step": 99, "loss"')  # cut-off last line


def test_resolve_understands_reference_names() -> None:
    keys = {"step", "loss", "nll", "ar.acc", "nar.acc", "elapsed", "tokens_processed"}
    assert resolve("engine_step", keys) == ["step"] and resolve("it", keys) == ["step"]
    assert resolve("stats.acc", keys) == ["ar.acc", "nar.acc"]
    assert resolve("loss.nll", keys) == ["nll"] and resolve("elapsed_time", keys) == ["elapsed"]
    assert resolve("ar+nar.loss", keys) == ["loss"]
    assert resolve("bogus", keys) == []


def test_ema_matches_pandas_adjusted_formula() -> None:
    vals = [1.0, 2.0, 3.0]
    a = 1 / 11
    w = [(1 - a) ** 2, (1 - a), 1.0]
    assert ema(vals)[-1] == pytest.approx(sum(x * y for x, y in zip(w, vals)) / sum(w))
    assert ema(vals, 0) == vals


def test_plot_writes_png_with_reference_names(tmp_path: Path) -> None:
    write_metrics(tmp_path / "logs" / "run-a" / "metrics.jsonl", 30, 1.0)
    write_metrics(tmp_path / "logs" / "run-b" / "metrics.jsonl", 150, 2.0)
    (tmp_path / "config.yaml").write_text("model: {size: tiny}\n")
    runs = load_runs(tmp_path / "logs")
    assert set(runs) == {"run-a", "run-b"} and len(runs["run-a"]) == 31  # the cut-off line is skipped
    assert plot_main([f"yaml={tmp_path / 'config.yaml'}", "--xs", "tokens_processed", "--ys", "loss", "stats.acc"]) == 0
    png = tmp_path / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    out = tmp_path / "other.png"
    assert plot_main([f"yaml={tmp_path / 'config.yaml'}", "--xs", "engine_step", "--ys", "val.loss", "lr",
                      "--out", str(out), "--max-x", "10"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic: no temporary left
    with pytest.raises(UserError, match="nothing to plot.*available: .*ar.acc"):
        plot_main([f"yaml={tmp_path / 'config.yaml'}", "--ys", "bogus"])


def test_plot_without_logs_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("model: {size: tiny}\n")
    with pytest.raises(UserError, match="no metrics.jsonl"):
        plot_main([f"yaml={tmp_path / 'config.yaml'}"])

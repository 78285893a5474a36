"""DeepSpeed engine: two CPU processes, ZeRO-2 over gloo, with the real VALL-E on a generated corpus.

Slow (each launch imports DeepSpeed, ~10 s of CPU per process): run with `pytest -m slow
tests/test_deepspeed.py`. Skipped when DeepSpeed is not installed (`pip install vall-e[deepspeed]`).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_train import make_corpus, records
from vall_e.config import load_config
from vall_e.models.weights import split_weights
from vall_e.training.engines.checkpoint import load_checkpoint
from vall_e.training.trainer import TIMING_KEYS
from vall_e.utils.errors import UserError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _has_deepspeed() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("deepspeed") is not None
    except (ImportError, ValueError):
        return False


needs_deepspeed = pytest.mark.skipif(not _has_deepspeed(),
                                     reason="DeepSpeed is not installed (pip install vall-e[deepspeed])")


@pytest.fixture(autouse=True)
def _only_with_slow(request: pytest.FixtureRequest) -> None:
    """About two minutes on 2 cores: kept out of the default run even where DeepSpeed is installed."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("multi-process DeepSpeed runs: run with -m slow")

# One launch, three runs in the same two processes: A trains 4 steps straight; B trains 2 steps,
# then a new Trainer resumes it to step 4; C trains 2 steps with compression (8-bit QAT) training.
DS_SCRIPT = """
import json, math, sys
sys.path.insert(0, {repo!r})
import torch, torch.distributed as dist
torch.set_num_threads(1)
from pathlib import Path
from safetensors.torch import save_file
from vall_e.config import load_config
from vall_e.training.trainer import Trainer

root = Path(sys.argv[1])
yaml = root / "config.yaml"
common = {{"trainer.backend": "deepspeed", "trainer.deepspeed.zero_optimization_level": "2",
          "trainer.save_frequency": "2", "evaluation.frequency": "2", "evaluation.size": "4",
          "hyperparameters.gradient_accumulation_steps": "2", "hyperparameters.batch_size": "2"}}

def run(name, iterations, **extra):
    cfg = load_config(yaml, {{**common, "model.name": name, "trainer.iterations": str(iterations), **extra}})
    t = Trainer(cfg, builder=None, read_stdin=False)
    assert t.run() == 0
    return t

def dump(t, tag):
    eng = t.engines["ar+nar"]
    sd = {{k: v.detach().float().contiguous().clone() for k, v in eng.full_state_dict().items()}}
    save_file(sd, str(root / f"{{tag}}.rank{{dist.get_rank()}}.safetensors"))
    return eng

run("straight", 4)
dump(run("straight", 4), "A")  # again: finds step 4 done, loads both checkpoints' files, trains and saves nothing
run("resumed", 2)
t = run("resumed", 4)
dump(t, "B")
eng = dump(run("compressed", 2, **{{"trainer.deepspeed.use_compression_training": "true"}}), "C")
if dist.get_rank() == 0:
    kinds = sorted({{type(m).__name__ for m in eng.module.modules()}})
    (root / "compressed.json").write_text(json.dumps({{"modules": kinds, "stage": eng.stage,
                                                      "funnel": eng.funnel.enabled}}))
# D: the stand-in network with a NaN loss in one rank's batch (tests/test_train.py's tiny_builder)
from tests.test_train import make_cfg, tiny_builder
t = Trainer(make_cfg(root / "nan", **{{"trainer.backend": "deepspeed", "trainer.deepspeed.zero_optimization_level": 2,
                                      "trainer.iterations": 4, "trainer.save_frequency": 4,
                                      "evaluation.frequency": 0}}),
            builder=tiny_builder(n=12, poison=(3,)), read_stdin=False)
assert t.run() == 0
dump(t, "D")
dist.destroy_process_group()
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


@needs_deepspeed
def test_zero2_two_cpu_processes_train_save_resume_and_compress(tmp_path: Path) -> None:
    y = make_corpus(tmp_path)
    script = tmp_path / "ds.py"
    script.write_text(DS_SCRIPT.format(repo=str(REPO)))
    proc = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                           str(tmp_path)], capture_output=True, text=True, timeout=400, env=_env(), cwd=str(tmp_path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]

    for tag in "ABCD":  # ZeRO-2 all-gathers the updated partitions: both ranks hold the same weights
        r0, r1 = _load(tmp_path / f"{tag}.rank0.safetensors"), _load(tmp_path / f"{tag}.rank1.safetensors")
        assert _same(r0, r1), tag

    a = _load(tmp_path / "A.rank0.safetensors")
    cfg = load_config(y)
    step2 = split_weights(load_checkpoint(tmp_path / "ckpt" / "straight" / "2")[0], ["ar+nar"])["ar+nar"]
    assert not _same(step2, a)  # it trained between the checkpoints
    # the checkpoint layout is the local engine's, plus DeepSpeed's per-rank optimizer partitions
    step4 = tmp_path / "ckpt" / "straight" / "4"
    ck = split_weights(load_checkpoint(step4)[0], ["ar+nar"])["ar+nar"]
    assert _same(ck, a)
    shards = sorted(p.name for p in (step4 / "deepspeed" / "ar+nar").glob("*optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert not list((tmp_path / "ckpt" / "straight").glob("*.tmp*"))  # written to a temporary folder, renamed
    state = load_checkpoint(step4)[1]
    assert state["step"] == 4 and state["world_size"] == 2 and len(state["rng"]) == 2

    # resume: 2 steps + a new process resuming to 4 == 4 steps straight (optimizer partitions, LR
    # schedule, sampler and RNG all restored)
    b = _load(tmp_path / "B.rank0.safetensors")
    assert _same(a, b, atol=1e-6)

    for name in ("straight", "resumed"):
        recs = [r for r in records(tmp_path, name) if "loss" in r]
        assert [r["step"] for r in recs] == [1, 2, 3, 4], name
        assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in recs)
        assert recs[-1]["samples_processed"] == 4 * 2 * 2 * 2  # steps x accumulation x batch x ranks
        assert any("val.loss" in r for r in records(tmp_path, name))
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]  # noqa: E731
    assert strip(records(tmp_path, "straight")) == strip(records(tmp_path, "resumed"))

    # compression training: the backbone's linear layers are DeepSpeed's quantization-aware ones; the
    # checkpoint keeps the plain model's keys, so it exports and loads into an uncompressed VALLE
    info = json.loads((tmp_path / "compressed.json").read_text())
    assert "LinearLayer_Compress" in info["modules"] and info["stage"] == 2 and info["funnel"]
    c = _load(tmp_path / "C.rank0.safetensors")
    assert c.keys() == a.keys()
    recs = [r for r in records(tmp_path, "compressed") if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2] and all(math.isfinite(r["loss"]) for r in recs)
    assert recs[-1]["skipped_nan"] == 0
    assert not _same(c, a) and cfg.model.n_levels == 2

    # a NaN loss on one rank: every rank backpropagates zeros for that micro-batch (through the gradient
    # funnel, so the ZeRO buckets still match), the weights stay finite and equal, the step is counted
    d = _load(tmp_path / "D.rank0.safetensors")
    assert all(torch.isfinite(v).all() for v in d.values())
    recs = [r for r in records(tmp_path / "nan") if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and recs[-1]["skipped_nan"] >= 1
    assert any(r["grad_norm"] == 0.0 for r in recs)


@needs_deepspeed
def test_compression_quantizes_the_backbone_without_nan_on_padding(tmp_path: Path) -> None:
    """DeepSpeed's symmetric fake-quantizer divides by a zero scale on all-zero rows (VALL-E's padding
    after the backbone's norm); the engine's replacement matches it elsewhere and stays finite."""
    from deepspeed.compression.utils import SymQuantizer

    from vall_e.training.engines.deepspeed import DeepSpeedEngine, _SafeSymQuantizer
    from vall_e.training.trainer import build_parts

    x = torch.randn(6, 16)
    assert torch.equal(_SafeSymQuantizer.apply(x, 8, None, None, 6), SymQuantizer.apply(x, 8, None, None, 6))
    x[2] = 0
    assert torch.isnan(SymQuantizer.apply(x, 8, None, None, 6)).any()
    q = _SafeSymQuantizer.apply(x, 8, None, None, 6)
    assert torch.equal(q[2], torch.zeros(16)) and torch.isfinite(q).all()

    y = make_corpus(tmp_path)
    cfg = load_config(y, {"trainer.backend": "deepspeed", "trainer.deepspeed.use_compression_training": "true",
                          "trainer.deepspeed.compression_bits": "4"})
    torch.manual_seed(0)
    parts = build_parts(cfg, 0, 1, {})
    model = parts.models["ar+nar"]
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {**next(iter(parts.train_loader)), "levels": [0, 1, 0, 1]}
    model.eval()
    with torch.no_grad():
        ref, _ = model(batch)
    eng = object.__new__(DeepSpeedEngine)  # just the compression step, without deepspeed.initialize
    eng.compression = None
    compressed = eng._compress(model, 4)
    compressed.eval()
    assert compressed.state_dict().keys() == plain.keys()
    with torch.no_grad():
        out, _ = compressed(batch)
    assert torch.isfinite(out) and abs(float(out) - float(ref)) > 1e-4  # 4-bit weights/activations change it
    with pytest.raises(UserError, match="compression_bits"):
        eng._compress(model, 3)
    # ZeRO-3 cannot serve a network whose ranks run different heads: refused before any collective
    with pytest.raises(UserError, match="stage 2"):
        DeepSpeedEngine("ar+nar", model, load_config(y, {"trainer.deepspeed.zero_optimization_level": "3"}),
                        torch.device("cpu"), 10, rank=0, world_size=2)


@needs_deepspeed
def test_deepspeed_launcher_runs_the_trainer(tmp_path: Path) -> None:
    """`deepspeed --module vall_e.train yaml=...` on a CPU-only machine (2 processes)."""
    launcher = shutil.which("deepspeed", path=str(Path(PY).parent)) or shutil.which("deepspeed")
    if launcher is None:
        pytest.skip("the `deepspeed` launcher script is not on PATH")
    y = make_corpus(tmp_path)
    proc = subprocess.run([launcher, "--num_accelerators", "2", "--master_port", "29517", "--module", "vall_e.train",
                           f"yaml={y}", "trainer.backend=deepspeed", "trainer.deepspeed.zero_optimization_level=2",
                           "trainer.iterations=2", "model.name=launched"],
                          capture_output=True, text=True, timeout=400, env=_env(), cwd=str(tmp_path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    state = load_checkpoint(tmp_path / "ckpt" / "launched" / "2")[1]
    assert state["step"] == 2 and state["world_size"] == 2
    assert (tmp_path / "ckpt" / "launched" / "2" / "deepspeed" / "ar+nar").is_dir()


class _Evil:
    """Unpickling this runs a shell command: what a tampered checkpoint file would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@needs_deepspeed
def test_deepspeed_state_files_are_loaded_without_unpickling_code(tmp_path: Path) -> None:
    """DeepSpeed's own loader unpickles its `*_optim_states.pt`; ours refuses code and keeps the data."""
    from types import SimpleNamespace

    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from vall_e.training.engines.deepspeed import _load_without_pickle

    engine = SimpleNamespace(checkpoint_engine=SimpleNamespace(load=None))
    _load_without_pickle(engine)
    marker = tmp_path / "pwned"
    evil = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": _Evil(marker)}, evil)
    with pytest.raises(UserError, match="not a loadable DeepSpeed checkpoint file"):
        engine.checkpoint_engine.load(str(evil))
    assert not marker.exists()  # nothing ran
    good = tmp_path / "good.pt"
    torch.save({"loss_scaler": LossScaler(128.0), "w": torch.ones(3)}, good)
    state = engine.checkpoint_engine.load(str(good))
    assert state["loss_scaler"].cur_scale == 128.0 and torch.equal(state["w"], torch.ones(3))

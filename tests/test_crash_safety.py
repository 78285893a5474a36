"""Crash safety: the trainer killed with SIGKILL at random points (checkpoint writes included),
again and again, resumes each time from its last complete checkpoint and ends bit-identical to an
uninterrupted run, with no step counted twice and nothing corrupt on disk."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_train import REPO, TIMING_KEYS, ckpt_weights, records, run_tiny
from vall_e.training.engines.checkpoint import read_latest, step_dirs, verify_checkpoint

ITERATIONS = 40
KILLS = 10

CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
import vall_e.training.engines.checkpoint as ck
_orig = ck.save_safetensors
def slow_save(*a, **k):  # widen the write window so kills land inside checkpoint writes
    _orig(*a, **k)
    time.sleep(0.05)
ck.save_safetensors = slow_save
from tests.test_train import tiny_builder
from vall_e.utils.errors import run_main
from vall_e.training.trainer import main
run_main(lambda argv: main(argv, builder=tiny_builder(n=10, delay=0.02)), sys.argv[1:])
"""

CONFIG = ("device: cpu\nseed: 0\nmodel: {{name: tiny}}\n"
          "trainer: {{iterations: {it}, save_frequency: 1, tensorboard: false, keep_last_checkpoints: 3}}\n"
          "evaluation: {{frequency: 0, synthesize: 0}}\n"
          "hyperparameters: {{batch_size: 2, scheduler: constant, learning_rate: 0.001, warmup_steps: 0}}\n")


@pytest.mark.slow
def test_repeated_sigkill_resumes_to_an_identical_model(tmp_path: Path) -> None:
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    killed.mkdir()
    (killed / "config.yaml").write_text(CONFIG.format(it=ITERATIONS))
    script = killed / "child.py"
    script.write_text(CHILD.format(repo=str(REPO)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    rng = random.Random(1234)
    run_dir = killed / "ckpt" / "tiny"
    kills, mid_write, progress = 0, 0, []
    while kills < KILLS:
        before = read_latest(run_dir) or 0
        proc = subprocess.Popen([sys.executable, str(script), f"yaml={killed / 'config.yaml'}"], cwd=str(killed),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            # wait until it trains past its resume point, then kill at a random moment
            deadline = time.monotonic() + 120
            while (read_latest(run_dir) or 0) <= before and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.25))
            if proc.poll() is not None:
                break  # it finished all iterations before we could kill it
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        kills += 1
        leftovers = [p for p in run_dir.iterdir() if p.name.startswith(".")] if run_dir.exists() else []
        mid_write += bool(leftovers)
        latest = read_latest(run_dir)
        assert latest is not None and latest >= before
        verify_checkpoint(run_dir / str(latest))  # the checkpoint `latest` names is complete and intact
        progress.append(latest)
    assert kills >= KILLS, f"only {kills} kills before the run finished; lower the delay"
    # finish the run, then compare with an uninterrupted one
    final = subprocess.run([sys.executable, str(script), f"yaml={killed / 'config.yaml'}"], cwd=str(killed),
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=300)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    overrides = {"trainer.save_frequency": 1, "hyperparameters.scheduler": "constant", "evaluation.frequency": 0,
                 "hyperparameters.learning_rate": 0.001, "hyperparameters.warmup_steps": 0,
                 "trainer.iterations": ITERATIONS, "trainer.keep_last_checkpoints": 3}
    from tests.test_train import tiny_builder

    run_tiny(straight, builder=tiny_builder(n=10), **overrides)
    a, b = ckpt_weights(straight, ITERATIONS), ckpt_weights(killed, ITERATIONS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in records(killed) if "loss" in r]
    assert steps == list(range(1, ITERATIONS + 1)), "a step was lost or counted twice"
    strip = lambda recs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in recs]  # noqa: E731
    assert strip(records(straight)) == strip(records(killed))
    assert all(verify_checkpoint(run_dir / str(s)) is not None for s in step_dirs(run_dir))
    print(json.dumps({"kills": kills, "kills_during_a_write": mid_write, "latest_after_each_kill": progress}))

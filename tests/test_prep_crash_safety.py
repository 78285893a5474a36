"""Crash safety of data preparation: g2p, qnt, the WORLD codebook fit and the HDF5 build, each killed
with SIGKILL at random moments (writes included) at least 10 times and re-run after each kill.

After every kill each output file that exists is complete (it loads and equals an uninterrupted
run's), and the final, uninterrupted run (the real `python -m ...` command) completes the job with
outputs equal to an uninterrupted run's and no temporary files left behind.

The killed runs are forked from a forkserver that has already imported torch and vall_e, so a run
costs its work and not ~5 s of imports (each one still runs the command's `main` through `run_main`,
as `python -m` does, in a process of its own). In those runs `os.fsync` sleeps a little, which
widens the moment between a complete temporary file and its rename so that kills land there too.
Those four tests are slow (about 2-3 minutes on 2 loaded cores): run them with
`pytest -m slow tests/test_prep_crash_safety.py`. The quick test of the temp-file sweep runs by default.
"""
from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
KILLS = 10  # per command
MAINS = {"g2p": "vall_e.emb.g2p", "qnt": "vall_e.emb.qnt", "fit": "vall_e.codecs.world", "hdf5": "vall_e.data.__main__"}
CLI = {"g2p": "vall_e.emb.g2p", "qnt": "vall_e.emb.qnt", "fit": "vall_e.codecs.world", "hdf5": "vall_e.data"}
FIT_ARGS = ["--levels", "8", "--codes", "32", "--iters", "5", "--seed", "0"]
PRELOAD = ["torch", "numpy", "h5py", "soundfile", "tqdm", "pyworld", "vall_e.config", "vall_e.utils.audio",
           "vall_e.codecs", "vall_e.codecs.world", "vall_e.emb.codes", "vall_e.emb.g2p", "vall_e.emb.qnt",
           "vall_e.text.phonemes", "vall_e.data.hdf5", "vall_e.data.__main__", "tests.test_prep_crash_safety"]


@pytest.fixture(autouse=True)
def _only_with_slow(request: pytest.FixtureRequest) -> None:
    """Minutes of repeated runs: kept out of the default run."""
    if request.node.get_closest_marker("slow") and "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("repeated SIGKILLed data-preparation runs: run with -m slow")


# ----- running a command in a killable process -----

def _child(cmd: str, argv: list[str], log: str, slow_fsync: float) -> None:
    """A command's `main` as `python -m` runs it, output to `log`; fsync slowed by `slow_fsync` s."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import threading

    import torch
    from tqdm import tqdm

    torch.set_num_threads(1)
    # tqdm's default lock is a multiprocessing semaphore, which a killed process leaks (the resource
    # tracker then warns about it); its bars here need only a thread lock
    tqdm.set_lock(threading.RLock())
    if slow_fsync:
        real = os.fsync

        def fsync(fileno: int) -> None:
            time.sleep(slow_fsync)
            real(fileno)

        os.fsync = fsync
    from vall_e.utils.errors import run_main

    run_main(importlib.import_module(MAINS[cmd]).main, argv)


def _noop() -> None:
    pass


_CTX: Any = None


def _ctx() -> Any:
    """The forkserver context; started here (its imports done) so that later runs time only their work."""
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
        p = _CTX.Process(target=_noop, daemon=True)
        p.start()
        p.join(300)
    return _CTX


def start(cmd: str, argv: list[str], log: Path, slow: float) -> Any:
    p = _ctx().Process(target=_child, args=(cmd, argv, str(log), slow), daemon=True)
    p.start()
    return p


def run_to_end(cmd: str, argv: list[str], log: Path, slow: float = 0.0) -> float:
    """Run uninterrupted in a forked process; return its wall time."""
    _ctx()
    t = time.monotonic()
    p = start(cmd, argv, log, slow)
    p.join(300)
    assert p.exitcode == 0, f"{cmd} {argv} failed ({p.exitcode}):\n{log.read_text()[-3000:]}"
    return time.monotonic() - t


def run_cli(cmd: str, argv: list[str], cwd: Path) -> float:
    """The real command line, uninterrupted."""
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", CLI[cmd], *argv], cwd=str(cwd), capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return time.monotonic() - t


def temps(folder: Path) -> set[Path]:
    """Hidden temporary files (what `atomic_path` writes before its rename)."""
    return {p for p in folder.rglob(".*") if ".tmp" in p.name}


def files(folder: Path, suffix: str) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob(f"*{suffix}")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


# ----- the kill loop -----

@dataclass
class Job:
    cmd: str
    argv: list[str]
    folder: Path  # where its outputs and temporary files appear
    suffix: str  # its outputs' ending
    check: Callable[[], None]  # every existing output is complete and right
    total: int = 1  # outputs when done
    resumable: bool = False  # skips finished outputs on a re-run
    slow: float = 0.05


def kill_repeatedly(job: Job, ref_time: float, rng: random.Random, log: Path) -> dict[str, Any]:
    """Start, SIGKILL at a random moment, check, repeat until KILLS kills; returns counts."""
    kills = attempts = completed = mid_write = over_output = 0
    left_behind: list[int] = []
    per_output = ref_time / job.total
    cap = max(1, job.total // (KILLS + 3))  # outputs a resumable run may finish before its kill
    while kills < KILLS:
        if not job.resumable and kills == KILLS // 2 and not files(job.folder, job.suffix):
            # the second half: let one run complete; the later kills must leave its output intact
            run_to_end(job.cmd, job.argv, log, job.slow)
            assert files(job.folder, job.suffix) and not temps(job.folder), sorted(temps(job.folder))
            job.check()
            completed += 1
        attempts += 1
        assert attempts <= 3 * KILLS, f"{job.cmd}: only {kills} kills in {attempts - 1} runs"
        done, old_temps = files(job.folder, job.suffix), temps(job.folder)
        had_output = bool(done)
        remaining = job.total - len(done) if job.resumable else job.total
        assert remaining > 0 or not job.resumable, f"{job.cmd}: finished after {kills} kills; make the job bigger"
        wait_for = rng.randint(0, min(cap, remaining - 1)) if job.resumable else 0
        in_write = kills % 3 == 1  # kills 2, 5 and 8 wait for a temporary file of the run's own
        p = start(job.cmd, job.argv, log, job.slow)
        deadline = time.monotonic() + 120
        while (job.resumable and len(files(job.folder, job.suffix) - done) < wait_for and p.is_alive()
               and time.monotonic() < deadline):
            time.sleep(0.005)
        if in_write:  # a temporary file of this run exists: kill during that write
            while not (temps(job.folder) - old_temps) and p.is_alive() and time.monotonic() < deadline:
                time.sleep(0.002)
            delay = rng.uniform(0.0, job.slow)
        else:
            delay = rng.uniform(0.0, 1.5 * per_output if job.resumable else 0.9 * ref_time)
        time.sleep(delay)
        if p.is_alive():
            p.kill()  # SIGKILL
        p.join(30)
        if p.exitcode != -signal.SIGKILL:  # it finished first (perhaps just before the signal): not a kill
            assert p.exitcode == 0, log.read_text()[-3000:]
            completed += 1
            job.check()
            if not job.resumable and kills < KILLS // 2:  # the first half of the kills hit a fresh job
                for rel in files(job.folder, job.suffix):
                    (job.folder / rel).unlink()
            continue
        kills += 1
        over_output += had_output
        new = temps(job.folder) - old_temps
        mid_write += bool(new)
        left_behind.append(len(temps(job.folder)))
        job.check()
    return {"kills": kills, "runs_that_completed": completed, "kills_leaving_a_temp_file": mid_write,
            "kills_with_outputs_already_there": over_output,
            "temp_files_after_each_kill": left_behind,
            "outputs_after_kills": len(files(job.folder, job.suffix)), "outputs_total": job.total}


def finish_and_compare(job: Job, cwd: Path, compare: Callable[[], None]) -> float:
    """The real command completes the job; its outputs equal the uninterrupted run's; no temp files."""
    seconds = run_cli(job.cmd, job.argv, cwd)
    assert len(files(job.folder, job.suffix)) == job.total
    compare()
    assert temps(job.folder) == set(), f"{job.cmd} left temporary files: {sorted(temps(job.folder))}"
    return seconds


# ----- the corpus and the uninterrupted reference runs, once per module -----

@dataclass
class Prep:
    root: Path
    corpus: Path  # wav + txt
    g2p_in: Path  # transcripts only, three copies of the corpus's
    codebooks: Path
    h5_in: Path  # corpus + .phn.txt + .qnt.pt + config.yaml
    ref: dict[str, Path]  # uninterrupted outputs' folders
    seconds: dict[str, float]


def _dirs(folder: Path) -> list[str]:
    return sorted(str(p.parent.relative_to(folder)) for p in folder.rglob("*.wav") if p.name.endswith("_0000.wav"))


@pytest.fixture(scope="module")
def prep(tmp_path_factory: pytest.TempPathFactory) -> Prep:
    from vall_e.data.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("prep")
    corpus = root / "corpus"
    generate_corpus(corpus, n_speakers=2, n_utterances=12, seed=0, group="g", progress=False)
    g2p_in = root / "g2p_in"
    for copy in ("a", "b", "c"):
        shutil.copytree(corpus, g2p_in / copy, ignore=shutil.ignore_patterns("*.wav"))
    log, seconds, ref = root / "ref.log", {}, {}
    ref["g2p"] = root / "ref_g2p"
    shutil.copytree(g2p_in, ref["g2p"])
    seconds["g2p"] = run_to_end("g2p", [str(ref["g2p"]), "--quiet", "--batch-size", "4"], log, 0.02)
    ref["fit"] = root / "ref_fit"
    codebooks = ref["fit"] / "codebooks.safetensors"
    seconds["fit"] = run_to_end("fit", ["fit", str(corpus), "--out", str(codebooks), *FIT_ARGS], log, 0.3)
    ref["qnt"] = root / "ref_qnt"
    shutil.copytree(corpus, ref["qnt"])
    seconds["qnt"] = run_to_end("qnt", [str(ref["qnt"]), "codec.name=world", f"codec.codebooks={codebooks}",
                                        "--batch-size", "2"], log, 0.05)
    h5_in = root / "h5_in"
    shutil.copytree(ref["qnt"], h5_in)
    run_to_end("g2p", [str(h5_in), "--quiet"], log)
    (h5_in / "config.yaml").write_text(f"dataset:\n  training: [{', '.join(_dirs(h5_in))}]\n"
                                       "  validation_fraction: 0.2\nmodel:\n  n_levels: 8\n")
    ref["hdf5"] = root / "ref_hdf5"
    shutil.copytree(h5_in, ref["hdf5"])
    seconds["hdf5"] = run_to_end("hdf5", [f"yaml={ref['hdf5'] / 'config.yaml'}", "--action", "hdf5"], log, 0.3)
    print("\nuninterrupted runs (forked, s):", json.dumps({k: round(v, 2) for k, v in seconds.items()}))
    return Prep(root, corpus, g2p_in, codebooks, h5_in, ref, seconds)


def report(name: str, stats: dict[str, Any], final: float) -> None:
    print(f"\n{name}: " + json.dumps({**stats, "final_cli_run_s": round(final, 2)}))


# ----- the four commands -----

@pytest.mark.slow
def test_g2p_survives_repeated_sigkill(prep: Prep, tmp_path: Path) -> None:
    work = tmp_path / "g2p"
    shutil.copytree(prep.g2p_in, work)
    ref = prep.ref["g2p"]

    def check() -> None:
        from vall_e.text.symmap import read_phonemes

        for rel in files(work, ".phn.txt"):
            assert read_phonemes(work / rel)  # loads
            assert (work / rel).read_bytes() == (ref / rel).read_bytes(), rel

    def compare() -> None:
        assert files(work, ".phn.txt") == files(ref, ".phn.txt")
        check()

    job = Job("g2p", [str(work), "--quiet", "--batch-size", "4"], work, ".phn.txt", check,
              total=len(files(ref, ".phn.txt")), resumable=True, slow=0.02)
    stats = kill_repeatedly(job, prep.seconds["g2p"], random.Random(1), tmp_path / "log")
    report("g2p", stats, finish_and_compare(job, tmp_path, compare))


@pytest.mark.slow
def test_world_codebook_fit_survives_repeated_sigkill(prep: Prep, tmp_path: Path) -> None:
    from safetensors import safe_open

    from vall_e.codecs.world import WorldCodec

    out = tmp_path / "books" / "codebooks.safetensors"
    out.parent.mkdir()

    def contents(path: Path) -> tuple[dict[str, str], dict[str, bytes]]:
        """Metadata and tensors (the bytes differ: safetensors writes metadata in hash-map order)."""
        with safe_open(str(path), framework="pt") as f:
            return f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}

    want = contents(prep.codebooks)

    def check() -> None:
        if out.exists():
            WorldCodec(out)  # loads
            assert contents(out) == want  # the same seed gives the same codebooks

    job = Job("fit", ["fit", str(prep.corpus), "--out", str(out), *FIT_ARGS], out.parent, ".safetensors", check,
              slow=0.3)
    stats = kill_repeatedly(job, prep.seconds["fit"], random.Random(2), tmp_path / "log")
    report("fit", stats, finish_and_compare(job, tmp_path, check))


@pytest.mark.slow
def test_qnt_survives_repeated_sigkill(prep: Prep, tmp_path: Path) -> None:
    from vall_e.emb.codes import read_codes

    work = tmp_path / "qnt"
    shutil.copytree(prep.corpus, work)
    ref = prep.ref["qnt"]

    def check() -> None:
        for rel in files(work, ".qnt.pt"):
            codes, spec = read_codes(work / rel)  # loads
            want, want_spec = read_codes(ref / rel)
            assert spec == want_spec and codes.equal(want), rel

    def compare() -> None:
        assert files(work, ".qnt.pt") == files(ref, ".qnt.pt")
        check()

    job = Job("qnt", [str(work), "codec.name=world", f"codec.codebooks={prep.codebooks}", "--batch-size", "2"],
              work, ".qnt.pt", check, total=len(files(ref, ".qnt.pt")), resumable=True, slow=0.05)
    stats = kill_repeatedly(job, prep.seconds["qnt"], random.Random(3), tmp_path / "log")
    report("qnt", stats, finish_and_compare(job, tmp_path, compare))


def h5_contents(path: Path) -> dict[str, Any]:
    """Every group's and dataset's attributes and values, by name (the file's bytes may differ)."""
    from vall_e.data.hdf5 import open_hdf5

    def plain(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            return (v.dtype.str, v.shape, v.tobytes())
        return v.item() if isinstance(v, np.generic) else v

    out: dict[str, Any] = {}
    with open_hdf5(path) as f:  # refuses an incomplete file
        out["/"] = {k: plain(v) for k, v in f.attrs.items()}

        def visit(name: str, obj: Any) -> None:
            value = plain(obj[()]) if hasattr(obj, "dtype") else None
            out[name] = ({k: plain(v) for k, v in obj.attrs.items()}, value)

        f.visititems(visit)
    return out


@pytest.mark.slow
def test_hdf5_build_survives_repeated_sigkill(prep: Prep, tmp_path: Path) -> None:
    work = tmp_path / "h5"
    shutil.copytree(prep.h5_in, work)
    want = h5_contents(prep.ref["hdf5"] / "data.h5")
    assert any(k.startswith("training/") for k in want)

    def check() -> None:
        h5 = work / "data.h5"
        if h5.exists():
            assert h5_contents(h5) == want

    job = Job("hdf5", [f"yaml={work / 'config.yaml'}", "--action", "hdf5"], work, ".h5", check, slow=0.3)
    stats = kill_repeatedly(job, prep.seconds["hdf5"], random.Random(4), tmp_path / "log")
    report("hdf5", stats, finish_and_compare(job, tmp_path, check))


# ----- the sweep of killed writers' temporary files (quick; runs by default) -----

KILLED_WRITER = """
import os, sys
from vall_e.utils.io import atomic_path
open_writes = [atomic_path(target) for target in sys.argv[1:]]  # kept alive: never closed
for cm in open_writes:
    cm.__enter__().write_bytes(b"half-written")
os._exit(0)  # killed mid-write: no rename, no clean-up
"""


def test_stale_temp_sweep_removes_only_killed_writers_temps(tmp_path: Path) -> None:
    from vall_e.utils.io import remove_stale_temps

    nested = tmp_path / "g" / "spk"
    nested.mkdir(parents=True)
    targets = [nested / "u1.phn.txt", tmp_path / "u2.phn.txt", nested / "u1.qnt.pt",
               tmp_path / "codebooks.safetensors", tmp_path / "mycodebooks.safetensors"]
    subprocess.run([sys.executable, "-c", KILLED_WRITER, *map(str, targets)], check=True, timeout=60,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    assert len(temps(tmp_path)) == len(targets) and not any(t.exists() for t in targets)
    keep = [nested / "u3.phn.txt", nested / ".u3.phn.txt", tmp_path / ".notes.tmp.txt"]
    for p in keep:
        p.write_text("x")

    def names() -> set[str]:
        return {p.name for p in tmp_path.rglob("*")}

    assert remove_stale_temps(tmp_path, ".phn.txt") == 1  # not recursive: the top folder's only
    assert remove_stale_temps(tmp_path, ".phn.txt", recursive=True) == 1
    assert remove_stale_temps(tmp_path, "codebooks.safetensors", exact=True) == 1
    assert any(n.startswith(".mycodebooks.safetensors.") for n in names())  # another target's temp stays
    assert remove_stale_temps(tmp_path, ".qnt.pt", recursive=True) == 1
    assert {p.name for p in temps(tmp_path)} == {".notes.tmp.txt"} | {
        n for n in names() if n.startswith(".mycodebooks.safetensors.")}
    assert all(p.read_text() == "x" for p in keep)

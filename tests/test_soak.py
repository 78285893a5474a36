"""Soak tests (issue [H]): the HTTP server and the trainer keep their memory flat over long runs.

Outside the default suite: every test here is marked `soak` and skips unless `-m soak` is given
(the same pattern as the `slow` tests). Run them at full length with

    VALLE_SOAK_REPORT_DIR=/some/dir nice -n 19 .venv/bin/python -m pytest -m soak tests/test_soak.py -x -q -s

Knobs (environment): VALLE_SOAK_SECONDS (server soak length, default 1800), VALLE_SOAK_STEPS
(training steps, default 2000), VALLE_SOAK_REPORT_DIR (where the JSON reports go; default the
test's tmp_path). Warm-up is the first 10% of a run (for the server at least 60 s); after it the
process's resident memory (RSS, from /proc) may grow by less than 10%.
"""
from __future__ import annotations

import io
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest
import soundfile as sf

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.test_server import TEXTS, _free_port, voice_bytes  # noqa: E402,F401  (fixtures)
from vall_e.utils.io import atomic_write_text  # noqa: E402

pytestmark = pytest.mark.soak

ROOT = Path(__file__).resolve().parents[1]
KEY = "soak-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_GROWTH = 0.10  # allowed RSS growth after warm-up
MAX_TEXT_CHARS = 500


@pytest.fixture(autouse=True)
def _only_with_soak_marker(request: pytest.FixtureRequest) -> None:
    if "soak" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("a long soak: run with -m soak")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        pytest.fail(f"{name}={raw!r}: not an integer")


def _report_dir(tmp_path: Path) -> Path:
    d = Path(os.environ.get("VALLE_SOAK_REPORT_DIR") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


def proc_status(pid: int) -> dict[str, int]:
    """RSS and peak RSS (bytes), threads and open file descriptors of a live process, from /proc."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["rss" if key == "VmRSS" else "peak"] = int(value.split()[0]) * 1024
            elif key == "Threads":
                out["threads"] = int(value)
    try:
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return out


def median_of(samples: list[dict[str, Any]], key: str = "rss") -> float:
    return float(statistics.median(s[key] for s in samples)) if samples else float("nan")


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(round(q * (len(v) - 1))))]  # noqa: E731
    return {"n": len(v), "p50": round(pick(0.5), 4), "p95": round(pick(0.95), 4), "max": round(v[-1], 4)}


class Sampler(threading.Thread):
    """Samples a process's /proc status every `every` seconds, tagged with `tag()` (e.g. elapsed or step)."""

    def __init__(self, pid: int, every: float, tag: Callable[[], dict[str, Any]]) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pid, self.every, self.tag = pid, every, tag
        self.samples: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                st = proc_status(self.pid)
            except (OSError, ValueError):
                return  # the process is gone
            if "rss" not in st:
                return  # a zombie: it has exited
            self.samples.append({**self.tag(), **st})
            self.stop.wait(self.every)


# ============================================================================================ server
def _start_server(model: Path, voices: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("VALLE_API_KEY", None)
    cmd = [sys.executable, "-m", "vall_e.server", "--model", str(model), "--voices", str(voices),
           "--port", str(port), "--api-key", KEY, "--max-queue", "16", "--max-batch", "4", "--batch-wait-ms", "30",
           "--max-text-chars", str(MAX_TEXT_CHARS), "--max-upload-mb", "1", "--device", "cpu",
           "--log-level", "warning"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not answer /health in time:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


class Load:
    """One client's request mix. Each action returns (kind, expected statuses, response status)."""

    def __init__(self, client: httpx.Client, base: str, idx: int, voice_wav: bytes, seed: int, model_id: str,
                 pool: ThreadPoolExecutor) -> None:
        self.c, self.base, self.idx, self.voice_wav = client, base, idx, voice_wav
        self.model_id, self.pool = model_id, pool
        self.rng = random.Random(seed)
        self.own_voice = f"soak{idx}"
        self.has_own = False

    def _text(self) -> str:
        r = self.rng
        return " ".join(r.sample(TEXTS, r.randint(1, 2)))

    def _speech_body(self, **extra: Any) -> dict[str, Any]:
        r = self.rng
        body = {"input": self._text(), "voice": "alice", "max_ar_steps": r.randint(8, 30),
                "response_format": r.choice(["wav", "flac", "mp3", "pcm"])}
        if r.random() < 0.3:
            body["seed"] = r.randint(0, 1000)
        if r.random() < 0.3:
            body["temperature"] = r.choice([0.7, 1.0])
        if r.random() < 0.2:
            body["input_prompt_length"] = r.choice([1.0, 2.0])
        body.update(extra)
        return body

    # ---------------------------------------------------------------- good requests
    def speech(self) -> tuple[str, tuple[int, ...], int]:
        body = self._speech_body()
        if self.has_own and self.rng.random() < 0.5:
            body["voice"] = self.own_voice
        r = self.c.post("/v1/audio/speech", json=body)
        if r.status_code == 200:
            assert r.content, "empty audio"
            if body["response_format"] in ("wav", "flac"):
                data, sr = sf.read(io.BytesIO(r.content), dtype="float32")
                assert sr == 24_000 and data.shape[0] > 0
            elif body["response_format"] == "pcm":
                assert len(r.content) % 2 == 0
        return "speech", (200,), r.status_code

    def stream(self) -> tuple[str, tuple[int, ...], int]:
        body = self._speech_body(stream=True, response_format=self.rng.choice(["wav", "pcm"]),
                                 max_ar_steps=self.rng.randint(20, 50))
        body.pop("input_prompt_length", None)
        disconnect = self.rng.random() < 0.3  # the client walks away after the first chunk
        with self.c.stream("POST", "/v1/audio/speech", json=body) as r:
            n = 0
            for chunk in r.iter_bytes():
                n += len(chunk)
                if disconnect:
                    break
            if r.status_code == 200:
                assert n > 0, "empty stream"
        return ("stream_cut" if disconnect else "stream"), (200,), r.status_code

    def info(self) -> tuple[str, tuple[int, ...], int]:
        path = self.rng.choice(["/health", "/v1/models", "/v1/voices", f"/v1/models/{self.model_id}"])
        r = self.c.get(path)
        return "info", (200,), r.status_code

    def burst(self) -> tuple[str, tuple[int, ...], int]:
        """3 requests with the same settings at once, so the batcher runs them as one batch."""
        fmt = self.rng.choice(["wav", "pcm"])
        bodies = [{"input": self._text(), "voice": "alice", "max_ar_steps": 20, "response_format": fmt}
                  for _ in range(3)]
        codes = [f.result() for f in [self.pool.submit(lambda b: self.c.post("/v1/audio/speech", json=b).status_code,
                                                       b) for b in bodies]]
        bad = [c for c in codes if c != 200]
        return "burst", (200,), (bad[0] if bad else 200)

    def voice_cycle(self) -> tuple[str, tuple[int, ...], int]:
        """Upload (or replace) this client's own voice, or delete it."""
        if self.has_own and self.rng.random() < 0.4:
            r = self.c.delete(f"/v1/voices/{self.own_voice}")
            self.has_own = False
            return "voice_delete", (200,), r.status_code
        r = self.c.post("/v1/voices", data={"name": self.own_voice},
                        files={"file": ("v.wav", self.voice_wav, "audio/wav")})
        self.has_own = r.status_code == 201
        return "voice_upload", (201,), r.status_code

    # ---------------------------------------------------------------- bad requests
    def bad(self) -> tuple[str, tuple[int, ...], int]:
        c, r = self.c, self.rng
        case = r.randrange(12)
        if case == 0:
            resp = c.post("/v1/audio/speech", content=b"{not json", headers={"Content-Type": "application/json"})
            expect = (400,)
        elif case == 1:
            resp = c.post("/v1/audio/speech", json=self._speech_body(voice="nobody"))
            expect = (404,)
        elif case == 2:
            resp = c.post("/v1/audio/speech", json=self._speech_body(input="   "))
            expect = (400,)
        elif case == 3:
            resp = c.post("/v1/audio/speech", json=self._speech_body(input="a" * (MAX_TEXT_CHARS + 50)))
            expect = (400,)  # over --max-text-chars: the request schema's maxLength
        elif case == 4:
            resp = c.post("/v1/audio/speech", json=self._speech_body(response_format="opus"))
            expect = (400,)
        elif case == 5:
            resp = c.post("/v1/audio/speech", json=self._speech_body(bogus_field=1))
            expect = (400,)
        elif case == 6:
            resp = httpx.get(f"{self.base}/v1/voices", timeout=30)  # no API key
            expect = (401,)
        elif case == 7:
            resp = c.get("/v1/models/nope")
            expect = (404,)
        elif case == 8:
            resp = c.delete("/v1/voices/nobody_here")
            expect = (404,)
        elif case == 9:
            resp = c.post("/v1/voices", data={"name": "broken"}, files={"file": ("b.wav", b"RIFF0000WAVEjunk")})
            expect = (400,)
        elif case == 10:
            resp = c.post("/v1/audio/speech", json=self._speech_body(stream=True, response_format="mp3"))
            expect = (400,)
        else:
            resp = c.post("/v1/audio/speech", json=self._speech_body(temperature=-1.0))
            expect = (400,)
        return f"bad{case}", expect, resp.status_code

    def step(self) -> tuple[str, tuple[int, ...], int]:
        x = self.rng.random()
        if x < 0.35:
            return self.speech()
        if x < 0.40:
            return self.burst()
        if x < 0.60:
            return self.stream()
        if x < 0.75:
            return self.info()
        if x < 0.82:
            return self.voice_cycle()
        return self.bad()


def test_server_memory_is_steady_under_a_request_loop(model_file: Path, voice_bytes: bytes, tmp_path: Path) -> None:
    from tqdm import tqdm

    duration = _env_int("VALLE_SOAK_SECONDS", 1800)
    warmup = max(60.0, 0.1 * duration)
    assert duration > warmup, f"VALLE_SOAK_SECONDS={duration}: must be longer than the 60 s warm-up"
    report_dir = _report_dir(tmp_path)
    voices = tmp_path / "voices"
    voices.mkdir()
    (voices / "alice.wav").write_bytes(voice_bytes)
    log = tmp_path / "server.log"
    proc, base = _start_server(model_file, voices, log)
    model_id = httpx.get(f"{base}/health", timeout=30).json()["model"]
    t0 = time.monotonic()
    counts: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    latencies: dict[str, list[float]] = defaultdict(list)
    failures: list[str] = []
    lock = threading.Lock()
    sampler = Sampler(proc.pid, 2.0, lambda: {"t": round(time.monotonic() - t0, 2)})
    stop_at = t0 + duration

    def client_loop(idx: int) -> None:
        with httpx.Client(base_url=base, headers=AUTH, timeout=120) as client, ThreadPoolExecutor(3) as pool:
            load = Load(client, base, idx, voice_bytes, seed=100 + idx, model_id=model_id, pool=pool)
            while time.monotonic() < stop_at:
                t = time.monotonic()
                try:
                    kind, expect, status = load.step()
                except Exception as e:  # transport errors, bad audio: all count as failures
                    kind, expect, status = "error", (), -1
                    with lock:
                        failures.append(f"{time.monotonic() - t0:.1f}s: {type(e).__name__}: {e}")
                dt = time.monotonic() - t
                with lock:
                    counts[kind] += 1
                    statuses[str(status)] += 1
                    latencies[kind].append(dt)
                    if status >= 500 or (status != -1 and status not in expect):
                        failures.append(f"{time.monotonic() - t0:.1f}s: {kind}: got {status}, expected {expect}")
                time.sleep(0.02)

    try:
        sampler.start()
        threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(2)]
        for th in threads:
            th.start()
        with tqdm(total=duration, unit="s", desc="server soak", leave=False) as bar:
            while any(th.is_alive() for th in threads):
                time.sleep(5)
                bar.n = min(duration, int(time.monotonic() - t0))
                bar.set_postfix(requests=sum(counts.values()), rss_mb=round(sampler.samples[-1]["rss"] / 2**20, 1)
                                if sampler.samples else 0)
                if proc.poll() is not None:
                    break
        for th in threads:
            th.join(180)
        health = httpx.get(f"{base}/health", timeout=30).json() if proc.poll() is None else {}
        sampler.stop.set()
        sampler.join(10)
        alive = proc.poll() is None
    finally:
        sampler.stop.set()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    samples = sampler.samples
    tail = 0.1 * duration
    after = [s for s in samples if warmup <= s["t"] < warmup + max(30.0, 0.05 * duration)]
    last = [s for s in samples if s["t"] >= duration - tail]
    rss_warm, rss_end = median_of(after), median_of(last)
    peak = max(samples, key=lambda s: s["rss"]) if samples else {"rss": float("nan"), "t": None}
    growth = (rss_end - rss_warm) / rss_warm
    good_kinds = {"speech", "burst", "stream", "stream_cut", "info", "voice_upload", "voice_delete"}
    report = {
        "test": "server", "duration_s": duration, "warmup_s": warmup, "wall_s": round(time.monotonic() - t0, 1),
        "clients": 2, "requests_total": sum(counts.values()),
        "http_requests_total": sum(counts.values()) + 2 * counts["burst"],  # a burst is 3 requests at once
        "requests_by_kind": dict(sorted(counts.items())),
        "good_requests": sum(v for k, v in counts.items() if k in good_kinds),
        "bad_requests": sum(v for k, v in counts.items() if k.startswith("bad")),
        "statuses": dict(sorted(statuses.items())), "failures": failures[:50], "n_failures": len(failures),
        "latency_s": {k: percentiles(v) for k, v in sorted(latencies.items())},
        "rss_after_warmup_mb": round(rss_warm / 2**20, 2), "rss_end_mb": round(rss_end / 2**20, 2),
        "rss_max_mb": round(peak["rss"] / 2**20, 2), "rss_max_at_s": peak["t"],
        "rss_growth_pct": round(100 * growth, 2),
        "threads_after_warmup": median_of(after, "threads"), "threads_end": median_of(last, "threads"),
        "fds_after_warmup": median_of(after, "fds"), "fds_end": median_of(last, "fds"),
        "server_health_at_end": health, "server_alive_at_end": alive,
        "samples": [{"t": s["t"], "rss_mb": round(s["rss"] / 2**20, 2), "threads": s.get("threads"),
                     "fds": s.get("fds")} for s in samples],
    }
    out = report_dir / "server_soak.json"
    atomic_write_text(out, json.dumps(report, indent=1))
    print(f"\nserver soak: {report['requests_total']} requests in {report['wall_s']} s; RSS after warm-up "
          f"{report['rss_after_warmup_mb']} MB, end {report['rss_end_mb']} MB ({report['rss_growth_pct']:+.2f}%), "
          f"max {report['rss_max_mb']} MB; report {out}")
    assert alive, f"the server died:\n{log.read_text()[-3000:]}"
    assert not failures, failures[:20]
    assert counts["speech"] > 0 and counts["stream"] > 0 and report["bad_requests"] > 0, counts
    assert len(after) >= 3 and len(last) >= 3, (len(after), len(last))
    assert growth < MAX_GROWTH, f"server RSS grew {100 * growth:.1f}% after warm-up (see {out})"
    assert report["fds_end"] <= report["fds_after_warmup"] + 16, "file descriptors leak"
    assert report["threads_end"] <= report["threads_after_warmup"] + 16, "threads leak"


# ============================================================================================ training
def _last_step(metrics: Path) -> int:
    """The step of the last complete line of metrics.jsonl (-1 before the first)."""
    try:
        with open(metrics, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().split(b"\n")
    except OSError:
        return -1
    for line in reversed(lines[:-1] if lines[-1] else lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return -1


def test_training_memory_is_flat(tmp_path: Path) -> None:
    from tqdm import tqdm

    from tests.test_train import make_corpus
    from vall_e.config import load_config
    from vall_e.training.engines.metrics_log import iter_metrics

    steps = _env_int("VALLE_SOAK_STEPS", 2000)
    assert steps >= 20, f"VALLE_SOAK_STEPS={steps}: too few"
    every = max(1, min(500, steps // 4))  # evaluate, save and export this often
    report_dir = _report_dir(tmp_path)
    y = make_corpus(tmp_path)
    name = load_config(y).model.full_name
    metrics = tmp_path / "logs" / name / "metrics.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "train.log"
    cmd = [sys.executable, "-m", "vall_e.train", f"yaml={y}", f"trainer.iterations={steps}",
           f"evaluation.frequency={every}", f"trainer.save_frequency={every}", "trainer.export_on_save=true",
           "trainer.keep_last_checkpoints=2", "trainer.log_frequency=1"]
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=str(tmp_path), env=env)
    sampler = Sampler(proc.pid, 0.2, lambda: {"t": round(time.monotonic() - t0, 2), "step": _last_step(metrics)})
    try:
        sampler.start()
        with tqdm(total=steps, unit="step", desc="training soak", leave=False) as bar:
            while proc.poll() is None:
                time.sleep(2)
                bar.n = max(0, _last_step(metrics))
                bar.refresh()
                if time.monotonic() - t0 > 3 * 3600:
                    pytest.fail("training soak took over 3 hours")
        sampler.join(10)
    finally:
        sampler.stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.monotonic() - t0
    assert proc.returncode == 0, log.read_text()[-3000:]
    samples = [s for s in sampler.samples if s["step"] >= 0]
    base_step = max(1, steps // 10)  # 200 of 2000: past warm-up (allocator pools, first evaluation, first save)
    window = max(1, steps // 20)
    base = [s for s in samples if base_step <= s["step"] < base_step + window]
    last = [s for s in samples if s["step"] >= steps - window]

    def rss_at(step: int) -> float | None:
        near = [s for s in samples if s["step"] >= step]
        return round(near[0]["rss"] / 2**20, 2) if near else None

    rss_base, rss_end = median_of(base), median_of(last)
    growth = (rss_end - rss_base) / rss_base
    peak = max(samples, key=lambda s: s["rss"]) if samples else {"rss": float("nan"), "step": None}
    recs = list(iter_metrics(metrics))
    vals = [r for r in recs if "val.loss" in r]
    report = {
        "test": "training", "steps": steps, "eval_save_export_every": every, "wall_s": round(wall, 1),
        "baseline_step": base_step, "window_steps": window,
        "rss_baseline_mb": round(rss_base / 2**20, 2), "rss_end_mb": round(rss_end / 2**20, 2),
        "rss_growth_pct": round(100 * growth, 2),
        "rss_max_mb": round(peak["rss"] / 2**20, 2), "rss_max_at_step": peak["step"],
        "rss_at_step_mb": {str(k): rss_at(k) for k in sorted({base_step, steps // 2, steps, 200, 1000, 2000})
                           if k <= steps},
        "first_loss": next((r["loss"] for r in recs if "loss" in r), None),
        "last_loss": next((r["loss"] for r in reversed(recs) if "loss" in r), None),
        "val_loss": [(r["step"], round(r["val.loss"], 4)) for r in vals],
        "threads_baseline": median_of(base, "threads"), "threads_end": median_of(last, "threads"),
        "fds_baseline": median_of(base, "fds"), "fds_end": median_of(last, "fds"),
        "command": " ".join(cmd[1:]),
        "samples": [{"t": s["t"], "step": s["step"], "rss_mb": round(s["rss"] / 2**20, 2),
                     "threads": s.get("threads"), "fds": s.get("fds")} for s in sampler.samples],
    }
    out = report_dir / "training_soak.json"
    atomic_write_text(out, json.dumps(report, indent=1))
    print(f"\ntraining soak: {steps} steps in {wall:.0f} s; RSS at step {base_step} {report['rss_baseline_mb']} MB, "
          f"end {report['rss_end_mb']} MB ({report['rss_growth_pct']:+.2f}%), max {report['rss_max_mb']} MB; "
          f"report {out}")
    assert [v[0] for v in report["val_loss"]] == list(range(0, steps + 1, every)), report["val_loss"]
    assert len(base) >= 2 and len(last) >= 2, (len(base), len(last))
    assert growth < MAX_GROWTH, f"training RSS grew {100 * growth:.1f}% from step {base_step} (see {out})"
    assert report["fds_end"] <= report["fds_baseline"] + 16, "file descriptors leak"

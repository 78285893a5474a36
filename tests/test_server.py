"""The HTTP API server, tested as a real process on 127.0.0.1 over HTTP (httpx).

One server (tiny random model, API key set, max-queue 8) serves the whole module; it is killed by the
fixture's finalizer even when a test fails. Timings are printed (run with -s to see them).
"""
from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tests.conftest import FakeTTS

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXTS = ["Hello there, how are you?", "The quick brown fox jumps over the lazy dog.", "Good morning.",
         "Another sentence. And one more!"]
STEPS = 40  # AR frames per request: keeps every request short


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def voice_bytes() -> bytes:
    from vall_e.codecs.tiny_encodec import speechlike_audio
    from vall_e.utils.audio import audio_to_bytes

    return audio_to_bytes(speechlike_audio(2.0, seed=3), 24_000, "wav")


@pytest.fixture(scope="module")
def server(model_file, tmp_path_factory, voice_bytes):
    voices = tmp_path_factory.mktemp("voices")
    (voices / "alice.wav").write_bytes(voice_bytes)
    port = _free_port()
    log = tmp_path_factory.mktemp("log") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("VALLE_API_KEY", None)
    cmd = [sys.executable, "-m", "vall_e.server", "--model", str(model_file), "--voices", str(voices),
           "--port", str(port), "--api-key", KEY, "--max-queue", "8", "--max-batch", "8", "--batch-wait-ms", "50",
           "--max-text-chars", "2000", "--max-upload-mb", "1", "--device", "cpu", "--log-level", "warning"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not answer /health in time:\n{log.read_text()}")
            time.sleep(0.2)
        with httpx.Client(base_url=base, headers=AUTH, timeout=120,
                          limits=httpx.Limits(max_connections=32, max_keepalive_connections=32)) as client:
            yield {"base": base, "voices": voices, "log": log, "proc": proc, "client": client}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _speech(client: httpx.Client, timeout: float = 120, **body) -> httpx.Response:
    """POST /v1/audio/speech through the module's shared client (it sends the API key)."""
    payload = {"voice": "alice", "max_ar_steps": STEPS, **body}
    return client.post("/v1/audio/speech", json=payload, timeout=timeout)


def _assert_json_error(r: httpx.Response, status: int | tuple[int, ...], words: str = "") -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert words.lower() in err["message"].lower(), err
    return err


def _assert_healthy(base: str) -> dict:
    r = httpx.get(f"{base}/health", timeout=10)
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["model_loaded"] is True
    return h


# ---------------------------------------------------------------------------------------- basics
def test_health_models_voices(server):
    base = server["base"]
    h = _assert_healthy(base)
    assert h["queue_depth"] == 0 and h["sample_rate"] == 24_000
    r = httpx.get(f"{base}/v1/models", headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and body["data"][0]["object"] == "model"
    assert body["data"][0]["id"] == h["model"]
    r = server["client"].get("/v1/voices")
    assert [v["id"] for v in r.json()["data"]] == ["alice"]


@pytest.mark.parametrize("fmt,ctype", [("wav", "audio/wav"), ("flac", "audio/flac"), ("mp3", "audio/mpeg")])
def test_speech_formats_decode(server, fmt, ctype):
    r = _speech(server["client"], input=TEXTS[0], response_format=fmt)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == ctype
    data, sr = sf.read(io.BytesIO(r.content), dtype="float32")
    assert sr == 24_000
    spf = 24_000 / 75
    assert 0 < data.shape[0] <= (STEPS + 2) * spf  # the request's max_ar_steps bounds the audio
    assert np.isfinite(data).all() and np.abs(data).max() > 0


def test_speech_pcm_and_model_alias(server):
    r = _speech(server["client"], input=TEXTS[2], response_format="pcm", model="tts-1", speed=1.5)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/pcm" and r.headers["x-sample-rate"] == "24000"
    assert "speed" in r.headers["x-note"]
    pcm = np.frombuffer(r.content, dtype="<i2")
    assert pcm.size > 0 and len(r.content) % 2 == 0 and np.abs(pcm).max() > 0


def test_seeded_requests_are_reproducible(server):
    a = _speech(server["client"], input=TEXTS[2], response_format="wav", seed=7)
    b = _speech(server["client"], input=TEXTS[2], response_format="wav", seed=7)
    c = _speech(server["client"], input=TEXTS[2], response_format="wav", seed=8)
    assert a.status_code == b.status_code == c.status_code == 200
    assert a.content == b.content
    assert a.content != c.content


# ---------------------------------------------------------------------------------------- streaming
def _stream(base: str, text: str, fmt: str = "wav", steps: int = 200) -> tuple[list[tuple[float, bytes]], float]:
    """POST a streaming request; return [(arrival time, bytes)] and the time the response ended."""
    pieces: list[tuple[float, bytes]] = []
    t0 = time.perf_counter()
    body = {"input": text, "voice": "alice", "response_format": fmt, "stream": True, "max_ar_steps": steps}
    with httpx.stream("POST", f"{base}/v1/audio/speech", json=body, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"] == f"audio/{fmt}"
        for piece in r.iter_raw():
            pieces.append((time.perf_counter() - t0, piece))
    return pieces, time.perf_counter() - t0


def test_streaming_first_chunk_before_the_end(server):
    pieces, total = _stream(server["base"], TEXTS[1], "wav", steps=200)
    first = pieces[0][0]
    print(f"\nstreaming: first chunk after {first:.3f} s, whole response {total:.3f} s, {len(pieces)} pieces")
    assert len(pieces) >= 3, "several chunks should arrive separately"
    assert first < 0.6 * total, (first, total)
    data = b"".join(p for _, p in pieces)
    assert data[:4] == b"RIFF" and data[36:40] == b"data"
    wav, sr = sf.read(io.BytesIO(data), dtype="float32")  # the unknown-length header is readable
    assert sr == 24_000 and wav.shape[0] == (len(data) - 44) // 2 and wav.shape[0] > 24_000 // 2


def test_streaming_pcm(server):
    pieces, _ = _stream(server["base"], TEXTS[2], "pcm", steps=60)
    data = b"".join(p for _, p in pieces)
    assert len(data) > 0 and len(data) % 2 == 0
    assert data[:4] != b"RIFF"


def test_stream_stops_when_the_client_disconnects(server):
    base = server["base"]
    before = _assert_healthy(base)["stats"]["streams_cancelled"]
    body = {"input": " ".join(["The quick brown fox jumps over the lazy dog."] * 40), "voice": "alice",
            "response_format": "pcm", "stream": True, "max_ar_steps": 30}
    with httpx.stream("POST", f"{base}/v1/audio/speech", json=body, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200
        next(r.iter_raw())  # one chunk, then hang up
    deadline = time.monotonic() + 60
    while _assert_healthy(base)["stats"]["streams_cancelled"] == before:
        assert time.monotonic() < deadline, "the worker kept generating for a client that left"
        time.sleep(0.05)
    while _assert_healthy(base)["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------- batching
def test_concurrent_requests_are_batched_and_faster(server):
    base, client = server["base"], server["client"]
    texts = [TEXTS[i % len(TEXTS)] for i in range(8)]
    _speech(client, input=texts[0], response_format="wav")  # warm-up
    before = _assert_healthy(base)["stats"]

    t0 = time.perf_counter()
    for t in texts:
        assert _speech(client, input=t, response_format="wav").status_code == 200
    sequential = time.perf_counter() - t0

    barrier = threading.Barrier(8)

    def one(text: str) -> httpx.Response:
        barrier.wait()
        return _speech(client, input=text, response_format="wav")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, texts))
    concurrent = time.perf_counter() - t0
    for r in responses:
        assert r.status_code == 200, r.text
        wav, _ = sf.read(io.BytesIO(r.content))
        assert wav.shape[0] > 0
    after = _assert_healthy(base)["stats"]
    batches = after["batches"] - before["batches"] - 8  # the sequential requests ran one batch each
    print(f"\nbatching: 8 sequential {sequential:.2f} s, 8 concurrent {concurrent:.2f} s "
          f"(speed-up x{sequential / concurrent:.2f}) in {batches} batch(es), largest {after['largest_batch']}")
    assert after["largest_batch"] > 1 and batches < 8
    assert concurrent < sequential / 1.3, (sequential, concurrent)


# ---------------------------------------------------------------------------------------- voices
def test_voice_upload_list_and_use(server, voice_bytes):
    base, client = server["base"], server["client"]
    r = client.post("/v1/voices", data={"name": "bob_2"},
                   files={"file": ("whatever.bin", voice_bytes, "application/octet-stream")})
    assert r.status_code == 201, r.text
    assert r.json()["id"] == "bob_2" and r.json()["replaced"] is False
    assert (server["voices"] / "bob_2.wav").read_bytes() == voice_bytes
    assert "bob_2" in [v["id"] for v in client.get("/v1/voices").json()["data"]]
    assert _speech(client, input=TEXTS[2], voice="bob_2", response_format="wav").status_code == 200
    # Re-upload as flac: the old file is replaced (one file per name) and the new one is used.
    from vall_e.codecs.tiny_encodec import speechlike_audio
    from vall_e.utils.audio import audio_to_bytes

    flac = audio_to_bytes(speechlike_audio(1.5, seed=9), 24_000, "flac")
    r = client.post("/v1/voices", data={"name": "bob_2"}, files={"file": ("v.flac", flac)})
    assert r.status_code == 201 and r.json()["replaced"] is True and r.json()["file"] == "bob_2.flac"
    assert not (server["voices"] / "bob_2.wav").exists()
    assert _speech(client, input=TEXTS[2], voice="bob_2", response_format="wav").status_code == 200
    # An mp3 voice, used, then deleted.
    mp3 = audio_to_bytes(speechlike_audio(2.0, seed=11), 24_000, "mp3")
    r = client.post("/v1/voices", data={"name": "carol"}, files={"file": ("c.mp3", mp3, "audio/mpeg")})
    assert r.status_code == 201 and r.json()["file"] == "carol.mp3", r.text
    assert _speech(client, input=TEXTS[2], voice="carol", response_format="wav").status_code == 200
    assert client.delete("/v1/voices/carol").status_code == 200
    _assert_json_error(client.delete("/v1/voices/carol"), 404, "unknown voice")
    _assert_json_error(_speech(client, input=TEXTS[2], voice="carol"), 404, "unknown voice")
    assert not [p for p in server["voices"].iterdir() if p.name.startswith(".")]  # no temp files left


# ---------------------------------------------------------------------------------------- bad input
def test_bad_requests_get_json_errors_and_server_keeps_serving(server, voice_bytes):
    base, client = server["base"], server["client"]
    _assert_json_error(_speech(client, input=""), 400, "empty")
    _assert_json_error(_speech(client, input="   \n "), 400, "empty")
    _assert_json_error(_speech(client, input="a" * 1_000_000), 400, "limit")  # the schema's maxLength
    _assert_json_error(_speech(client, input="hi", voice="nobody"), 404, "unknown voice")
    _assert_json_error(_speech(client, input="hi", voice="../alice"), 400, "not allowed")  # the schema's pattern
    _assert_json_error(_speech(client, input="hi", response_format="opus"), 400, "unsupported")
    _assert_json_error(_speech(client, input="hi", response_format="aac"), 400, "unsupported")
    _assert_json_error(_speech(client, input="hi", response_format="xyz"), 400, "response_format")
    _assert_json_error(_speech(client, input="hi", temperature=-1), 400, "temperature")
    _assert_json_error(_speech(client, input="hi", top_k="many"), 400, "top_k")
    _assert_json_error(_speech(client, input="hi", bogus=1), 400, "unknown field")
    _assert_json_error(_speech(client, input="hi", model="gpt-9"), 400, "unknown model")
    _assert_json_error(_speech(client, input="hi", stream=True, response_format="mp3"), 400, "stream")
    _assert_json_error(client.post("/v1/audio/speech", content=b"{not json"), 400, "json")
    _assert_json_error(client.post("/v1/audio/speech", content=b"a" * 2_000_000), 413, "limit")  # the body limit
    _assert_json_error(client.post("/v1/audio/speech", json={"voice": "alice"}), 400, "input")
    # Uploads: corrupt audio, a truncated wav, path tricks in the name, too large.
    up = lambda name, data: client.post("/v1/voices", data={"name": name},  # noqa: E731
                                        files={"file": ("v.wav", data)}, timeout=30)
    _assert_json_error(up("corrupt", b"RIFF\x00\x00garbage" * 100), 400, "decode")
    _assert_json_error(up("truncated", voice_bytes[:2000]), 400, "truncated")
    _assert_json_error(up("../evil", voice_bytes), 400, "not allowed")
    _assert_json_error(up("a/b", voice_bytes), 400, "not allowed")
    _assert_json_error(up("big", b"\0" * (1024 * 1024 + 100_000)), 413, "limit")
    names = {p.name for p in server["voices"].iterdir()}
    assert not any(n.startswith(("corrupt", "truncated", "evil", "big", ".")) for n in names), names
    assert not (server["voices"].parent / "evil.wav").exists()
    _assert_json_error(client.get("/no/such/route"), 404)
    _assert_healthy(base)
    assert _speech(client, input=TEXTS[2], response_format="wav").status_code == 200
    assert server["proc"].poll() is None


def test_api_key(server):
    base = server["base"]
    body = {"input": "hi", "voice": "alice", "max_ar_steps": 5}
    _assert_json_error(httpx.post(f"{base}/v1/audio/speech", json=body), 401, "missing api key")
    r = httpx.post(f"{base}/v1/audio/speech", json=body, headers={"Authorization": "Bearer wrong"})
    _assert_json_error(r, 401, "invalid api key")
    _assert_json_error(httpx.get(f"{base}/v1/voices", headers={"Authorization": "Basic x"}), 401)
    _assert_json_error(httpx.get(f"{base}/v1/models"), 401)
    assert httpx.get(f"{base}/health").status_code == 200  # probes need no key


def test_queue_full_gets_429(server):
    """A long stream holds the worker; 8 requests fill the queue (max-queue 8); the 9th gets 429."""
    base, client = server["base"], server["client"]
    long_text = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)
    started = threading.Event()
    result: dict = {}

    def stream() -> None:
        body = {"input": long_text, "voice": "alice", "response_format": "pcm", "stream": True, "max_ar_steps": 30}
        with httpx.stream("POST", f"{base}/v1/audio/speech", json=body, headers=AUTH, timeout=300) as r:
            result["status"] = r.status_code
            for _ in r.iter_raw():
                started.set()

    holder = threading.Thread(target=stream)
    holder.start()
    assert started.wait(60), "the stream did not start"
    with ThreadPoolExecutor(8) as pool:
        waiting = [pool.submit(_speech, client, 300, input="Good morning.", response_format="wav", max_ar_steps=5)
                   for _ in range(8)]
        deadline = time.monotonic() + 30
        while _assert_healthy(base)["queue_depth"] < 8:
            assert time.monotonic() < deadline, "the queue did not fill"
            time.sleep(0.02)
        assert holder.is_alive(), "the stream ended before the queue filled; make it longer"
        err = _assert_json_error(_speech(client, input="Good morning."), 429, "queue is full")
        assert err["type"] == "queue_full"
        statuses = [f.result().status_code for f in waiting]
    holder.join(300)
    assert result["status"] == 200
    assert statuses == [200] * 8  # the queued requests are served once the worker is free
    _assert_healthy(base)


# ---------------------------------------------------------------------------------------- in-process units
def _asgi(app, coro_fn):
    """Run `coro_fn(client)` against the app in-process, then stop its worker thread."""
    import asyncio

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            return await coro_fn(client)

    try:
        return asyncio.run(go())
    finally:
        app.state.batcher.close()


def _app(tmp_path, voice_bytes, **limits):
    from vall_e.serving.server import ServerLimits, create_app

    (tmp_path / "alice.wav").write_bytes(voice_bytes)
    fake = FakeTTS(limits.pop("delay", 0.0))
    return create_app(fake, ServerLimits(**limits), tmp_path, model_id="fake"), fake


def test_request_timeout_gives_504(tmp_path, voice_bytes):
    app, _ = _app(tmp_path, voice_bytes, delay=1.0, request_timeout=0.2)

    async def go(client):
        r = await client.post("/v1/audio/speech", json={"input": "hi", "voice": "alice", "response_format": "wav"})
        h = await client.get("/health")
        return r, h

    r, h = _asgi(app, go)
    _assert_json_error(r, 504, "timeout")
    assert h.status_code == 200


def test_batches_group_by_settings_and_isolate_failures(tmp_path, voice_bytes):
    import asyncio

    app, fake = _app(tmp_path, voice_bytes, batch_wait_ms=200, max_batch=8)

    async def go(client):
        def post(text, **kw):
            return client.post("/v1/audio/speech", json={"input": text, "voice": "alice", "response_format": "pcm",
                                                         **kw})
        return await asyncio.gather(post("a"), post("FAIL"), post("b"), post("c", temperature=0.5))

    a, bad, b, c = _asgi(app, go)
    assert a.status_code == b.status_code == c.status_code == 200
    _assert_json_error(bad, 400, "cannot be spoken")
    # a, FAIL, b share settings: one batch, which fails and is retried one by one; c has its own batch.
    assert sorted(fake.batches[0]) == ["FAIL", "a", "b"] or sorted(fake.batches[1]) == ["FAIL", "a", "b"]
    assert ["c"] in fake.batches and ["a"] in fake.batches and ["b"] in fake.batches
    assert max(len(x) for x in fake.batches) == 3


def test_voice_prompt_cached_and_invalidated_on_upload(tmp_path, voice_bytes):
    app, fake = _app(tmp_path, voice_bytes)

    async def go(client):
        body = {"input": "hi", "voice": "alice", "response_format": "pcm"}
        for _ in range(3):
            assert (await client.post("/v1/audio/speech", json=body)).status_code == 200
        n_before = len(fake.encoded)
        r = await client.post("/v1/voices", data={"name": "alice"}, files={"file": ("a.wav", voice_bytes)})
        assert r.status_code == 201 and r.json()["replaced"] is True
        assert (await client.post("/v1/audio/speech", json=body)).status_code == 200
        return n_before

    n_before = _asgi(app, go)
    assert n_before == 1  # encoded once for three requests
    assert len(fake.encoded) == 2  # and again after the re-upload


def test_helpers_and_missing_dependency(monkeypatch):
    import importlib.util
    import struct

    from vall_e.serving.server import _check_deps, is_loopback
    from vall_e.utils.audio import streaming_wav_header
    from vall_e.utils.errors import UserError

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")
    h = streaming_wav_header(24_000)
    assert len(h) == 44 and struct.unpack("<I", h[40:44])[0] == 0xFFFFFFFF
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    with pytest.raises(UserError, match=r"pip install 'vall-e\[server\]'"):
        _check_deps()


def test_non_loopback_warning_and_bad_flags(model_file, tmp_path):
    from vall_e.serving.server import main
    from vall_e.utils.errors import UserError

    with pytest.raises(UserError, match="--max-batch 0: must be > 0"):
        main(["--model", str(model_file), "--max-batch", "0"])
    with pytest.raises(UserError, match="--max-text-chars -1: must be > 0"):
        main(["--model", str(model_file), "--max-text-chars", "-1"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("VALLE_API_KEY", None)
    r = subprocess.run([sys.executable, "-m", "vall_e.server", "--model", str(tmp_path / "none.safetensors"),
                        "--host", "0.0.0.0", "--port", str(_free_port())],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert "warning: binding to 0.0.0.0 without --api-key" in r.stderr
    assert r.returncode == 2 and "model file not found" in r.stderr

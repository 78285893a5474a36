"""`python -m vall_e.server`: an OpenAI-compatible HTTP API for the synthesizer (FastAPI + uvicorn).

    python -m vall_e.server --model model.safetensors --voices ./voices
    curl -s localhost:8000/v1/audio/speech -H 'Content-Type: application/json' \
         -d '{"input": "Hello there.", "voice": "alice", "response_format": "wav"}' -o hello.wav

Endpoints: `POST /v1/audio/speech` (OpenAI's request plus sampler extras; `stream: true` sends audio
while the AR runs), `GET|POST /v1/voices` (named voices = reference clips in `--voices`),
`DELETE /v1/voices/{name}`, `GET /v1/models`, `GET /health`.

Only one worker thread touches the model (`vall_e.serving.batching.Batcher`): requests with the same
sampler settings that arrive within `--batch-wait-ms` run as one batched AR/NAR pass. Every error is
JSON `{"error": {"message", "type"}}` with a 4xx/5xx status, and no bad request stops the server.

Streaming: `pcm` sends raw s16le mono chunks; `wav` sends a 44-byte WAV header whose RIFF and data
sizes are 0xFFFFFFFF ("unknown length", as ffmpeg and most players accept), then s16le chunks.
"""
# No `from __future__ import annotations`: FastAPI reads the route annotations (`Request`) at runtime.

import argparse
import asyncio
import hmac
import importlib.util
import io
import ipaddress
import json
import logging
import os
import re
import socket
import struct
import sys
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import soundfile as sf

from vall_e.config import parse_config
from vall_e.generation.sampling import SamplingParams
from vall_e.generation.settings import GenerationSettings
from vall_e.generation.tts import TTS
from vall_e.serving.batching import Batcher, QueueFull, WorkerStopped
from vall_e.serving.options import add_engine_options
from vall_e.utils.audio import audio_duration, audio_to_bytes, load_audio
from vall_e.utils.errors import UserError
from vall_e.utils.io import atomic_path

logger = logging.getLogger("vall_e.server")

CONTENT_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg", "pcm": "audio/pcm"}
UNSUPPORTED_FORMATS = ("opus", "aac")
STREAM_FORMATS = ("wav", "pcm")
VOICE_SUFFIXES = {"WAV": "wav", "WAVEX": "wav", "FLAC": "flac", "MP3": "mp3", "OGG": "ogg"}
VOICE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_VOICE_SECONDS = 120.0
# Model names OpenAI clients send by default; accepted as aliases of the loaded model.
OPENAI_MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "vall-e")
OPEN_PATHS = ("/health",)  # answered without the API key (for load balancers and probes)
_BODY_OVERHEAD = 64 * 1024  # multipart boundaries and form fields on top of the upload itself


@dataclass
class ServerLimits:
    """Everything that bounds the work one client can cause."""

    max_text_chars: int = 4096
    max_upload_mb: float = 20.0
    request_timeout: float = 300.0
    max_queue: int = 64
    max_batch: int = 8
    batch_wait_ms: float = 50.0
    api_key: str | None = None

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class ApiError(Exception):
    """An error answered as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type, param, headers


class BodyTooLarge(Exception):
    pass


def error_body(message: str, type: str, param: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"message": message, "type": type}
    if param is not None:
        err["param"] = param
    return {"error": err}


def streaming_wav_header(sample_rate: int, channels: int = 1, bits: int = 16) -> bytes:
    """A WAV header for a stream of unknown length: RIFF and data sizes are 0xFFFFFFFF."""
    block = channels * bits // 8
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, bits)
            + b"data" + struct.pack("<I", 0xFFFFFFFF))


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------- voices
class VoiceStore:
    """Named voices: `{name}.wav|flac|mp3|ogg` files in one folder, with an encoded-prompt cache."""

    def __init__(self, folder: Path | None, max_cached: int = 256) -> None:
        self.folder = folder
        self._cache: OrderedDict[tuple[str, float], tuple[tuple[int, int, str], Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_cached = max_cached

    @staticmethod
    def check_name(name: Any) -> str:
        if not isinstance(name, str) or not VOICE_NAME.fullmatch(name):
            raise ApiError(400, f"voice name {str(name)[:80]!r} is not allowed: use 1-64 letters, digits, "
                                "'-' or '_'", param="name")
        return name

    def path(self, name: str) -> Path | None:
        """The file of voice `name`, or None."""
        if self.folder is None or not VOICE_NAME.fullmatch(name):
            return None
        for suffix in dict.fromkeys(VOICE_SUFFIXES.values()):
            p = self.folder / f"{name}.{suffix}"
            if p.is_file():
                return p
        return None

    def names(self) -> list[str]:
        if self.folder is None or not self.folder.is_dir():
            return []
        found = {p.stem for p in self.folder.iterdir()
                 if p.is_file() and p.suffix[1:].lower() in VOICE_SUFFIXES.values() and VOICE_NAME.fullmatch(p.stem)}
        return sorted(found)

    def describe(self, name: str) -> dict[str, Any]:
        p = self.path(name)
        info: dict[str, Any] = {"id": name, "object": "voice", "file": p.name if p else None}
        if p is not None:
            try:
                info["duration"] = round(audio_duration(p), 3)
            except UserError:
                info["duration"] = None
            info["created"] = int(p.stat().st_mtime)
        return info

    def save(self, name: str, data: bytes, sample_rate: int) -> tuple[Path, bool]:
        """Validate `data` by decoding it, then write it atomically as the voice `name`."""
        if self.folder is None:
            raise ApiError(400, "this server has no voice folder; start it with --voices DIR")
        if not data:
            raise ApiError(400, "the uploaded file is empty", param="file")
        try:
            fmt = sf.info(io.BytesIO(data)).format
        except Exception:
            raise ApiError(400, "the uploaded file is not audio that can be decoded (corrupt or unsupported "
                                "format; use wav, flac or mp3)", param="file") from None
        if fmt not in VOICE_SUFFIXES:
            raise ApiError(400, f"the uploaded file is {fmt}; use wav, flac or mp3", param="file")
        target = self.folder / f"{name}.{VOICE_SUFFIXES[fmt]}"
        replaced = self.path(name) is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_path(target) as tmp:
                tmp.write_bytes(data)
                load_audio(tmp, sample_rate, max_seconds=MAX_VOICE_SECONDS)  # decodes every sample
        except UserError as e:
            msg = re.sub(r"^\S*\.tmp\.\w+:\s*", "", str(e))
            raise ApiError(400, f"the uploaded file: {msg}", param="file") from None
        for suffix in set(VOICE_SUFFIXES.values()) - {target.suffix[1:]}:  # one file per name
            try:
                (self.folder / f"{name}.{suffix}").unlink()
            except FileNotFoundError:
                pass
        self.invalidate(name)
        return target, replaced

    def delete(self, name: str) -> bool:
        p = self.path(name)
        if p is None:
            return False
        p.unlink(missing_ok=True)
        self.invalidate(name)
        return True

    def invalidate(self, name: str) -> None:
        with self._lock:
            for key in [k for k in self._cache if k[0] == name]:
                del self._cache[key]

    def prompt(self, tts: Any, name: str, prompt_seconds: float) -> Any:
        """The voice's prompt codes, encoded once per (file version, prompt length). Worker thread only."""
        p = self.path(name)
        if p is None:
            raise UserError(f"unknown voice {name!r}")
        st = p.stat()
        sig = (st.st_mtime_ns, st.st_size, p.name)
        key = (name, float(prompt_seconds))
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] == sig:
                self._cache.move_to_end(key)
                return hit[1]
        codes = tts.encode_reference(str(p), prompt_seconds)
        with self._lock:
            self._cache[key] = (sig, codes)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return codes


# ---------------------------------------------------------------------------------------- requests
def _request_model():
    """The pydantic model of a speech request (built lazily: pydantic comes with the server extra)."""
    from pydantic import BaseModel, ConfigDict, Field

    class SpeechRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        input: str
        voice: str
        model: str | None = None
        response_format: str = "mp3"  # OpenAI's default
        speed: float = Field(1.0, ge=0.25, le=4.0)
        stream: bool = False
        stream_format: str | None = None
        instructions: str | None = None
        temperature: float | None = None
        nar_temperature: float | None = None
        top_p: float | None = None
        top_k: int | None = None
        min_p: float | None = None
        repetition_penalty: float | None = None
        length_penalty: float | None = None
        seed: int | None = None
        max_ar_steps: int | None = Field(None, ge=0)
        input_prompt_length: float | None = Field(None, ge=0, le=MAX_VOICE_SECONDS)
        language: str | None = None

    return SpeechRequest


def build_settings(req: Any) -> Any:
    """Request fields -> GenerationSettings (unset fields keep the engine's defaults)."""
    ar_changes = {k: v for k, v in (("temperature", req.temperature), ("top_p", req.top_p), ("top_k", req.top_k),
                                    ("min_p", req.min_p), ("repetition_penalty", req.repetition_penalty),
                                    ("length_penalty", req.length_penalty), ("seed", req.seed)) if v is not None}
    nar_changes = {k: v for k, v in (("temperature", req.nar_temperature), ("seed", req.seed)) if v is not None}
    try:
        ar = SamplingParams.ar_defaults(**ar_changes)  # raises UserError for bad values
    except UserError as e:
        raise UserError(f"AR sampler: {str(e).removeprefix('sampling.')}") from None
    try:
        nar = SamplingParams.nar_defaults(**nar_changes)
    except UserError as e:
        raise UserError(f"NAR sampler (nar_temperature): {str(e).removeprefix('sampling.')}") from None
    settings = GenerationSettings(ar=ar, nar=nar)
    changes: dict[str, Any] = {}
    if req.max_ar_steps is not None:
        changes["max_ar_steps"] = req.max_ar_steps
    if req.input_prompt_length is not None:
        changes["input_prompt_length"] = req.input_prompt_length
    if req.language:
        changes["language"] = req.language
    return replace(settings, **changes)


def _validation_message(e: Any) -> tuple[str, str | None]:
    first = e.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    elif first.get("type") == "missing":
        msg = "this field is required"
    return (f"{loc}: {msg}" if loc else msg), (loc or None)


# ---------------------------------------------------------------------------------------- the app
def model_id_for(path: str | Path) -> str:
    path = Path(path)
    return path.parent.name if path.stem == "model" and path.parent.name else path.stem


def create_app(tts: Any, limits: ServerLimits | None = None, voices_dir: str | Path | None = None,
               model_id: str = "vall-e") -> Any:
    """Build the FastAPI app around a loaded `TTS`. The batcher's worker thread starts here."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or ServerLimits()
    voices = VoiceStore(Path(voices_dir) if voices_dir else None)
    SpeechRequest = _request_model()
    sample_rate = int(tts.sample_rate)

    def run_batch(payloads: list[tuple[str, str, Any]]) -> list[Any]:
        settings = payloads[0][2]  # a batch shares its settings (the batcher groups by them)
        texts = [p[0] for p in payloads]
        prompts = [voices.prompt(tts, p[1], settings.input_prompt_length) for p in payloads]
        if len(payloads) == 1:
            return tts.synthesize(texts[0], prompts[0], settings)
        return tts.synthesize(texts, prompts, settings)

    batcher = Batcher(run_batch, max_batch=limits.max_batch, batch_wait_s=limits.batch_wait_ms / 1000.0,
                      max_queue=limits.max_queue)

    @asynccontextmanager
    async def lifespan(_app: Any):
        yield
        batcher.close()

    app = FastAPI(title="VALL-E TTS server", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.voices = voices

    def json_error(status: int, message: str, type: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> Any:
        return JSONResponse(error_body(message, type, param), status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, e: ApiError):
        return json_error(e.status, e.message, e.type, e.param, e.headers)

    @app.exception_handler(UserError)
    async def _user_error(_request: Request, e: UserError):
        return json_error(400, str(e), "invalid_request_error")

    @app.exception_handler(QueueFull)
    async def _queue_full(_request: Request, e: QueueFull):
        return json_error(429, str(e), "queue_full", headers={"Retry-After": "1"})

    @app.exception_handler(WorkerStopped)
    async def _stopped(_request: Request, e: WorkerStopped):
        return json_error(503, str(e), "unavailable")

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_request: Request, e: BodyTooLarge):
        return json_error(413, str(e), "request_too_large")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, e: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        return json_error(e.status_code, str(e.detail), kind, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, e: RequestValidationError):
        msg, param = _validation_message(e)
        return json_error(400, msg, "invalid_request_error", param)

    @app.exception_handler(Exception)
    async def _internal(_request: Request, e: Exception):
        logger.exception("internal error")
        return json_error(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        return {"status": "ok", "model_loaded": True, "model": model_id, "device": str(tts.device),
                "sample_rate": sample_rate, "queue_depth": batcher.depth, "running": batcher.running,
                "max_queue": limits.max_queue, "max_batch": limits.max_batch, "stats": dict(batcher.stats)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": int(app.state.started),
                                            "owned_by": "vall-e"}]}

    @app.get("/v1/models/{name}")
    async def model_info(name: str):
        if name != model_id:
            raise ApiError(404, f"model {name!r} not found; this server serves {model_id!r}", "not_found_error")
        return {"id": model_id, "object": "model", "created": int(app.state.started), "owned_by": "vall-e"}

    @app.get("/v1/voices")
    async def list_voices():
        return {"object": "list", "data": [voices.describe(n) for n in voices.names()]}

    @app.post("/v1/voices", status_code=201)
    async def upload_voice(request: Request):
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(400, "send the voice as multipart/form-data with fields `name` and `file`")
        async with request.form(max_files=1, max_fields=8) as form:
            name = voices.check_name(form.get("name"))
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "the `file` field (an audio file) is required", param="file")
            data = await upload.read(limits.max_upload_bytes + 1)
        if len(data) > limits.max_upload_bytes:
            raise ApiError(413, f"the upload is larger than the limit of {limits.max_upload_mb:g} MB",
                           "request_too_large", param="file")
        loop = asyncio.get_running_loop()
        path, replaced = await loop.run_in_executor(None, voices.save, name, data, sample_rate)
        return {**voices.describe(name), "replaced": replaced}

    @app.delete("/v1/voices/{name}")
    async def delete_voice(name: str):
        voices.check_name(name)
        if not voices.delete(name):
            raise ApiError(404, f"unknown voice {name!r}", "not_found_error", param="voice")
        return {"id": name, "object": "voice", "deleted": True}

    @app.post("/v1/audio/speech")
    async def speech(request: Request):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            req = SpeechRequest.model_validate(body)
        except ValidationError as e:
            msg, param = _validation_message(e)
            raise ApiError(400, msg, param=param) from None
        fmt = req.response_format.lower()
        if fmt in UNSUPPORTED_FORMATS:
            raise ApiError(400, f"response_format {fmt!r} is unsupported; use one of {', '.join(CONTENT_TYPES)}",
                           param="response_format")
        if fmt not in CONTENT_TYPES:
            raise ApiError(400, f"unknown response_format {fmt!r}; use one of {', '.join(CONTENT_TYPES)}",
                           param="response_format")
        if req.model and req.model not in (model_id, *OPENAI_MODEL_ALIASES):
            raise ApiError(400, f"unknown model {req.model!r}; this server serves {model_id!r}", param="model")
        if len(req.input) > limits.max_text_chars:
            raise ApiError(413, f"input is {len(req.input)} characters; this server's limit is "
                                f"{limits.max_text_chars} (--max-text-chars)", "request_too_large", param="input")
        if not req.input.strip():
            raise ApiError(400, "input is empty: nothing to synthesize", param="input")
        if voices.path(req.voice) is None:
            known = voices.names()
            hint = f"; available: {', '.join(known[:20])}" if known else "; no voices are installed (POST /v1/voices)"
            raise ApiError(400, f"unknown voice {req.voice[:80]!r}{hint}", param="voice")
        settings = build_settings(req)
        headers = {"X-Sample-Rate": str(sample_rate), "X-Model": model_id}
        notes = []
        if req.speed != 1.0:
            notes.append("speed is not supported and was ignored")
        if req.instructions:
            notes.append("instructions are not supported and were ignored")
        if notes:
            headers["X-Note"] = "; ".join(notes)

        if req.stream:
            if req.stream_format not in (None, "audio"):
                raise ApiError(400, f"stream_format {req.stream_format!r} is unsupported; use 'audio'",
                               param="stream_format")
            if fmt not in STREAM_FORMATS:
                raise ApiError(400, f"streaming supports response_format wav or pcm, not {fmt!r}",
                               param="response_format")
            text, voice = req.input, req.voice

            def run_stream():
                prompt = voices.prompt(tts, voice, settings.input_prompt_length)
                return tts.stream(text, prompt, settings)

            try:
                chunks = await batcher.submit_stream(run_stream, first_timeout=limits.request_timeout)
            except asyncio.TimeoutError:
                raise ApiError(504, f"no audio within the request timeout of {limits.request_timeout:g} s",
                               "timeout") from None

            async def body_iter():
                if fmt == "wav":
                    yield streaming_wav_header(sample_rate)
                async for chunk in chunks:
                    yield audio_to_bytes(chunk, sample_rate, "pcm")

            return StreamingResponse(body_iter(), media_type=CONTENT_TYPES[fmt], headers=headers)

        key = repr(settings) if settings.ar.seed is None else object()  # a seeded request runs alone
        try:
            wav = (await batcher.submit((req.input, req.voice, settings), key, timeout=limits.request_timeout))
        except asyncio.TimeoutError:
            raise ApiError(504, f"the request took longer than the timeout of {limits.request_timeout:g} s",
                           "timeout") from None
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(None, audio_to_bytes, wav, sample_rate, fmt)
        return Response(content=data, media_type=CONTENT_TYPES[fmt], headers=headers)

    app.state.started = time.time()
    return _Guard(app, api_key=limits.api_key, max_body=limits.max_upload_bytes + _BODY_OVERHEAD)


class _Guard:
    """ASGI wrapper: API-key check and request-body size limit, before any route runs."""

    def __init__(self, app: Any, api_key: str | None, max_body: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body = max_body

    @property
    def state(self) -> Any:
        return self.app.state

    async def _reply(self, send: Any, status: int, body: dict[str, Any], extra: list[tuple[bytes, bytes]] = ()
                     ) -> None:
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                *extra]})
        await send({"type": "http.response.body", "body": data})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.api_key and scope.get("path") not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                msg = "invalid API key" if token else "missing API key: send `Authorization: Bearer KEY`"
                return await self._reply(send, 401, error_body(msg, "authentication_error"),
                                         [(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await self._reply(send, 413, error_body(
                f"the request body is larger than the limit of {self.max_body // 1024} KiB", "request_too_large"))
        seen = 0
        limit = self.max_body

        async def limited_receive() -> Any:
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(f"the request body is larger than the limit of {limit // 1024} KiB")
            return message

        await self.app(scope, limited_receive, send)


# ---------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vall_e.server",
                                description="OpenAI-compatible HTTP API server for VALL-E text-to-speech.")
    p.add_argument("--model", default=None, help="exported model.safetensors")
    p.add_argument("--yaml", default=None, help="training run config; its exported model is used")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--voices", default=None, help="folder of named voices ({name}.wav|flac|mp3); created if missing")
    p.add_argument("--api-key", default=os.environ.get("VALLE_API_KEY") or None,
                   help="require `Authorization: Bearer KEY` (default: $VALLE_API_KEY, else no key)")
    p.add_argument("--max-text-chars", type=int, default=4096, help="longest `input` accepted (413 beyond)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest voice upload (413 beyond)")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds a request may wait for its audio (504 beyond); for streams, until the first chunk")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for the model (429 beyond)")
    p.add_argument("--max-batch", type=int, default=8, help="requests synthesized together in one batch")
    p.add_argument("--batch-wait-ms", type=float, default=50.0,
                   help="how long the first request of a batch waits for others to join it")
    add_engine_options(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def _check_deps() -> None:
    missing = [m for m in ("fastapi", "uvicorn", "pydantic") if importlib.util.find_spec(m) is None]
    if importlib.util.find_spec("python_multipart") is None and importlib.util.find_spec("multipart") is None:
        missing.append("python-multipart")
    if missing:
        raise UserError(f"the server needs: pip install 'vall-e[server]' (missing: {', '.join(missing)})")


def main(argv: Sequence[str] | None = None) -> int:
    _check_deps()
    parser = build_parser()
    cfg, args = parse_config(argv, parser)
    for flag, value in (("--max-text-chars", args.max_text_chars), ("--max-upload-mb", args.max_upload_mb),
                        ("--request-timeout", args.request_timeout), ("--max-queue", args.max_queue),
                        ("--max-batch", args.max_batch)):
        if not value > 0:
            raise UserError(f"{flag} {value}: must be > 0")
    if not args.batch_wait_ms >= 0:
        raise UserError(f"--batch-wait-ms {args.batch_wait_ms}: must be >= 0")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: must be in 0..65535")
    model_path = args.model or args.yaml
    if model_path is None:
        default = cfg.ckpt_dir / cfg.model.full_name / "model.safetensors"
        if not default.exists():
            raise UserError("no model given: pass --model model.safetensors or --yaml of a training run")
        model_path = default
    voices_dir = Path(args.voices) if args.voices else None
    if voices_dir is not None:
        if voices_dir.exists() and not voices_dir.is_dir():
            raise UserError(f"--voices {voices_dir}: not a folder")
        voices_dir.mkdir(parents=True, exist_ok=True)
    if not is_loopback(args.host) and not args.api_key:
        print(f"warning: binding to {args.host} without --api-key: anyone who can reach this address can use "
              "the server (and upload voices)", file=sys.stderr)
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as s:  # fail early and clearly
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((args.host.strip("[]"), args.port))
        except OSError as e:
            raise UserError(f"--host {args.host} --port {args.port}: cannot bind ({e.strerror})") from None

    import uvicorn

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s: %(message)s")
    vocoder = args.vocoder or cfg.inference.vocoder
    tts = TTS.from_pretrained(model_path, device=args.device, dtype=args.dtype, compile=args.compile,
                              **({"vocoder": vocoder} if vocoder else {}))
    limits = ServerLimits(max_text_chars=args.max_text_chars, max_upload_mb=args.max_upload_mb,
                          request_timeout=args.request_timeout, max_queue=args.max_queue, max_batch=args.max_batch,
                          batch_wait_ms=args.batch_wait_ms, api_key=args.api_key)
    app = create_app(tts, limits, voices_dir, model_id=model_id_for(model_path))
    print(f"serving {model_id_for(model_path)} on http://{args.host}:{args.port} "
          f"(voices: {voices_dir or 'none'})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0

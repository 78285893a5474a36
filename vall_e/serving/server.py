"""`python -m vall_e.server`: an OpenAI-compatible HTTP API for the synthesizer (FastAPI + uvicorn).

    python -m vall_e.server --model model.safetensors --voices ./voices
    curl -s localhost:8000/v1/audio/speech -H 'Content-Type: application/json' \
         -d '{"input": "Hello there.", "voice": "alice", "response_format": "wav"}' -o hello.wav

Endpoints: `POST /v1/audio/speech` (OpenAI's request plus sampler extras; `stream: true` sends audio
while the AR runs), `GET|POST /v1/voices` (named voices = reference clips in `--voices`),
`DELETE /v1/voices/{name}`, `GET /v1/models`, `GET /health`; the schema is at `/openapi.json`.

The parts: `state.py` (`ServerState`: engine, limits, voices, batcher), `routes.py` (the routes,
the request schema, the error handlers, the OpenAPI additions), `voices.py` (the voice folder),
`batching.py` (the one worker thread that runs the model: requests with the same sampler settings
that arrive within `--batch-wait-ms` run as one batched AR/NAR pass) and this module (the app, the
API-key and body-size guard in front of it, and the command line). Every error is JSON
`{"error": {"message", "type"}}` with a 4xx/5xx status, and no bad request stops the server.

Streaming: `pcm` sends raw s16le mono chunks; `wav` sends a 44-byte WAV header whose RIFF and data
sizes are 0xFFFFFFFF ("unknown length", as ffmpeg and most players accept), then s16le chunks.
"""
from __future__ import annotations

import argparse
import hmac
import importlib.util
import ipaddress
import json
import logging
import os
import socket
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Sequence

from vall_e.config import parse_config
from vall_e.generation.tts import TTS
from vall_e.serving.errors import BodyTooLarge, error_body
from vall_e.serving.options import add_engine_options
from vall_e.serving.state import OPEN_PATHS, ServerLimits, ServerState
from vall_e.utils.errors import UserError

logger = logging.getLogger("vall_e.server")

_BODY_OVERHEAD = 64 * 1024  # multipart boundaries and form fields on top of the upload itself


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def model_id_for(path: str | Path) -> str:
    path = Path(path)
    return path.parent.name if path.stem == "model" and path.parent.name else path.stem


def create_app(tts: Any, limits: ServerLimits | None = None, voices_dir: str | Path | None = None,
               model_id: str = "vall-e") -> Any:
    """The FastAPI app around a loaded `TTS`, behind the API-key and body-size guard. The batcher's
    worker thread starts here and stops with the app."""
    from fastapi import FastAPI  # the server extra

    from vall_e.serving import routes  # FastAPI at import, like this function

    state = ServerState.start(tts, limits, voices_dir, model_id)

    @asynccontextmanager
    async def lifespan(_app: Any):
        yield
        state.close()

    app = FastAPI(title="VALL-E TTS server", lifespan=lifespan)
    app.state.server = state
    app.state.batcher, app.state.voices, app.state.started = state.batcher, state.voices, state.started
    app.include_router(routes.build_router(state))
    routes.install_error_handlers(app)
    routes.finish_openapi(app, state)
    return _Guard(app, api_key=state.limits.api_key, max_body=state.limits.max_upload_bytes + _BODY_OVERHEAD)


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

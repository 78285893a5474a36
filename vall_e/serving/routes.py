"""The HTTP API's routes, request schema and error handling (FastAPI; the `server` extra).

`build_router(state)` returns the routes around one `ServerState`; `install_error_handlers(app)`
turns every error into `{"error": {...}}`; `finish_openapi(app, state)` completes the schema with
what FastAPI cannot see (the error bodies, the API key, the audio responses), so the schema says
what the server does: every status a route answers is documented with its body, and the request
limits (voice names, text length, sampler ranges) are schema constraints.
"""
# No `from __future__ import annotations`: FastAPI reads the route annotations (`Request`) at runtime.

import asyncio
import json
import logging
import re
from typing import Any, Literal, Optional

from fastapi import APIRouter, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from vall_e.generation.settings import option, settings_from
from vall_e.serving.batching import QueueFull, WorkerStopped
from vall_e.serving.errors import ERROR_SCHEMA, STATUSES, ApiError, BodyTooLarge, error_body
from vall_e.serving.state import OPEN_PATHS, ServerState
from vall_e.serving.voices import MAX_VOICE_SECONDS, VOICE_NAME, VOICE_NAME_PATTERN, VOICE_NAME_RULE
from vall_e.utils.audio import audio_to_bytes, streaming_wav_header
from vall_e.utils.errors import UserError

logger = logging.getLogger("vall_e.server")

CONTENT_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg", "pcm": "audio/pcm"}
UNSUPPORTED_FORMATS = ("opus", "aac")
STREAM_FORMATS = ("wav", "pcm")
# Model names OpenAI clients send by default; accepted as aliases of the loaded model.
OPENAI_MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "vall-e")
# `input` must hold something besides whitespace: Python's whitespace (what str.split drops), spelled
# out, since a JSON schema's `\s` (ECMA 262) is another set
TEXT_PATTERN = r"[^\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
_TEXT = re.compile(TEXT_PATTERN)
# the generation options a speech request may set (names from vall_e.generation.settings.OPTIONS)
SPEECH_OPTIONS = ("ar_temp", "nar_temp", "top_p", "top_k", "min_p", "repetition_penalty", "length_penalty", "seed",
                  "max_ar_steps", "input_prompt_length", "language")


# ---------------------------------------------------------------------------------------- requests
def speech_request_model(state: ServerState) -> type[BaseModel]:
    """The pydantic model of a speech request: OpenAI's fields plus the sampler options, with this
    server's limits (text length, model names) and the options' own defaults and ranges."""
    generation: dict[str, Any] = {}
    for name in SPEECH_OPTIONS:
        o = option(name)
        bounds = o.range.schema() if o.range else {}
        if name == "input_prompt_length":
            bounds["le"] = MAX_VOICE_SECONDS
        kind = Optional[o.type] if o.default is None else o.type
        generation[o.json_name] = (kind, Field(o.default, description=o.help, **bounds))
    return create_model(
        "SpeechRequest",
        __config__=ConfigDict(extra="forbid", json_schema_extra={
            # streaming sends wav or pcm only
            "if": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
            "then": {"properties": {"response_format": {"enum": list(STREAM_FORMATS)}},
                     "required": ["response_format"]},
        }),
        input=(str, Field(..., min_length=1, max_length=state.limits.max_text_chars, pattern=TEXT_PATTERN,
                          description=f"the text to speak (at most {state.limits.max_text_chars} characters)")),
        voice=(str, Field(..., pattern=VOICE_NAME_PATTERN, description=f"a voice of GET /v1/voices ({VOICE_NAME_RULE})")),
        model=(Optional[Literal[(state.model_id, *OPENAI_MODEL_ALIASES)]], None),  # type: ignore[misc]
        response_format=(Literal[tuple(CONTENT_TYPES)], "mp3"),  # type: ignore[valid-type]
        speed=(float, Field(1.0, ge=0.25, le=4.0, description="accepted, not supported (ignored)")),
        stream=(bool, Field(False, description="send audio while the AR runs (response_format wav or pcm)")),
        stream_format=(Optional[Literal["audio"]], None),
        instructions=(Optional[str], Field(None, description="accepted, not supported (ignored)")),
        **generation,
    )


def settings_from_request(req: Any) -> Any:
    """The request's generation options -> GenerationSettings (through the one builder)."""
    return settings_from({name: getattr(req, option(name).json_name) for name in SPEECH_OPTIONS})


def _validation_message(e: Any) -> tuple[str, str | None]:
    first = e.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    elif first.get("type") == "missing":
        msg = "this field is required"
    return (f"{loc}: {msg}" if loc else msg), (loc or None)


def _check_speech_body(body: Any, state: ServerState) -> None:
    """The checks whose messages say more than the schema validator's (the schema states them too)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    fmt = body.get("response_format")
    if isinstance(fmt, str) and fmt not in CONTENT_TYPES:
        what = "is unsupported" if fmt.lower() in UNSUPPORTED_FORMATS else "is unknown"
        raise ApiError(400, f"response_format {fmt!r} {what}; use one of {', '.join(CONTENT_TYPES)}",
                       param="response_format")
    model = body.get("model")
    if isinstance(model, str) and model not in (state.model_id, *OPENAI_MODEL_ALIASES):
        raise ApiError(400, f"unknown model {model!r}; this server serves {state.model_id!r}", param="model")
    text = body.get("input")
    if isinstance(text, str):
        if len(text) > state.limits.max_text_chars:
            raise ApiError(400, f"input is {len(text)} characters; this server's limit is "
                                f"{state.limits.max_text_chars} (--max-text-chars)", param="input")
        if not _TEXT.search(text):
            raise ApiError(400, "input is empty: nothing to synthesize", param="input")
    voice = body.get("voice")
    if isinstance(voice, str) and not VOICE_NAME.fullmatch(voice):
        raise ApiError(400, f"voice name {voice[:80]!r} is not allowed: {VOICE_NAME_RULE}", param="voice")


# ---------------------------------------------------------------------------------------- routes
def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for error statuses, with the error body's schema."""
    return {s: {"description": STATUSES[s][1],
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
            for s in statuses}


AUDIO_RESPONSE = {200: {"description": "the audio, in response_format (streamed with stream: true)",
                        "content": {ct: {"schema": {"type": "string", "format": "binary"}}
                                    for ct in CONTENT_TYPES.values()}}}


def build_router(state: ServerState) -> APIRouter:
    """The API's routes around one server's state."""
    router = APIRouter()
    SpeechRequest = speech_request_model(state)
    voices, limits = state.voices, state.limits

    @router.get("/health", responses=_errors(500))
    async def health():
        return {"status": "ok", "model_loaded": True, "model": state.model_id, "device": str(state.tts.device),
                "sample_rate": state.sample_rate, "queue_depth": state.batcher.depth,
                "running": state.batcher.running, "max_queue": limits.max_queue, "max_batch": limits.max_batch,
                "stats": dict(state.batcher.stats)}

    def model_card() -> dict[str, Any]:
        return {"id": state.model_id, "object": "model", "created": int(state.started), "owned_by": "vall-e"}

    @router.get("/v1/models", responses=_errors(500))
    async def models():
        return {"object": "list", "data": [model_card()]}

    @router.get("/v1/models/{name}", responses=_errors(404, 500))
    async def model_info(name: str):
        if name != state.model_id:
            raise ApiError(404, f"model {name!r} not found; this server serves {state.model_id!r}")
        return model_card()

    @router.get("/v1/voices", responses=_errors(500))
    async def list_voices():
        return {"object": "list", "data": [voices.describe(n) for n in voices.names()]}

    upload_body = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["name", "file"],
        "properties": {"name": {"type": "string", "pattern": VOICE_NAME_PATTERN, "description": VOICE_NAME_RULE},
                       "file": {"type": "string", "format": "binary",
                                "description": f"wav, flac or mp3, at most {limits.max_upload_mb:g} MB and "
                                               f"{MAX_VOICE_SECONDS:g} s"}}}}}}}

    @router.post("/v1/voices", status_code=201, responses=_errors(400, 413, 500), openapi_extra=upload_body,
                 operation_id="upload_voice")
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
            raise ApiError(413, f"the upload is larger than the limit of {limits.max_upload_mb:g} MB", param="file")
        loop = asyncio.get_running_loop()
        _path, replaced = await loop.run_in_executor(None, voices.save, name, data, state.sample_rate)
        return {**voices.describe(name), "replaced": replaced}

    @router.delete("/v1/voices/{name}", responses=_errors(400, 404, 500))
    async def delete_voice(name: str = Path(..., pattern=VOICE_NAME_PATTERN, description=VOICE_NAME_RULE)):
        if not voices.delete(name):
            raise ApiError(404, f"unknown voice {name!r}", param="voice")
        return {"id": name, "object": "voice", "deleted": True}

    speech_body = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": SpeechRequest.model_json_schema()}}}}

    @router.post("/v1/audio/speech", response_class=Response, openapi_extra=speech_body,
                 responses={**AUDIO_RESPONSE, **_errors(400, 404, 413, 429, 500, 503, 504)})
    async def speech(request: Request):
        req = await _parse_speech(request, SpeechRequest, state)
        settings = settings_from_request(req)
        headers = {"X-Sample-Rate": str(state.sample_rate), "X-Model": state.model_id}
        notes = []
        if req.speed != 1.0:
            notes.append("speed is not supported and was ignored")
        if req.instructions:
            notes.append("instructions are not supported and were ignored")
        if notes:
            headers["X-Note"] = "; ".join(notes)
        if req.stream:
            return await _stream_speech(req, settings, headers, state)
        return await _whole_speech(req, settings, headers, state)

    return router


async def _parse_speech(request: Request, model: type[BaseModel], state: ServerState) -> Any:
    """The request body, validated: JSON, the friendly checks, the schema, a known voice."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    _check_speech_body(body, state)
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        msg, param = _validation_message(e)
        raise ApiError(400, msg, param=param) from None
    if req.stream and req.response_format not in STREAM_FORMATS:
        raise ApiError(400, f"streaming supports response_format wav or pcm, not {req.response_format!r}",
                       param="response_format")
    if state.voices.path(req.voice) is None:
        known = state.voices.names()
        hint = f"; available: {', '.join(known[:20])}" if known else "; no voices are installed (POST /v1/voices)"
        raise ApiError(404, f"unknown voice {req.voice[:80]!r}{hint}", param="voice")
    return req


async def _stream_speech(req: Any, settings: Any, headers: dict[str, str], state: ServerState) -> Any:
    """Audio chunks as the AR produces them (wav: a header of unknown length first)."""
    text, voice, fmt, sr = req.input, req.voice, req.response_format, state.sample_rate

    def run_stream():
        prompt = state.voices.prompt(state.tts, voice, settings.input_prompt_length)
        return state.tts.stream(text, prompt, settings)

    try:
        chunks = await state.batcher.submit_stream(run_stream, first_timeout=state.limits.request_timeout)
    except asyncio.TimeoutError:
        raise ApiError(504, f"no audio within the request timeout of {state.limits.request_timeout:g} s") from None

    async def body_iter():
        if fmt == "wav":
            yield streaming_wav_header(sr)
        async for chunk in chunks:
            yield audio_to_bytes(chunk, sr, "pcm")

    return StreamingResponse(body_iter(), media_type=CONTENT_TYPES[fmt], headers=headers)


async def _whole_speech(req: Any, settings: Any, headers: dict[str, str], state: ServerState) -> Any:
    """The whole audio file, synthesized in a batch with requests of the same settings."""
    key = repr(settings) if settings.ar.seed is None else object()  # a seeded request runs alone
    try:
        wav = await state.batcher.submit((req.input, req.voice, settings), key, timeout=state.limits.request_timeout)
    except asyncio.TimeoutError:
        raise ApiError(504, f"the request took longer than the timeout of {state.limits.request_timeout:g} s") from None
    loop = asyncio.get_running_loop()
    data = await loop.run_in_executor(None, audio_to_bytes, wav, state.sample_rate, req.response_format)
    return Response(content=data, media_type=CONTENT_TYPES[req.response_format], headers=headers)


# ---------------------------------------------------------------------------------------- errors
def _allowed_methods(routes: list[Any], path: str) -> list[str]:
    """Every method some route of this path accepts (Starlette's 405 names only the first route's)."""
    methods: set[str] = set()
    for route in routes:
        inner = getattr(route, "original_router", None)  # an included router (newer FastAPI)
        if inner is not None:
            methods |= set(_allowed_methods(inner.routes, path))
        elif getattr(route, "methods", None) and route.path_regex.match(path):
            methods |= set(route.methods)
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    """Every error as `{"error": {"message", "type"[, "param"]}}` with its status."""

    def json_error(status: int, message: str, type: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> Any:
        type = type or STATUSES.get(status, ("invalid_request_error",))[0]
        return JSONResponse(error_body(message, type, param), status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, e: ApiError):
        return json_error(e.status, e.message, e.type, e.param, e.headers)

    @app.exception_handler(UserError)
    async def _user_error(_request: Request, e: UserError):
        return json_error(400, str(e))

    @app.exception_handler(QueueFull)
    async def _queue_full(_request: Request, e: QueueFull):
        return json_error(429, str(e), headers={"Retry-After": "1"})

    @app.exception_handler(WorkerStopped)
    async def _stopped(_request: Request, e: WorkerStopped):
        return json_error(503, str(e))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_request: Request, e: BodyTooLarge):
        return json_error(413, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        headers = dict(getattr(e, "headers", None) or {})
        if e.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(app.router.routes, request.url.path))
        return json_error(e.status_code, str(e.detail), headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, e: RequestValidationError):
        msg, param = _validation_message(e)
        return json_error(400, msg, param=param)

    @app.exception_handler(Exception)
    async def _internal(_request: Request, e: Exception):
        logger.exception("internal error")
        return json_error(500, f"internal error: {type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------- OpenAPI
def finish_openapi(app: FastAPI, state: ServerState) -> None:
    """Complete FastAPI's schema: the error body, the API key (and its 401) on every route but the
    open ones, and no 422 (validation errors are answered 400)."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = base()
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        schemas["ErrorBody"] = ERROR_SCHEMA
        if state.limits.api_key:
            components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
        for path, ops in schema.get("paths", {}).items():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
                if state.limits.api_key and path not in OPEN_PATHS:
                    op["security"] = [{"apiKey": []}]
                    op["responses"]["401"] = _errors(401)[401]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

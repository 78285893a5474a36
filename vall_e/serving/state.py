"""What the HTTP server's routes share: the engine, the limits, the voices and the batcher."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vall_e.serving.batching import Batcher
from vall_e.serving.voices import VoiceStore

OPEN_PATHS = ("/health",)  # answered without the API key (for load balancers and probes)


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


@dataclass
class ServerState:
    """One server's engine (`TTS`), limits, voices and batcher (whose worker thread is the only
    caller of the engine). `start` builds it and starts the worker; `close` stops it."""

    tts: Any
    limits: ServerLimits
    voices: VoiceStore
    batcher: Batcher
    model_id: str
    sample_rate: int
    started: float = field(default_factory=time.time)

    @classmethod
    def start(cls, tts: Any, limits: ServerLimits | None = None, voices_dir: str | Path | None = None,
              model_id: str = "vall-e") -> "ServerState":
        limits = limits or ServerLimits()
        voices = VoiceStore(Path(voices_dir) if voices_dir else None)

        def run_batch(payloads: list[tuple[str, str, Any]]) -> list[Any]:
            """Worker thread: one batch of (text, voice, settings) that share their settings."""
            settings = payloads[0][2]
            texts = [p[0] for p in payloads]
            prompts = [voices.prompt(tts, p[1], settings.input_prompt_length) for p in payloads]
            if len(payloads) == 1:
                return tts.synthesize(texts[0], prompts[0], settings)
            return tts.synthesize(texts, prompts, settings)

        batcher = Batcher(run_batch, max_batch=limits.max_batch, batch_wait_s=limits.batch_wait_ms / 1000.0,
                          max_queue=limits.max_queue)
        return cls(tts=tts, limits=limits, voices=voices, batcher=batcher, model_id=model_id,
                   sample_rate=int(tts.sample_rate))

    def close(self) -> None:
        self.batcher.close()

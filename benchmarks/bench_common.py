"""Shared benchmark plumbing: timing, memory, machine info, and the models/codecs/TTS the sections use.

Why here: every section times the same way (device sync, median or best of repeats) and builds
the same untrained models, so the numbers of one run are comparable with each other.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"  # git-ignored (benchmarks/.gitignore): corpus, codebooks, tiny EnCodec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TEXT_PER_SECOND = 13  # phonemes per second of speech at a normal rate
PROMPT_FRAMES = 225  # 3 s reference prompt at 75 frames/s
N_CODES, N_LEVELS, N_TEXT = 1024, 8, 256


@dataclass
class Ctx:
    """What every section needs: where to run and how hard."""

    device: torch.device
    dtype: torch.dtype
    threads: int
    quick: bool
    codec: str = "world"
    log: Callable[[str], None] = print
    compile: bool = True  # also measure torch.compile'd decoding (labelled rows; compile time reported apart)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


# ---------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds one call of `fn` takes (device work included), and its result."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def best_of(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Best and median seconds over `repeats` calls after `warmup` untimed ones.

    Best-of is what we compare (it is the least disturbed by other processes on a shared machine);
    the median is kept to show the spread.
    """
    for _ in range(warmup):
        fn()
    return summarize([timed(fn, device)[0] for _ in range(max(1, repeats))])


def summarize(times: list[float]) -> dict[str, float]:
    """Best and median of timed repeats (what `best_of` reports)."""
    return {"best_s": min(times), "median_s": statistics.median(times), "repeats": len(times)}


# ---------------------------------------------------------------------------------------- memory


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb(key: str = "VmRSS") -> float | None:
    """Current (VmRSS) or peak (VmHWM) resident memory in MiB, from /proc (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    if key == "VmHWM":
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # lifetime peak, not resettable
    return None


# ---------------------------------------------------------------------------------------- machine


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(ctx: Ctx) -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "vall_e"], cwd=ROOT, capture_output=True,
                                    text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    info: dict[str, Any] = {
        "cpu": cpu, "cpu_count": os.cpu_count(), "threads": ctx.threads, "torch": torch.__version__,
        "python": platform.python_version(), "device": str(ctx.device), "dtype": str(ctx.dtype).replace("torch.", ""),
        "git_commit": commit + ("+dirty" if dirty else ""), "load_average_start": load_average(),
        "quick": ctx.quick,
    }
    if ctx.cuda:
        info["gpu"] = torch.cuda.get_device_name(ctx.device)
    return info


# ---------------------------------------------------------------------------------------- models


def build_model(preset: str, ctx: Ctx, *, dropout: float = 0.0, ban_stop: bool = True, seed: int = 0,
                train: bool = False, dtype: torch.dtype | None = None, **config: Any) -> Any:
    """An untrained ar+nar VALLE of `preset`, with 1024 codes x 8 levels (EnCodec-24kHz's layout).

    ban_stop: set the AR head's STOP bias to -1e4 so decoding runs exactly as long as asked. An
    untrained model would otherwise stop at random; this controls the length without touching
    the engine. `config`: more `VALLEConfig` fields (e.g. kv_heads, backbone).
    """
    from vall_e.config.model import resolve_dims
    from vall_e.models.valle import VALLE, VALLEConfig

    d, h, n = resolve_dims(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VALLE(VALLEConfig(kind="ar+nar", d_model=d, n_heads=h, n_layers=n, n_text_tokens=N_TEXT,
                                  n_codes=N_CODES, n_levels=N_LEVELS, dropout=dropout, **config))
    if ban_stop:
        with torch.no_grad():
            model.ar_head.bias[model.config.stop_id] = -1e4
    model = model.to(ctx.device, dtype or (torch.float32 if train else ctx.dtype))
    if train:
        return model.train()
    if ctx.device.type == "cpu":  # what TTS.from_pretrained does to the models it loads
        from vall_e.generation.tts import cpu_decode_layout

        cpu_decode_layout(model)
    return model.eval()


def backbone_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.backbone.parameters())


def random_inputs(n_text: int, prompt_frames: int = PROMPT_FRAMES, seed: int = 0, batch: int = 1
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Random phoneme ids and prompt codes (the model is untrained; only the shapes matter)."""
    g = torch.Generator().manual_seed(seed)
    text = [torch.randint(1, N_TEXT, (n_text,), generator=g) for _ in range(batch)]
    prompt = [torch.randint(0, N_CODES, (prompt_frames, N_LEVELS), generator=g) for _ in range(batch)]
    return text, prompt


# ---------------------------------------------------------------------------------------- codecs


def world_codec(log: Callable[[str], None] = print) -> Any:
    """The offline WORLD codec with codebooks fitted once on a small espeak corpus (cached)."""
    from vall_e.codecs.world import WorldCodec, fit_world_codec
    from vall_e.data.synthetic import generate_corpus

    books = CACHE / "world" / "codebooks.safetensors"
    if not books.exists():
        log("fitting WORLD codebooks on a generated corpus (once; cached under benchmarks/.cache)")
        wavs = generate_corpus(CACHE / "corpus", n_speakers=4, n_utterances=12, seed=0, progress=False)
        fit_world_codec(wavs, books, n_levels=N_LEVELS, n_codes=N_CODES, iters=6, seed=0,
                        max_frames=30_000, workers=2, progress=False)
    return WorldCodec(books)


def tiny_encodec(ctx: Ctx) -> Any:
    """The tiny (0.67M-parameter) calibrated EnCodec, built once and cached."""
    from vall_e.codecs import build_codec
    from vall_e.codecs.tiny_encodec import make_tiny_encodec

    path = CACHE / "tiny_encodec"
    if not (path / "config.json").exists():
        make_tiny_encodec(path, seed=0)
    return build_codec({"name": "encodec", "model": str(path), "device": str(ctx.device)})


def build_codec_for(ctx: Ctx) -> tuple[Any, str | None]:
    """The end-to-end codec, and why the WORLD codec was replaced by the tiny EnCodec (if it was)."""
    if ctx.codec == "world":
        try:
            return world_codec(ctx.log), None
        except Exception as e:  # noqa: BLE001 - e.g. no espeak or pyworld on this machine
            ctx.log(f"WORLD codec unavailable ({type(e).__name__}: {e}); using the tiny EnCodec")
            return tiny_encodec(ctx), f"{type(e).__name__}: {e}"
    return tiny_encodec(ctx), None


def reference_wav(sample_rate: int = 24_000, seconds: float = 3.0) -> Path:
    """A 3 s reference voice clip (espeak speech when the corpus exists, else speech-like noise)."""
    from vall_e.utils.audio import save_audio

    path = CACHE / f"reference_{sample_rate}.wav"
    if not path.exists():
        corpus = sorted((CACHE / "corpus").rglob("*.wav"))
        if corpus:
            from vall_e.utils.audio import load_audio

            wav = torch.cat([load_audio(p, sample_rate) for p in corpus[:4]])
        else:
            from vall_e.codecs.tiny_encodec import speechlike_audio

            wav = speechlike_audio(seconds, sample_rate, seed=5).float()
        save_audio(path, wav[: int(seconds * sample_rate)], sample_rate)
    return path


def reference_input(sample_rate: int) -> tuple[Any, str]:
    """The 3 s reference voice for `TTS.synthesize`: a wav file (what a user passes), or where
    soundfile cannot be imported (a bare GPU box) the same kind of audio as a waveform tensor."""
    try:
        import soundfile  # noqa: F401
    except (ImportError, OSError):  # OSError: the module is there, libsndfile is not
        from vall_e.codecs.tiny_encodec import speechlike_audio

        return speechlike_audio(3.0, sample_rate, seed=5).float(), "3 s waveform tensor (soundfile unavailable)"
    return str(reference_wav(sample_rate)), "3 s wav"


def compiler_available() -> bool:
    """Whether torch.compile can build its CPU kernels here (a C++ compiler on PATH)."""
    import shutil

    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def speech(seconds: float, sample_rate: int = 24_000) -> torch.Tensor:
    """`seconds` of speech-like audio for codec speed tests."""
    from vall_e.codecs.tiny_encodec import speechlike_audio

    return speechlike_audio(seconds, sample_rate, seed=7).float()


# ---------------------------------------------------------------------------------------- the engine

PARAGRAPH = ("The old lighthouse keeper climbed the narrow stairs every evening, carrying a lamp and a "
             "small notebook in which he wrote the names of the ships that passed. Nobody had asked him "
             "to do it, but he believed that somebody, one day, would want to know. The wind was cold "
             "and the sea was loud, yet he never missed a night in forty years of quiet service. When "
             "he finally retired, the village gathered on the harbour wall and read his notebooks aloud "
             "until the sun came up over the grey water and the gulls began to call.")


def text_for_seconds(seconds: float) -> str:
    """A prefix of PARAGRAPH with about TEXT_PER_SECOND phonemes per second of speech (whole words)."""
    from vall_e.text.phonemes import phonemize

    words = PARAGRAPH.split()
    want = max(8, int(TEXT_PER_SECOND * seconds))
    for n in range(1, len(words) + 1):
        text = " ".join(words[:n])
        if len(phonemize(text)) >= want:
            return text
    return PARAGRAPH


def build_tts(preset: str, ctx: Ctx, codec: Any, with_g2p: bool = False, dtype: str | None = None,
              compile: bool = False) -> Any:
    """A `TTS` engine around an untrained model of `preset` (STOP banned, see build_model).

    with_g2p: build the symbol map from PARAGRAPH's phonemes (needs espeak) so `synthesize` works;
    otherwise any symbol map does (the sections that pass token ids directly).
    """
    from vall_e.generation.tts import TTS
    from vall_e.text.languages import LanguageMap
    from vall_e.text.symmap import Symmap

    if with_g2p:
        from vall_e.text.phonemes import phonemize

        symmap = Symmap.build([phonemize(t) for t in [PARAGRAPH] + [text_for_seconds(s) for s in (1, 5, 10, 20)]])
    else:
        symmap = Symmap.build([list("abcdefghijklmnopqrstuvwxyz")])
    dtype = dtype or {torch.float32: "float32", torch.bfloat16: "bfloat16"}[ctx.dtype]
    model = build_model(preset, ctx, dtype=torch.float32 if dtype == "int8" else None)
    return TTS({"ar+nar": model}, {"symmap": symmap, "langmap": LanguageMap()}, codec, device=str(ctx.device),
               dtype=dtype, compile=compile, decode_layout=True)


def settings_for_frames(frames: int, seed: int = 0) -> Any:
    """Generation settings that produce exactly `frames` AR frames from a STOP-banned model."""
    from vall_e.generation.sampling import SamplingParams
    from vall_e.generation.settings import GenerationSettings

    return GenerationSettings(ar=SamplingParams.ar_defaults(seed=seed), nar=SamplingParams.nar_defaults(seed=seed),
                              max_ar_steps=frames, max_repeat_frames=10 * frames + 10, split_sentences=False)


def with_seed(settings: Any, seed: int) -> Any:
    return replace(settings, ar=replace(settings.ar, seed=seed), nar=replace(settings.nar, seed=seed))

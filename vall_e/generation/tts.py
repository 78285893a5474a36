"""The TTS engine: text + reference audio -> speech, with a KV-cached batched AR and batched NAR passes.

    tts = TTS.from_pretrained("ckpt/ar+nar/model.safetensors", device="cpu", dtype="float32")
    wavs = tts.synthesize(["Hello there."], references=["voice.wav"])

Data flows one way: text -> phonemes -> ids; reference audio -> codec codes (the prompt);
AR decodes level-0 codes one frame per step from a KV cache (every sequence of the batch stops on its
own); the NAR fills levels 1..L-1 in one pass per level over the whole batch; the codec decodes.

Nothing runs forever: each sequence's AR step limit follows its text length (and the user's cap),
and a frame code repeated for too long ends that sequence.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor
from torch.ao.quantization import quantize_dynamic

from vall_e.codecs import build_codec
from vall_e.codecs.rvq import ResidualVQ
from vall_e.codecs.vocos import VocosDecoding
from vall_e.codecs.world import WorldCodec
from vall_e.config import load_config
from vall_e.data.prompts import trim_or_repeat
from vall_e.generation.constraints import DecodingConstraints
from vall_e.generation.pitch import TRIES as PITCH_TRIES
from vall_e.generation.pitch import median_log_f0, semitones_apart
from vall_e.generation.sampling import BeamSearch, SamplingParams, TokenSampler
from vall_e.generation.settings import GenerationSettings
from vall_e.generation.speculative import medusa_steps, medusa_unsupported
from vall_e.models.backbones.kv_cache import KVCache
from vall_e.models.backbones.transformer import DECODE_SDPA_BACKENDS
from vall_e.models.model_file import load_exported
from vall_e.models.vallex_checkpoint import is_foreign_checkpoint
from vall_e.models.vallex_convert import load_foreign
from vall_e.text.languages import LanguageMap
from vall_e.text.phonemes import phonemize
from vall_e.text.symmap import Symmap
from vall_e.text.vallex import build_frontend
from vall_e.utils.audio import concat_with_pauses, load_audio
from vall_e.utils.dtypes import ALIASES, DTYPES, torch_dtype
from vall_e.utils.errors import UserError

logger = logging.getLogger(__name__)

ENGINE_DTYPES = (*DTYPES, "int8")  # what `TTS` accepts as its dtype (int8: dynamic quantization, CPU)


# Frames of speech per phoneme token are about 5-7 at normal speed (12-15 phonemes/s at 75 frames/s).
# The step limit allows a generous 3x slack before cutting a sequence off.
FRAMES_PER_PHONEME_LIMIT = 20
MIN_AR_STEPS = 75
RETRY_SEED_STRIDE = 1_000_003  # a pitch-guard retry samples with seed + try x this (a stream no other seed uses nearby)
SYNC_EVERY = 8  # GPU decode path: frames between reads of "have all rows stopped?" (each read waits for the GPU)
MAX_REFERENCE_SECONDS = 120.0  # a reference longer than this is refused from its header (never loaded)


_CJK_END = re.compile(r"([。！？]+)(?=[^\s\[」』）)\"'”’])")


def split_sentences(text: str, max_chars: int = 200) -> list[str]:
    """Split long text into sentences (and over-long sentences at commas or spaces).

    Chinese and Japanese put no space after 。！？: a sentence also ends there when more text follows
    directly, unless a closing quote or bracket follows (「はい。」と言った) or a language tag. Every
    piece of a tagged span carries its tags."""
    text = " ".join(text.split())
    if not text:
        return []
    text = _CJK_END.sub(r"\1 ", text)
    parts = [p.strip() for p in re.split(r"(?<=[.!?;:。！？])\s+", text) if p.strip()]
    out: list[str] = []
    for p in parts:
        while len(p) > max_chars:
            cut = max(p.rfind(", ", 0, max_chars), p.rfind(" ", 0, max_chars))
            cut = cut if cut > max_chars // 3 else max_chars
            out.append(p[:cut + 1].strip())
            p = p[cut + 1:].strip()
        if p:
            out.append(p)
    return _carry_language_tags(out)


_LANGUAGE_TAG = re.compile(r"\[(?:EN|ZH|JA)\]")


def _carry_language_tags(pieces: list[str]) -> list[str]:
    """A language span cut into sentences ("[JA]一。", "二。", "三。[JA]") is re-tagged in every piece
    ("[JA]二。[JA]"), so a middle sentence is still read in its span's language (VALL-E X's tags)."""
    out, open_tag = [], None
    for piece in pieces:
        start = open_tag
        for m in _LANGUAGE_TAG.finditer(piece):
            open_tag = None if m.group(0) == open_tag else m.group(0)
        out.append((start or "") + piece + (open_tag or ""))
    return out


def _bare(token: str) -> str:
    return token.replace("ː", "").replace("ˈ", "").replace("ˌ", "")


def cpu_decode_layout(model: torch.nn.Module) -> int:
    """Store the weight of every plain nn.Linear with more outputs than inputs column-major; returns
    how many were changed. Values, shapes and results are unchanged (up to float rounding).

    Why: an AR step multiplies one row per sample by every weight matrix, so it streams the weights
    from memory. On the CPU (MKL, AVX2) that product runs faster from a column-major weight when
    the matrix is wider than tall (fused QKV, SwiGLU gate/up, the heads) and slower when it is
    taller (the down projection); batched NAR passes are not affected. float32 only: bfloat16 and
    float16 products from a column-major weight are much slower. The numbers are in
    benchmarks/README.md ("Measurements behind code choices"). Only for inference: a re-laid
    parameter is no longer contiguous.
    """
    changed = 0
    for m in model.modules():
        if (type(m) is torch.nn.Linear and m.out_features > m.in_features and m.weight.dtype == torch.float32
                and m.weight.is_contiguous()):
            m.weight.data = m.weight.data.t().contiguous().t()
            changed += 1
    return changed


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` with every nn.Linear dynamically quantized (int8 weights, per-tensor scale;
    activations quantized per call), for CPU inference. Embeddings and norms stay float32."""
    with warnings.catch_warnings():  # torch.ao's deprecation notice
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _check_compiler(device: torch.device) -> None:
    """torch.compile's CPU backend (inductor) builds C++: say so before the first decode fails."""
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise UserError("compile=True needs a C++ compiler (g++ or clang++) for torch.compile on the CPU")


def _reorder_cache(cache: Any, index: Tensor) -> Any:
    """Reorder a backbone cache along its batch dimension (beam search)."""
    if isinstance(cache, KVCache):
        cache.reorder(index)
        return cache
    if hasattr(cache, "reorder"):
        return cache.reorder(index)
    if hasattr(cache, "reorder_cache"):  # transformers' Cache classes
        cache.reorder_cache(index)
        return cache
    if isinstance(cache, Tensor):
        return cache.index_select(0, index)
    if isinstance(cache, (list, tuple)):
        return type(cache)(_reorder_cache(c, index) for c in cache)
    if isinstance(cache, dict):
        return {k: _reorder_cache(v, index) for k, v in cache.items()}
    if cache is None or isinstance(cache, (int, float, str)):
        return cache
    if hasattr(cache, "__dict__"):
        for k, v in vars(cache).items():
            setattr(cache, k, _reorder_cache(v, index))
        return cache
    raise TypeError(f"cannot reorder a cache of type {type(cache).__name__}")


def _inference_mode(steps: Iterator[Any]) -> Iterator[Any]:
    """Run a generator's every step under inference mode (a generator's body runs at each `next`, outside
    the caller's `with`), returning its value."""
    while True:
        with torch.inference_mode():
            try:
                item = next(steps)
            except StopIteration as end:
                return end.value
        yield item


def _with_vocoder(codec: Any, meta: dict[str, Any], vocoder: str | None, device: str | None) -> Any:
    """The codec, decoding through Vocos when asked (or when the model's default is Vocos).
    vocoder: "encodec", "vocos" (charactr/vocos-encodec-24khz from the hub or its cache), or a folder
    holding that model's config.yaml and pytorch_model.bin."""
    choice = vocoder or (meta.get("extra") or {}).get("vocoder") or "encodec"
    if choice.lower() == "encodec":
        return codec
    if choice.lower() == "vocos":
        return VocosDecoding(codec, device=device or "cpu")
    if Path(choice).expanduser().is_dir():
        return VocosDecoding(codec, source=Path(choice).expanduser(), device=device or "cpu")
    raise UserError(f"vocoder {vocoder!r}: choose vocos, encodec or a Vocos folder (config.yaml + pytorch_model.bin)")


class TTS:
    """A loaded model with its codec, symbol map and language map."""

    sync_every = 1  # decode steps between host reads of "have all rows stopped?" (SYNC_EVERY on CUDA's static path)

    def __init__(self, models: dict[str, Any], meta: dict[str, Any], codec: Any, device: str = "cpu",
                 dtype: str = "float32", compile: bool = False, decode_layout: bool = False,
                 static_cache: bool | None = None) -> None:
        """dtype: float32, bfloat16, float16, or int8 (CPU: every nn.Linear dynamically quantized to
        int8 weights, activations in float32; see benchmarks/README.md for where each wins).
        compile: run the AR decode step as a torch.compile'd graph (transformer backbone; needs a C++
        compiler on the CPU; the first decode compiles, which takes minutes on a small CPU).
        decode_layout: re-lay wide weight matrices for faster CPU decoding (`cpu_decode_layout`); it
        changes the given models' parameters, so only `from_pretrained` (which owns them) turns it on.
        static_cache: the GPU decode path (transformer backbone): a static KV cache and a fixed-shape
        step (`TransformerBackbone.decode_static`), compiled with mode="reduce-overhead" (a CUDA graph)
        when `compile` is set, the one-query attention on explicitly chosen SDPA kernels, and the
        all-rows-stopped check read back every SYNC_EVERY steps instead of every step. None (the
        default) = on when `compile` is set on a CUDA device.
        """
        if dtype not in ENGINE_DTYPES and ALIASES.get(dtype) not in ENGINE_DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(ENGINE_DTYPES)}")
        self.device = torch.device(device)
        self.quantized = dtype == "int8"
        if self.quantized and self.device.type != "cpu":
            raise UserError("dtype int8 (dynamic quantization) runs on the CPU only; use bfloat16 on a GPU")
        if self.quantized and compile:
            raise UserError("compile=True needs float weights (float32, bfloat16 or float16), not int8")
        self.dtype = torch.float32 if self.quantized else torch_dtype(dtype)
        self.meta = meta
        self.models = {k: m.to(self.device, self.dtype).eval() for k, m in models.items()}
        if self.quantized:
            self.models = {k: quantize_int8(m) for k, m in self.models.items()}
        elif decode_layout and self.device.type == "cpu":
            for m in self.models.values():
                cpu_decode_layout(m)
        if static_cache is None:
            static_cache = compile and self.device.type == "cuda"
        self.sync_every = SYNC_EVERY if static_cache and self.device.type == "cuda" else 1
        if compile:
            _check_compiler(self.device)
        if compile or static_cache:
            for m in self.models.values():
                if not hasattr(m.backbone, "compile_decode") or self.quantized:
                    raise UserError(f"compile/static_cache: the {m.config.backbone} backbone has no compiled decode "
                                    "step (the transformer backbone has; float weights only)")
                if static_cache:
                    m.backbone.static_decode = True
                    if self.device.type == "cuda":
                        m.backbone.decode_backends = DECODE_SDPA_BACKENDS
                    if compile:
                        m.backbone.compile_decode(static=True, **({"mode": "reduce-overhead"}
                                                                  if self.device.type == "cuda" else {}))
                else:
                    m.backbone.compile_decode()
        self.ar_model = self.models.get("ar+nar") or self.models.get("ar")
        self.nar_model = self.models.get("ar+nar") or self.models.get("nar")
        if self.ar_model is None or self.nar_model is None:
            raise UserError(f"the model file holds {', '.join(models)}; synthesis needs an AR and a NAR part")
        self.symmap = (Symmap.from_json(meta["symmap"], source="the model's symbol map")
                       if isinstance(meta["symmap"], str) else meta["symmap"])
        langs = meta.get("langmap")
        self.langmap = (LanguageMap.from_json(langs) if isinstance(langs, str) else langs) or LanguageMap()
        self.codec = codec
        # a converted checkpoint (VALL-E X, Amphion) brings its own text front end (vall_e.text.vallex)
        self.frontend = None
        frontend_spec = (meta.get("extra") or {}).get("text_frontend")
        if frontend_spec:
            self.frontend = build_frontend(json.loads(frontend_spec))
        cfg = self.ar_model.config
        self.ar_stats: dict[str, float] = {}  # the last AR decode's Medusa counts (`medusa_steps`)
        self.n_levels = cfg.n_levels
        self.stop_id = cfg.n_codes

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "auto", dtype: str = "float32",
                        codec_device: str | None = None, compile: bool = False, vocoder: str | None = None,
                        static_cache: bool | None = None) -> "TTS":
        """Load an exported `model.safetensors`, or a training run through its YAML (its export, else
        its latest checkpoint), or a published checkpoint (VALL-E X's .pt, Amphion's .bin, hf://...;
        see `vall_e.models.vallex_convert`). The codec and G2P settings come from the model's metadata.
        dtype and compile: see `TTS.__init__`. vocoder: "encodec" or "vocos" (decode EnCodec codes
        with Vocos); None or "" = the model's default (Vocos for VALL-E X, else EnCodec)."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if is_foreign_checkpoint(path):
            models, meta = load_foreign(path)
            return cls(models, meta, _with_vocoder(build_codec(meta["codec"]), meta, vocoder, codec_device),
                       device=device, dtype=dtype, compile=compile, decode_layout=True, static_cache=static_cache)
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            cfg = load_config(path)
            candidate = cfg.ckpt_dir / cfg.model.full_name / "model.safetensors"
            if not candidate.exists():
                raise UserError(f"{candidate}: no exported model for {path}; run "
                                f"`python -m vall_e.export yaml={path}` first")
            path = candidate
        if not path.exists():
            raise UserError(f"{path}: model file not found")
        models, meta = load_exported(path)
        spec = dict(meta.get("codec") or {})
        if codec_device:
            spec["device"] = codec_device
        if meta.get("codec_tensors") and spec.get("name") == "world":  # codebooks embedded in the file
            codec = WorldCodec(ResidualVQ.from_tensors(*meta["codec_tensors"], source=str(path)),
                               device=spec.get("device", "cpu"))
        else:
            codec = build_codec(spec)
        codec = _with_vocoder(codec, meta, vocoder, codec_device)
        return cls(models, meta, codec, device=device, dtype=dtype, compile=compile, decode_layout=True,
                   static_cache=static_cache)

    @property
    def sample_rate(self) -> int:
        return self.codec.sample_rate

    # ------------------------------------------------------------------ front ends
    def encode_text(self, text: str, language: str = "en", reference_text: str = "") -> Tensor:
        """Text -> ids. A converted checkpoint's front end also reads `reference_text` (what the
        reference says), whose ids come first; other models ignore it and tokenize in the stress mode
        the model was trained with (its symbol map's: a model file from before the modes is "merged")."""
        if self.frontend is not None:
            return torch.tensor(self.frontend.encode_with_reference(text, language, reference_text), dtype=torch.long)
        tokens = [self._known_symbol(t) for t in phonemize(text, language, stress=self.symmap.stress)]
        unknown = sorted({t for t in tokens if t not in self.symmap})
        if unknown:
            raise UserError(f"unknown phoneme(s) {' '.join(map(repr, unknown))} in the text {text[:40]!r} (language "
                            f"{language!r}): this model's symbol map covers the language(s) it was trained on "
                            f"({', '.join(self.langmap.names) or 'en'})")
        return torch.tensor(self.symmap.encode(tokens, source=f"the text {text[:40]!r}"), dtype=torch.long)

    def _known_symbol(self, token: str) -> str:
        """A phoneme the model never saw falls back to a known symbol with the same base phone and
        other stress/length marks (e.g. 'ɜː' -> 'ɜ', 'hˌ' -> 'hˈ'); a phone with no such relative is
        kept, and `encode` names it in a clear error. A map built from the language's inventory
        (separate stress mode) knows every phoneme, so this is for merged-mode models and for
        languages without a stored inventory."""
        if token in self.symmap:
            return token
        variant = self._bare_index().get(_bare(token))
        if variant is not None:
            warned = self.__dict__.setdefault("_warned_symbols", set())
            if token not in warned:  # once per symbol, not per occurrence
                warned.add(token)
                logger.warning("phoneme %r is not in the model's symbol map; using %r", token, variant)
            return variant
        return token

    def _bare_index(self) -> dict[str, str]:
        if not hasattr(self, "_bare_cache"):
            index: dict[str, str] = {}
            for sym in self.symmap.symbols:
                index.setdefault(_bare(sym), sym)
            self._bare_cache = index
        return self._bare_cache

    def language_id(self, language: str) -> int:
        try:
            return self.langmap.id(language)
        except UserError:
            if len(self.langmap) <= 1:  # a single-language model: the id is the only one there is
                return 0
            raise

    def encode_reference(self, references: str | Path | Sequence[str | Path] | Tensor,
                         prompt_seconds: float = 3.0) -> Tensor:
        """Reference audio -> prompt codes [T, L]. Several files (or `a.wav;b.wav`) are joined."""
        if isinstance(references, Tensor):
            codes = references if references.dim() == 2 else self.codec.encode(references)
        else:
            if isinstance(references, (str, Path)):
                references = [p for p in str(references).split(";") if p.strip()]
            if not references:
                raise UserError("no reference audio given")
            pieces = [self.codec.encode(load_audio(p, self.codec.sample_rate, max_seconds=MAX_REFERENCE_SECONDS))
                      for p in references]
            codes = torch.cat(pieces)
        if prompt_seconds > 0:
            codes = trim_or_repeat(codes, max(1, int(round(prompt_seconds * self.codec.frame_rate))))
        return codes[:, : self.ar_model.config.n_levels].long()

    def _own_length(self, text: str, ids: Tensor, language: str, settings: GenerationSettings) -> int:
        """How many ids are the text's own (not its reference transcript's): the STOP floor counts only those."""
        if self.frontend is not None and settings.reference_text.strip():
            return len(self.encode_text(text, language))
        return len(ids)

    def _prompt_seconds(self, settings: GenerationSettings) -> float:
        """The prompt length; all of the reference when its transcript goes before the text."""
        if self.frontend is not None and settings.reference_text.strip():
            return 0.0
        return settings.input_prompt_length

    # ------------------------------------------------------------------ decoding stages
    def _step_limits(self, text_ids: list[Tensor], cap: int) -> list[int]:
        limits = [max(MIN_AR_STEPS, FRAMES_PER_PHONEME_LIMIT * len(t)) for t in text_ids]
        return [min(lim, cap) if cap > 0 else lim for lim in limits]

    def generate_ar(self, text_ids: list[Tensor], langs: Tensor, prompts: list[Tensor],
                    params: SamplingParams, max_steps: list[int], max_repeat_frames: int = 150,
                    min_steps: list[int] | None = None) -> list[Tensor]:
        """Batched AR decoding with a KV cache. Returns level-0 codes Long[T_i] per sample (no STOP).

        Sampling and beam search apply the same `DecodingConstraints` (penalties, STOP floor, caps,
        repeat guard, rolling context)."""
        if params.uses_beam:
            if self.ar_model.config.ar_group > 1:
                raise UserError("beam search needs a model that predicts one frame per step; this model "
                                f"predicts {self.ar_model.config.ar_group} (model.ar_group); use sampling or greedy")
            with torch.inference_mode():
                return self._beam_ar(text_ids, langs, prompts, params, max_steps, max_repeat_frames, min_steps)
        steps = self.ar_steps(text_ids, langs, prompts, params, max_steps, max_repeat_frames, min_steps)
        while True:
            try:
                next(steps)
            except StopIteration as end:
                return end.value

    def ar_steps(self, text_ids: list[Tensor], langs: Tensor, prompts: list[Tensor], params: SamplingParams,
                 max_steps: list[int], max_repeat_frames: int = 150, min_steps: list[int] | None = None
                 ) -> Iterator[tuple[int, Tensor, Tensor]]:
        """The AR loop as a generator: yields (frame, tokens[B], done[B]) after every frame and returns
        the level-0 codes per sample. Streaming consumes it frame by frame.

        A model with `ar_group` G > 1 (VALL-E 2's grouped code modeling) gives the logits of G frames
        per forward step; they are sampled one frame after another, so the repetition penalty, the
        STOP floor, the caps and the repeat guard see every frame as with G = 1, and the G sampled
        codes (STOP after a row ends) are fed back as the next step's input.

        A model with Medusa heads (`model.medusa_heads`, and `params.medusa` on) decodes through
        `vall_e.generation.speculative.medusa_steps` instead: several steps per forward pass, the same
        greedy codes and the same sampling distribution; `self.ar_stats` then holds its counts."""
        G = self.ar_model.config.ar_group
        self.ar_stats: dict[str, float] = {}
        why_not = medusa_unsupported(self.ar_model, params)
        if why_not is None:
            rules = DecodingConstraints(params, self.stop_id, max_steps, min_steps, max_repeat_frames, group=G,
                                        device=self.device)
            return (yield from _inference_mode(medusa_steps(self.ar_model, text_ids, langs, prompts, params, rules,
                                                            self.stop_id, self.device, self.ar_stats)))
        if getattr(self.ar_model.config, "medusa_heads", 0) and params.medusa:
            logger.info("decoding one AR step at a time: %s", why_not)
        with torch.inference_mode():
            model = self.ar_model
            B = len(text_ids)
            dev = self.device
            rules = DecodingConstraints(params, self.stop_id, max_steps, min_steps, max_repeat_frames, group=G,
                                        device=dev)
            limit = rules.limit
            n_steps = -(-(limit + 1) // G)  # forward steps that cover limit + 1 frames
            logits, state = model.ar_prefill([t.to(dev) for t in text_ids], langs.to(dev),
                                             [p.to(dev) for p in prompts], max_length=n_steps + 1)
            prefix_len = state.length
            sampler = TokenSampler(params, stop_id=self.stop_id, batch_size=B, device=dev)
            history = torch.full((B, n_steps * G), -1, dtype=torch.long, device=dev)
            lengths = torch.zeros(B, dtype=torch.long, device=dev)
            done = torch.zeros(B, dtype=torch.bool, device=dev)
            looped = torch.zeros(B, dtype=torch.bool, device=dev)  # rows the repeat guard stopped, not yet reported
            stop = torch.full((B,), self.stop_id, dtype=torch.long, device=dev)
            # The constraints read the whole history for the repetition penalty; the sampler reads
            # the last ras_window tokens of each row for repetition-aware sampling (the last columns
            # of a live row; a finished row's draw is discarded). Without the penalty only that window
            # is passed, so a step's cost does not grow with the length.
            window = None if rules.needs_history else max(0, params.ras_window)
        frame = 0
        for step in range(n_steps):
            group = []
            for g in range(G):
                with torch.inference_mode():
                    past = history[:, :frame] if window is None else history[:, max(0, frame - window):frame]
                    frame_logits = rules.process(logits if G == 1 else logits[:, g],
                                                 past if window is None else None, lengths, frame)
                    tokens = sampler.sample(frame_logits, past, lengths, penalized=True)
                    tokens = torch.where(done, stop, tokens)
                    tokens, looping = rules.finish(tokens, history, frame)
                    if frame >= max_repeat_frames:
                        looped |= looping & ~done
                        if frame % self.sync_every == 0 and bool(looped.any()):  # a host sync: not every step on a GPU
                            for i in looped.nonzero().flatten().tolist():
                                logger.warning("sample %d: one code repeated for %d frames; stopping it", i,
                                               max_repeat_frames)
                            looped.zero_()
                    done |= tokens == self.stop_id
                    history[:, frame] = torch.where(done, torch.full_like(tokens, -1), tokens)
                    lengths += (~done).long()
                group.append(tokens)
                yield frame, tokens, done
                frame += 1
                if frame > limit or (frame % self.sync_every == 0 and bool(done.all())):
                    # rows that stopped between checks only fed STOP: their codes and lengths are final
                    return [history[i, : int(lengths[i])].clone() for i in range(B)]
            with torch.inference_mode():
                slot = rules.forgotten_slot(step, prefix_len)
                if slot is not None:  # rolling context: forget the oldest generated step
                    state.valid[:, slot] = False
                logits, state = model.ar_step(group[0] if G == 1 else torch.stack(group, 1), state)
        return [history[i, : int(lengths[i])].clone() for i in range(B)]

    def _beam_ar(self, text_ids: list[Tensor], langs: Tensor, prompts: list[Tensor], params: SamplingParams,
                 max_steps: list[int], max_repeat_frames: int = 150, min_steps: list[int] | None = None
                 ) -> list[Tensor]:
        """A real beam search: hypotheses reordered with their caches, length-normalised scores, and
        the same `DecodingConstraints` as sampling, applied to every hypothesis."""
        model = self.ar_model
        W = int(params.beam_width)
        B = len(text_ids)
        dev = self.device
        rules = DecodingConstraints(params, self.stop_id, max_steps, min_steps, max_repeat_frames,
                                    device=dev).expand(W)
        limit = rules.limit
        rep = lambda xs: [x.to(dev) for x in xs for _ in range(W)]  # noqa: E731
        logits, state = model.ar_prefill(rep(text_ids), langs.to(dev).repeat_interleave(W), rep(prompts),
                                         max_length=limit + 1)
        prefix_len = state.length
        beams = BeamSearch(batch_size=B, beam_width=W, stop_id=self.stop_id, device=dev,
                           max_length=limit + 1, length_alpha=params.beam_length_alpha)
        for step in range(limit + 1):
            history = beams.tokens  # [B*W, step]: each row's hypothesis so far
            lengths = torch.full((B * W,), step, dtype=torch.long, device=dev)
            x = rules.process(logits, history if rules.needs_history else None, lengths, step)
            x = rules.fold_repeats(x, history, step)
            logprobs = torch.log_softmax(x / max(params.temperature, 1e-5), dim=-1)
            tokens, index = beams.step(logprobs)
            if beams.all_done or step == limit:
                break
            state.cache = _reorder_cache(state.cache, index)
            state.valid = state.valid.index_select(0, index)
            if state.text is not None:
                state.text = state.text.index_select(0, index)
            if state.text_pos is not None:
                state.text_pos = state.text_pos.index_select(0, index)
            slot = rules.forgotten_slot(step, prefix_len)
            if slot is not None:
                state.valid[:, slot] = False
            logits, state = model.ar_step(tokens, state)
        return [seq.to(dev).long() for seq in beams.best()]

    @torch.inference_mode()
    def generate_nar(self, text_ids: list[Tensor], langs: Tensor, prompts: list[Tensor], level0: list[Tensor],
                     params: SamplingParams, max_levels: int = 7) -> list[Tensor]:
        """Fill code levels 1..max_levels with one batched pass per level. Returns [T_i, 1 + max_levels]."""
        model = self.nar_model
        dev = self.device
        resps = [c.to(dev).long()[:, None] for c in level0]
        keep = [i for i, r in enumerate(resps) if r.shape[0] > 0]
        if not keep:
            return [r for r in resps]
        n_levels = min(max_levels + 1, self.n_levels)
        # One sampler row per text, keyed by its batch position, so a text samples the same codes
        # whichever other texts share its batch. No repetition history: the previous level's codes
        # come from another codebook (docs/reference-differences.md #5).
        sampler = TokenSampler(replace(params, beam_width=0), stop_id=None, batch_size=len(keep), device=dev,
                               sequence_ids=keep)
        for level in range(1, n_levels):
            logits = model.nar_pass([text_ids[i].to(dev) for i in keep], langs[keep].to(dev),
                                    [prompts[i].to(dev) for i in keep], [resps[i] for i in keep], level)
            padded = torch.nn.utils.rnn.pad_sequence([lg.float() for lg in logits], batch_first=True)
            codes = sampler.sample(padded)
            for j, i in enumerate(keep):
                resps[i] = torch.cat([resps[i], codes[j, : logits[j].shape[0], None]], dim=1)
        return resps

    # ------------------------------------------------------------------ public API
    def generate_codes(self, texts: Sequence[str], prompts: Sequence[Tensor], settings: GenerationSettings,
                       languages: Sequence[str] | None = None) -> list[Tensor]:
        """Texts (one per prompt) -> codes [T_i, L] per text. With `settings.pitch_guard` > 0, outputs that
        left their prompt's pitch register are sampled again (`_guard_pitch`)."""
        if len(texts) != len(prompts):
            raise ValueError("one prompt per text is needed")
        languages = list(languages or [settings.language] * len(texts))
        text_ids = [self.encode_text(t, lang, settings.reference_text) for t, lang in zip(texts, languages)]
        limit = self.ar_model.config.max_positions
        for t, ids, prompt in zip(texts, text_ids, prompts):
            if len(ids) + prompt.shape[0] + 4 > limit:
                raise UserError(f"text too long for the model: {len(ids)} phonemes plus a {prompt.shape[0]}-frame "
                                f"prompt exceed its {limit} positions; split it into sentences "
                                f"(text starts {t[:40]!r})")
        langs = torch.tensor([self.language_id(lang) for lang in languages], dtype=torch.long)
        if settings.ar.seed is not None:
            torch.manual_seed(settings.ar.seed)
        steps = self._step_limits(text_ids, settings.max_ar_steps)
        floors = [int(settings.min_frames_per_phoneme * self._own_length(t, ids, lang, settings))
                  for t, ids, lang in zip(texts, text_ids, languages)]
        codes = self._ar_then_nar(text_ids, langs, list(prompts), settings, steps, floors)
        if settings.pitch_guard > 0:
            codes = self._guard_pitch(codes, text_ids, langs, list(prompts), settings, steps, floors)
        return codes

    def _ar_then_nar(self, text_ids: list[Tensor], langs: Tensor, prompts: list[Tensor], settings: GenerationSettings,
                     steps: list[int], floors: list[int]) -> list[Tensor]:
        level0 = self.generate_ar(text_ids, langs, prompts, settings.ar, steps, settings.max_repeat_frames, floors)
        return self.generate_nar(text_ids, langs, prompts, level0, settings.nar, settings.max_nar_levels)

    def _pitch_distances(self, codes: list[Tensor], prompts: list[Tensor], indices: list[int],
                         refs: dict[tuple[int, int], float] | None = None) -> dict[int, float]:
        """Semitones between each output's median pitch and its prompt's, both decoded by the codec
        (`vall_e.generation.pitch`); NaN where the prompt has no voiced frame. `refs` caches the prompts'
        pitches across calls (by prompt object and level count)."""
        out: dict[int, float] = {}
        refs = {} if refs is None else refs
        for i in indices:
            levels = max(1, codes[i].shape[1])
            key = (id(prompts[i]), levels)  # one voice's prompt is usually shared by every text
            if key not in refs:
                refs[key] = median_log_f0(self.decode([prompts[i][:, :levels]])[0], self.sample_rate)
            out[i] = semitones_apart(median_log_f0(self.decode([codes[i]])[0], self.sample_rate), refs[key])
        return out

    def _guard_pitch(self, codes: list[Tensor], text_ids: list[Tensor], langs: Tensor, prompts: list[Tensor],
                     settings: GenerationSettings, steps: list[int], floors: list[int]) -> list[Tensor]:
        """Sample again the outputs that left their prompt's pitch register by more than
        `settings.pitch_guard` semitones (a new seed per try, only those outputs, batched), up to
        `pitch.TRIES` generations each; keep the closest try. Seeded settings stay reproducible."""
        codes = list(codes)
        refs: dict[tuple[int, int], float] = {}  # each prompt's pitch, measured once for every try
        best = self._pitch_distances(codes, prompts, list(range(len(codes))), refs)
        for attempt in range(1, PITCH_TRIES):
            redo = [i for i, d in best.items() if d > settings.pitch_guard]  # NaN (no register) compares False
            if not redo:
                break
            logger.info("pitch guard: %d output(s) more than %g semitones from the reference's pitch, sampling "
                        "again (try %d of %d)", len(redo), settings.pitch_guard, attempt + 1, PITCH_TRIES)
            seed = settings.ar.seed
            retry = replace(settings, ar=replace(settings.ar, seed=None if seed is None else
                                                 (seed + attempt * RETRY_SEED_STRIDE) % (2**53)))
            again = self._ar_then_nar([text_ids[i] for i in redo], langs[redo], [prompts[i] for i in redo], retry,
                                      [steps[i] for i in redo], [floors[i] for i in redo])
            dist = self._pitch_distances(again, [prompts[i] for i in redo], list(range(len(redo))), refs)
            for j, i in enumerate(redo):
                if dist[j] < best[i]:
                    codes[i], best[i] = again[j], dist[j]
        return codes

    def decode(self, codes: list[Tensor]) -> list[Tensor]:
        out = []
        for c in codes:
            if c.shape[0] == 0:
                out.append(torch.zeros(0))
            else:
                out.append(self.codec.decode(c.cpu()).float().cpu())
        return out

    def synthesize(self, texts: str | Sequence[str], references: Any, settings: GenerationSettings | None = None,
                   **overrides: Any) -> list[Tensor]:
        """Synthesize each text with the voice of `references` (one shared voice, or one per text).

        Long texts are split into sentences that are synthesized together in one batch and joined
        with short pauses. Returns float32 waveforms at `self.sample_rate`.
        """
        settings = replace(settings or GenerationSettings(), **overrides)
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or any(not t or not t.strip() for t in texts):
            raise UserError("empty text: nothing to synthesize")
        if isinstance(references, (list, tuple)) and len(references) == len(texts) and len(texts) > 1:
            prompts = [self.encode_reference(r, self._prompt_seconds(settings)) for r in references]
        else:
            prompt = self.encode_reference(references, self._prompt_seconds(settings))
            prompts = [prompt] * len(texts)
        pieces, owners = [], []
        for i, t in enumerate(texts):
            sentences = split_sentences(t) if settings.split_sentences else [" ".join(t.split())]
            pieces += sentences
            owners += [i] * len(sentences)
        codes = self.generate_codes(pieces, [prompts[o] for o in owners], settings)
        wavs = self.decode(codes)
        out = []
        for i in range(len(texts)):
            mine = [w for w, o in zip(wavs, owners) if o == i]
            if len(mine) > 1:
                out.append(concat_with_pauses(mine, self.sample_rate, settings.pause))
            else:
                out.append(mine[0])
        return out

    def stream(self, text: str, references: Any, settings: GenerationSettings | None = None,
               chunk_frames: int = 75, first_chunk_frames: int = 25, lookahead: int = 8,
               stats: dict[str, float] | None = None, **overrides: Any) -> Iterator[Tensor]:
        """Yield audio chunks while the AR runs.

        Every `chunk_frames` new AR frames (the first after `first_chunk_frames`), the NAR fills the
        levels of all frames generated so far and the codec decodes the newly settled frames, holding
        back `lookahead` frames so the bidirectional NAR and the codec see some future context. The
        concatenated chunks equal the non-streamed output except near the chunk seams.
        `stats`, when given, receives `time_to_first_audio` and `total_time` in seconds.
        """
        settings = replace(settings or GenerationSettings(), **overrides)
        if not text or not text.strip():
            raise UserError("empty text: nothing to synthesize")
        t0 = time.perf_counter()
        prompt = self.encode_reference(references, self._prompt_seconds(settings))
        sentences = split_sentences(text) if settings.split_sentences else [" ".join(text.split())]
        pause = torch.zeros(int(settings.pause * self.sample_rate))
        first = True
        for n, sentence in enumerate(sentences):
            for chunk in self._stream_one(sentence, prompt, settings, chunk_frames, first_chunk_frames, lookahead):
                if first and stats is not None:
                    stats["time_to_first_audio"] = time.perf_counter() - t0
                first = False
                yield chunk
            if n + 1 < len(sentences) and len(pause):
                yield pause
        if stats is not None:
            stats["total_time"] = time.perf_counter() - t0

    def _stream_one(self, text: str, prompt: Tensor, settings: GenerationSettings, chunk_frames: int,
                    first_chunk_frames: int, lookahead: int) -> Iterator[Tensor]:
        text_ids = [self.encode_text(text, settings.language, settings.reference_text)]
        langs = torch.tensor([self.language_id(settings.language)])
        steps = self._step_limits(text_ids, settings.max_ar_steps)
        if settings.ar.seed is not None:
            torch.manual_seed(settings.ar.seed)
        frames: list[int] = []
        emitted = 0  # frames already turned into audio

        def settle(upto: int, final: bool) -> Tensor | None:
            nonlocal emitted
            end = upto if final else upto - lookahead
            if end <= emitted:
                return None
            level0 = torch.tensor(frames[:upto], dtype=torch.long)
            codes = self.generate_nar(text_ids, langs, [prompt], [level0], settings.nar, settings.max_nar_levels)[0]
            wav = self._decode_span(codes, emitted, end, final)
            emitted = end
            return wav

        floors = [int(settings.min_frames_per_phoneme * self._own_length(text, text_ids[0], settings.language, settings))]
        for _, tokens, done in self.ar_steps(text_ids, langs, [prompt], settings.ar, steps,
                                             settings.max_repeat_frames, floors):
            if bool(done[0]):
                break
            frames.append(int(tokens[0]))
            target = first_chunk_frames if emitted == 0 else chunk_frames
            if len(frames) - emitted >= target + lookahead:
                chunk = settle(len(frames), final=False)
                if chunk is not None:
                    yield chunk
        chunk = settle(len(frames), final=True)
        if chunk is not None:
            yield chunk

    def _decode_span(self, codes: Tensor, start: int, end: int, final: bool, context: int = 12) -> Tensor:
        """Decode frames [start, end) with `context` frames of codec context on each side, then cut."""
        fr = self.codec.frame_rate
        sr = self.codec.sample_rate
        lo = max(0, start - context)
        hi = end if final else min(codes.shape[0], end + context)
        wav = self.codec.decode(codes[lo:hi].cpu()).float()
        spf = sr / fr
        a = int(round((start - lo) * spf))
        b = int(round((end - lo) * spf)) if not final else wav.shape[0]
        return wav[a:b]

"""EnCodec through `transformers.EncodecModel` (not the `encodec` package, which pulls torchaudio).

`model` is a hub id (default `facebook/encodec_24khz`) or a local folder written by
`save_pretrained`; both go through the same `from_pretrained` call. Bandwidth picks the number of
RVQ levels (6 kbps -> 8 levels of 1024 codes at 75 frames/s).

Clips are zero-padded to a whole number of frames before encoding. With EnCodec's causal
convolutions and forward LSTM that makes each frame depend only on the audio up to it, so a clip's
codes are the same (up to float rounding) whether it is encoded alone or padded inside a batch;
clips too short for that are encoded alone.
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor

from vall_e.codecs.base import Codec, register_codec
from vall_e.utils.dtypes import torch_dtype
from vall_e.utils.errors import UserError
from vall_e.utils.hub import check_model_type, load_pretrained

DEFAULT_MODEL = "facebook/encodec_24khz"
# Largest padded batch fed to the model at once, in samples (about 100 s of 24 kHz audio).
MAX_BATCH_SAMPLES = 2_400_000
MAX_BATCH_ITEMS = 64

def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    try:
        return torch_dtype(key)
    except UserError:
        raise UserError(f"codec dtype: unknown dtype {dtype!r}; use float32, float16 or bfloat16") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"codec.device={device}: no CUDA device is available here; use codec.device=cpu")
    return dev


def load_encodec_model(model: str | os.PathLike = DEFAULT_MODEL) -> Any:
    """`EncodecModel.from_pretrained(model)` with one-line errors for missing folders and no network."""
    from transformers import EncodecModel

    name = str(model)
    m = load_pretrained(name, "codec.model", "EnCodec model", ["EncodecModel"], "codec.model=DIR",
                        EncodecModel.from_pretrained)
    check_model_type(m, "encodec", "codec.model", name, "EnCodec")
    return m.eval()


@register_codec("encodec")
class EncodecCodec(Codec):
    """EnCodec: mono audio at the model's rate <-> codes [T, L], L set by `bandwidth` (kbps)."""

    name = "encodec"

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, bandwidth: float = 6.0,
                 device: str | torch.device = "cpu", dtype: str | torch.dtype = torch.float32,
                 max_batch_samples: int = MAX_BATCH_SAMPLES):
        self.model_name = str(model)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        m = load_encodec_model(model)
        cfg = m.config
        if cfg.audio_channels != 1:
            raise UserError(f"codec.model: {self.model_name!r} is a {cfg.audio_channels}-channel EnCodec; "
                            "only mono models (like facebook/encodec_24khz) are supported")
        if cfg.normalize or cfg.chunk_length_s is not None:
            raise UserError(f"codec.model: {self.model_name!r} normalizes or chunks its input (like the 48 kHz "
                            "EnCodec); its codes alone cannot be decoded, so it is not supported")
        bandwidths = [float(b) for b in cfg.target_bandwidths]
        try:
            bw = float(bandwidth)
        except (TypeError, ValueError):
            bw = float("nan")
        if bw not in bandwidths:
            raise UserError(f"codec.bandwidth={bandwidth} is not supported by {self.model_name!r}; "
                            f"choose one of {', '.join(f'{b:g}' for b in bandwidths)}")
        self.bandwidth = bw
        self.model = m.to(self.device, self.dtype)
        self.sample_rate = int(cfg.sampling_rate)
        self.hop_length = int(cfg.hop_length)
        self.frame_rate = self.sample_rate / self.hop_length
        self.n_levels = int(m.quantizer.get_num_quantizers_for_bandwidth(bw))
        self.n_codes = int(cfg.codebook_size)
        self.max_batch_samples = int(max_batch_samples)
        self.min_batch_frames = self._min_batch_frames()

    def _min_batch_frames(self) -> int:
        """Shortest clip (in frames) whose codes do not depend on what follows it in a padded batch.

        EnCodec's convolutions are causal but reflect-pad on the left; a clip shorter than a layer's
        padding is reflected through its end, into the batch padding. Shorter clips are coded alone.
        """
        from transformers.models.encodec.modeling_encodec import EncodecConv1d

        rate, need = 1, 1
        for mod in self.model.encoder.modules():
            if isinstance(mod, EncodecConv1d):
                need = max(need, math.ceil(int(mod.padding_total) * rate / self.hop_length) + 1)
                rate *= int(mod.stride)
        # The decoder starts with a kernel_size convolution at the frame rate, reflect-padded alike.
        return max(need, int(self.model.config.kernel_size), int(self.model.config.last_kernel_size)) + 1

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "model": self.model_name, "bandwidth": self.bandwidth}

    def n_frames(self, n_samples: int) -> int:
        """Frames `encode` returns for a clip of `n_samples` samples."""
        return math.ceil(n_samples / self.hop_length)

    # ----- encoding -----

    def _check_wav(self, wav: Tensor) -> Tensor:
        if wav.ndim == 2 and wav.shape[0] == 1:
            wav = wav[0]
        if wav.ndim != 1:
            raise ValueError(f"expected mono audio [samples], got shape {tuple(wav.shape)}")
        if wav.numel() == 0:
            raise ValueError("cannot encode an empty clip")
        return wav

    @torch.inference_mode()
    def _encode_padded(self, wavs: list[Tensor]) -> list[Tensor]:
        lengths = [self.n_frames(w.numel()) for w in wavs]
        total = max(lengths) * self.hop_length
        x = torch.zeros(len(wavs), 1, total, dtype=self.dtype, device=self.device)
        for i, w in enumerate(wavs):
            x[i, 0, : w.numel()] = w.to(self.device, self.dtype)
        out = self.model.encode(x, bandwidth=self.bandwidth, return_dict=True)
        codes = out.audio_codes[0]  # [B, L, T]
        return [codes[i, :, :n].t().to("cpu", torch.long).contiguous() for i, n in enumerate(lengths)]

    def encode(self, wav: Tensor) -> Tensor:
        """wav [samples] at `sample_rate` -> LongTensor [ceil(samples / hop), n_levels]."""
        return self._encode_padded([self._check_wav(wav)])[0]

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices grouped by similar length so padding stays small and each batch fits the budget."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        batches: list[list[int]] = []
        cur: list[int] = []
        for i in order:
            if lengths[i] < self.min_batch_frames * self.hop_length:
                batches.append([i])
                continue
            longest = max([lengths[j] for j in cur] + [lengths[i]])
            if cur and (longest * (len(cur) + 1) > self.max_batch_samples or len(cur) >= MAX_BATCH_ITEMS):
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        return batches

    def encode_batch(self, wavs: list[Tensor]) -> list[Tensor]:
        """Many clips, padded into length-sorted batches.

        Gives `encode`'s codes for each clip, except that batched kernels round differently, so a
        near-tie between two codes can rarely flip (about 1 code in 3000 with the tiny test model).
        """
        wavs = [self._check_wav(w) for w in wavs]
        out: list[Tensor | None] = [None] * len(wavs)
        for idx in self._batches([w.numel() for w in wavs]):
            for i, c in zip(idx, self._encode_padded([wavs[i] for i in idx])):
                out[i] = c
        return out  # type: ignore[return-value]

    # ----- decoding -----

    def _check_codes(self, codes: Tensor) -> Tensor:
        if codes.ndim == 1:
            codes = codes[:, None]
        if codes.ndim != 2 or codes.shape[0] == 0:
            raise ValueError(f"expected codes [T, L], got shape {tuple(codes.shape)}")
        if not 1 <= codes.shape[1] <= self.n_levels:
            raise ValueError(f"codes have {codes.shape[1]} levels; this codec decodes 1..{self.n_levels}")
        if codes.is_floating_point():
            raise ValueError(f"codes must be integers, got {codes.dtype}")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.n_codes:
            raise ValueError(f"code values must lie in [0, {self.n_codes}), got [{lo}, {hi}]")
        return codes

    @torch.inference_mode()
    def _decode_padded(self, codes: list[Tensor]) -> list[Tensor]:
        levels = codes[0].shape[1]
        longest = max(c.shape[0] for c in codes)
        x = torch.zeros(1, len(codes), levels, longest, dtype=torch.long, device=self.device)
        for i, c in enumerate(codes):
            x[0, i, :, : c.shape[0]] = c.t().to(self.device, torch.long)
        audio = self.model.decode(x, [None], return_dict=True).audio_values  # [B, 1, longest * hop]
        return [audio[i, 0, : c.shape[0] * self.hop_length].to("cpu", torch.float32).contiguous()
                for i, c in enumerate(codes)]

    def decode(self, codes: Tensor) -> Tensor:
        """codes [T, L<=n_levels] -> float32 [T * hop] (fewer levels = a lower-bandwidth decode)."""
        return self._decode_padded([self._check_codes(codes)])[0]

    def decode_batch(self, codes: list[Tensor]) -> list[Tensor]:
        """Many code sequences, batched per level count; same audio as `decode` on each."""
        codes = [self._check_codes(c) for c in codes]
        out: list[Tensor | None] = [None] * len(codes)
        by_levels: dict[int, list[int]] = {}
        for i, c in enumerate(codes):
            by_levels.setdefault(c.shape[1], []).append(i)
        for members in by_levels.values():
            lengths = [codes[i].shape[0] * self.hop_length for i in members]
            for group in self._batches(lengths):
                idx = [members[g] for g in group]
                for i, wav in zip(idx, self._decode_padded([codes[i] for i in idx])):
                    out[i] = wav
        return out  # type: ignore[return-value]

"""Vocos (EnCodec variant) as a decoder of EnCodec codes: codes -> summed codebook embeddings ->
ConvNeXt backbone with bandwidth-conditioned LayerNorms -> STFT magnitudes and phases -> inverse STFT.

This is this project's implementation of the model described by `charactr/vocos-encodec-24khz`
(MIT; the `vocos` package itself imports torchaudio, which is not used here). It reads that
checkpoint's `config.yaml` (with `yaml.safe_load`) and `pytorch_model.bin` (with
`torch.load(weights_only=True)`) from the hub (huggingface_hub's cache) or from a folder. VALL-E X
decodes with it at 6 kbps (8 levels, bandwidth id 2).

`VocosDecoding(codec)` wraps an EnCodec codec: encoding stays EnCodec's, decoding goes through Vocos,
so any EnCodec-based model can use it (`--vocoder vocos`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from vall_e.codecs.base import Codec
from vall_e.utils.errors import UserError
from vall_e.utils.hub import hub_file

DEFAULT_REPO = "charactr/vocos-encodec-24khz"
BANDWIDTHS = (1.5, 3.0, 6.0, 12.0)


class _AdaNorm(nn.Module):
    """LayerNorm (no affine) then a per-condition scale and shift."""

    def __init__(self, n_conditions: int, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.scale = nn.Embedding(n_conditions, dim)
        self.shift = nn.Embedding(n_conditions, dim)
        nn.init.ones_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        return F.layer_norm(x, (self.dim,), eps=self.eps) * self.scale(cond) + self.shift(cond)


class _ConvNeXt(nn.Module):
    """x + gamma * W2 GELU(W1 AdaNorm(depthwise_conv7(x))), channels-first in and out."""

    def __init__(self, dim: int, hidden: int, n_conditions: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = _AdaNorm(n_conditions, dim)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.pwconv2 = nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.norm(self.dwconv(x).transpose(1, 2), cond)
        h = self.pwconv2(F.gelu(self.pwconv1(h)))
        return x + (self.gamma * h).transpose(1, 2)


def inverse_stft_same(spec: Tensor, n_fft: int, hop: int, window: Tensor) -> Tensor:
    """Inverse STFT with "same" padding: irfft each frame, window, overlap-add, divide by the summed
    squared window, and cut (n_fft - hop) / 2 samples at each end. spec: complex [B, n_fft/2+1, T]."""
    B, _, T = spec.shape
    frames = torch.fft.irfft(spec, n_fft, dim=1) * window[None, :, None]  # [B, n_fft, T]
    length = (T - 1) * hop + n_fft
    out = F.fold(frames, output_size=(1, length), kernel_size=(1, n_fft), stride=(1, hop))[:, 0, 0]
    env = F.fold(window.square()[None, :, None].expand(1, n_fft, T), output_size=(1, length),
                 kernel_size=(1, n_fft), stride=(1, hop))[0, 0, 0]
    pad = (n_fft - hop) // 2
    out, env = out[:, pad:length - pad], env[pad:length - pad]
    return out / env.clamp_min(1e-11)


class VocosEncodecDecoder(nn.Module):
    """Vocos for EnCodec codes. Parameter names follow the published checkpoint's."""

    def __init__(self, n_codebooks: int = 16, n_codes: int = 1024, feature_dim: int = 128, dim: int = 384,
                 hidden: int = 1152, n_layers: int = 8, n_fft: int = 1280, hop: int = 320,
                 n_conditions: int = 4) -> None:
        super().__init__()
        self.n_codes, self.n_fft, self.hop = n_codes, n_fft, hop
        self.codebooks = nn.Parameter(torch.zeros(n_codebooks * n_codes, feature_dim))
        self.embed = nn.Conv1d(feature_dim, dim, kernel_size=7, padding=3)
        self.norm = _AdaNorm(n_conditions, dim)
        self.blocks = nn.ModuleList(_ConvNeXt(dim, hidden, n_conditions) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(dim, eps=1e-6)
        self.out = nn.Linear(dim, n_fft + 2)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def features(self, codes: Tensor) -> Tensor:
        """codes [B, T, L] -> summed embeddings of the first L codebooks, [B, feature_dim, T]."""
        L = codes.shape[-1]
        offsets = torch.arange(L, device=codes.device) * self.n_codes
        return F.embedding(codes.long() + offsets, self.codebooks).sum(-2).transpose(1, 2)

    def forward(self, codes: Tensor, bandwidth_id: int) -> Tensor:
        """codes [B, T, L] -> waveform [B, T * hop]."""
        cond = torch.full((codes.shape[0],), bandwidth_id, dtype=torch.long, device=codes.device)[:, None]
        x = self.embed(self.features(codes))
        x = self.norm(x.transpose(1, 2), cond).transpose(1, 2)
        for block in self.blocks:
            x = block(x, cond)
        x = self.out(self.final_norm(x.transpose(1, 2))).transpose(1, 2)  # [B, n_fft + 2, T]
        log_mag, phase = x.chunk(2, dim=1)
        mag = torch.exp(log_mag).clamp(max=1e2)
        spec = torch.complex(mag * torch.cos(phase), mag * torch.sin(phase))
        return inverse_stft_same(spec, self.n_fft, self.hop, self.window.to(mag.dtype))


# ------------------------------------------------------------------------------ checkpoint

KEY_MAP = {  # ours -> the published checkpoint's
    "codebooks": "feature_extractor.codebook_weights",
    "embed.weight": "backbone.embed.weight", "embed.bias": "backbone.embed.bias",
    "norm.scale.weight": "backbone.norm.scale.weight", "norm.shift.weight": "backbone.norm.shift.weight",
    "final_norm.weight": "backbone.final_layer_norm.weight", "final_norm.bias": "backbone.final_layer_norm.bias",
    "out.weight": "head.out.weight", "out.bias": "head.out.bias",
}
BLOCK_KEYS = ["dwconv.weight", "dwconv.bias", "norm.scale.weight", "norm.shift.weight", "pwconv1.weight",
              "pwconv1.bias", "pwconv2.weight", "pwconv2.bias", "gamma"]


def _key_map(n_layers: int) -> dict[str, str]:
    m = dict(KEY_MAP)
    for i in range(n_layers):
        for k in BLOCK_KEYS:
            m[f"blocks.{i}.{k}"] = f"backbone.convnext.{i}.{k}"
    return m


def _settings(config: dict[str, Any], source: str) -> dict[str, Any]:
    try:
        fe = config["feature_extractor"]["init_args"]
        bb = config["backbone"]["init_args"]
        hd = config["head"]["init_args"]
        if not config["feature_extractor"]["class_path"].endswith("EncodecFeatures"):
            raise UserError(f"{source}: not the EnCodec variant of Vocos (feature extractor "
                            f"{config['feature_extractor']['class_path']})")
        if hd.get("padding", "same") != "same":
            raise UserError(f"{source}: only 'same' ISTFT padding is supported")
        return {"feature_dim": int(bb["input_channels"]), "dim": int(bb["dim"]), "hidden": int(bb["intermediate_dim"]),
                "n_layers": int(bb["num_layers"]), "n_fft": int(hd["n_fft"]), "hop": int(hd["hop_length"]),
                "n_conditions": int(bb.get("adanorm_num_embeddings") or len(fe.get("bandwidths", BANDWIDTHS))),
                "bandwidths": [float(b) for b in fe.get("bandwidths", BANDWIDTHS)]}
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{source}: not a Vocos config ({type(e).__name__}: {e})") from None


def from_state_dict(sd: dict[str, Tensor], settings: dict[str, Any], source: str) -> VocosEncodecDecoder:
    n_codebooks = sd[KEY_MAP["codebooks"]].shape[0] // 1024 if KEY_MAP["codebooks"] in sd else 0
    if not n_codebooks:
        raise UserError(f"{source}: no {KEY_MAP['codebooks']!r} tensor (not a Vocos EnCodec checkpoint)")
    kwargs = {k: v for k, v in settings.items() if k != "bandwidths"}
    model = VocosEncodecDecoder(n_codebooks=n_codebooks, **kwargs)
    weights = {}
    for ours, theirs in _key_map(settings["n_layers"]).items():
        if theirs not in sd:
            raise UserError(f"{source}: weight {theirs!r} is missing")
        weights[ours] = sd[theirs].float()
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise UserError(f"{source}: weights do not fit ({str(e).splitlines()[-1].strip()})") from None
    model.bandwidths = settings["bandwidths"]
    return model.eval()


def load_vocos(source: str | Path = DEFAULT_REPO) -> VocosEncodecDecoder:
    """From a folder with config.yaml + pytorch_model.bin (or model.safetensors), or a hub repo id."""
    folder = Path(str(source)).expanduser()
    if folder.is_dir():
        config_path = folder / "config.yaml"
        weights_path = next((p for p in (folder / "pytorch_model.bin", folder / "model.safetensors") if p.is_file()), None)
        if not config_path.is_file() or weights_path is None:
            raise UserError(f"{folder}: a Vocos folder needs config.yaml and pytorch_model.bin (or model.safetensors)")
    elif str(source).count("/") == 1 and not str(source).startswith((".", "/", "~")):
        hint = "give --vocoder a folder with its config.yaml and pytorch_model.bin, or use --vocoder encodec"
        config_path = hub_file(str(source), "config.yaml", f"vocoder {source}", hint)
        weights_path = hub_file(str(source), "pytorch_model.bin", f"vocoder {source}", hint)
    else:
        raise UserError(f"vocoder {source}: no such folder")
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path}: not valid YAML ({e})") from None
    settings = _settings(config if isinstance(config, dict) else {}, str(config_path))
    if weights_path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(weights_path))
        except Exception as e:  # safetensors' own error types for damaged files
            raise UserError(f"{weights_path}: not a valid safetensors file ({str(e).splitlines()[0][:160]})") from None
    else:
        try:
            sd = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as e:  # restricted unpickler refusal or a damaged file
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"{weights_path}: refused or unreadable ({first})") from None
    return from_state_dict(sd, settings, str(weights_path))


class VocosDecoding(Codec):
    """An EnCodec codec whose `decode` runs Vocos (at the codec's bandwidth)."""

    def __init__(self, codec: Codec, source: str | Path = DEFAULT_REPO, device: str = "cpu",
                 model: VocosEncodecDecoder | None = None) -> None:
        if getattr(codec, "name", "") != "encodec":
            raise UserError(f"vocoder vocos decodes EnCodec codes; this model's codec is {codec.name!r}")
        self.inner = codec
        self.name = codec.name
        self.sample_rate, self.frame_rate = codec.sample_rate, codec.frame_rate
        self.n_levels, self.n_codes = codec.n_levels, codec.n_codes
        self.device = torch.device(device)
        self.vocos = (model or load_vocos(source)).to(self.device)
        bandwidth = float(getattr(codec, "bandwidth", 6.0))
        bandwidths = getattr(self.vocos, "bandwidths", list(BANDWIDTHS))
        if bandwidth not in bandwidths:
            raise UserError(f"Vocos has no setting for {bandwidth:g} kbps (it has {', '.join(map(str, bandwidths))})")
        self.bandwidth_id = bandwidths.index(bandwidth)
        if self.sample_rate != 24_000 or self.vocos.hop != round(self.sample_rate / self.frame_rate):
            raise UserError("Vocos (24 kHz, hop 320) does not fit this codec")

    def encode(self, wav: Tensor) -> Tensor:
        return self.inner.encode(wav)

    def encode_batch(self, wavs: list[Tensor]) -> list[Tensor]:
        return self.inner.encode_batch(wavs)

    @torch.inference_mode()
    def decode(self, codes: Tensor) -> Tensor:
        if codes.shape[0] == 0:
            return torch.zeros(0)
        return self.vocos(codes[None].to(self.device), self.bandwidth_id)[0].float().cpu()

    def spec(self) -> dict[str, Any]:
        return self.inner.spec()


def random_vocos_state_dict(seed: int, n_codebooks: int = 16, dim: int = 384, hidden: int = 1152,
                            n_layers: int = 8, n_fft: int = 1280, feature_dim: int = 128) -> dict[str, Tensor]:
    """Random weights in the published checkpoint's layout (tests): every scale and shift perturbed."""
    g = torch.Generator().manual_seed(seed)
    model = VocosEncodecDecoder(n_codebooks=n_codebooks, feature_dim=feature_dim, dim=dim, hidden=hidden,
                                n_layers=n_layers, n_fft=n_fft)
    out = {}
    for ours, theirs in sorted(_key_map(n_layers).items()):
        shape = model.state_dict()[ours].shape
        if "scale" in ours or ours.endswith("gamma") or ours == "final_norm.weight":
            t = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif ours.endswith("bias") or "shift" in ours:
            t = 0.1 * torch.randn(shape, generator=g)
        elif ours == "codebooks":
            t = torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) / fan_in ** 0.5
        out[theirs] = t
    out["head.istft.window"] = torch.hann_window(n_fft)
    return out

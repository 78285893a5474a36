"""The model's configuration, defined once: what a network can be, its defaults and its checks.

* `KINDS` is what one network does (both stages, or the reference's separate AR or NAR), and
  `PIPELINES` what the YAML's `model.kind` may name: one network, or the reference's pair.
* `BACKBONES` is the backbone registry (name -> the class that implements it), read by
  `vall_e.models.backbones.build_backbone` and by the checks here.
* `PRESETS` and `resolve_dims` turn `model.size` into dimensions.
* `ModelOptions` holds every setting of a network besides its kind and dimensions. Both configs below
  inherit these fields, so each is declared (default, type, help) exactly once:
  * `VALLEConfig` is one network, as `VALLE` is built from it and as checkpoints and exported model
    files store it (`to_dict` / `from_dict`);
  * `ModelConfig` is the YAML `model` section: a size preset instead of fixed dimensions, one or two
    networks, and the keys that only training reads (`frozen_params`, `name`). `networks()` turns it
    into one `VALLEConfig` per network, which runs every check of the model when the configuration
    is loaded, before any data or weights are touched.

This module imports no torch (`python -m vall_e.config` reads it), and nothing from `vall_e.models`:
the models package imports it.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields
from typing import Any

from vall_e.config.fields import StoredConfig, setting
from vall_e.utils.errors import UserError

# ----------------------------------------------------------------------------------- registries

KINDS = ("ar+nar", "ar", "nar")  # one network: both stages, or only the AR (level 0) or the NAR (levels 1..)
PIPELINES: dict[str, tuple[str, ...]] = {  # model.kind -> the networks it trains, named by their kind
    "ar+nar": ("ar+nar",),
    "ar,nar": ("ar", "nar"),  # the reference's pair
}
DEFAULT_KIND = "ar+nar"

# The backbone registry: name -> "module:Class", imported only when built (optional dependencies).
# Every class takes a `BackboneShape` and its own keyword options (vall_e/models/backbones/).
BACKBONES: dict[str, str] = {
    "transformer": "vall_e.models.backbones.transformer:TransformerBackbone",
    "llama": "vall_e.models.backbones.llama:LlamaBackbone",
    "mixtral": "vall_e.models.backbones.mixtral:MixtralBackbone",
    "retnet": "vall_e.models.backbones.retnet:RetNetBackbone",
    "bitnet": "vall_e.models.backbones.bitnet:BitNetBackbone",
}
TEXT_HEAD_BACKBONES = ("transformer", "bitnet")  # our own attention: text heads and the `ffn` choice
GQA_BACKBONES = ("transformer", "bitnet", "llama", "mixtral")  # attention with grouped key/value heads
FFN_KINDS = ("swiglu", "gelu")

# ----------------------------------------------------------------------------------- sizes

# name -> (d_model, n_heads, n_layers). The FFN is ffn_mult x d_model wide, so it is not part of a preset.
# Parameter counts (ar+nar, transformer, SwiGLU): quarter ~19M, half ~63M, full ~227M, double ~428M.
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (64, 4, 2),  # tests
    "quarter": (256, 4, 12),
    "half": (512, 8, 12),
    "full": (1024, 16, 12),  # the paper's size
    "double": (1024, 16, 24),
}
DEFAULT_SIZE = "full"
_SIZE_KEYS = {"dim": "d_model", "heads": "n_heads", "layers": "n_layers"}  # the reference's names for them


def _from_scale(f: float) -> tuple[int, int, int]:
    """The reference's float form: floor(1024 f) / floor(16 f) / 12 (it crashed on `math`:
    docs/reference-differences.md #10).

    d_model is rounded down to a multiple of 2 x heads so heads split it evenly with an even head size.
    """
    if not math.isfinite(f) or math.floor(16 * f) < 1:
        raise UserError(f"model.size {f}: a scale factor must be at least 1/16")
    heads = math.floor(16 * f)
    d_model = math.floor(1024 * f) // (2 * heads) * (2 * heads)
    return d_model, heads, 12


def resolve_dims(size: Any = DEFAULT_SIZE, d_model: int = 0, n_heads: int = 0, n_layers: int = 0) -> tuple[int, int, int]:
    """(d_model, n_heads, n_layers) for `size`; explicit non-zero `d_model`/`n_heads`/`n_layers` win.

    `size` is a preset name, a scale factor (a number, or a string such as "0.5"), or a dict with
    `d_model`/`dim`, `n_heads`/`heads`, `n_layers`/`layers`, the ones left out taken from the full
    preset (the reference ignored dicts: docs/reference-differences.md #10).
    """
    if isinstance(size, dict):
        given = {_SIZE_KEYS.get(k, k): v for k, v in size.items() if k != "tokens"}
        unknown = set(given) - {"d_model", "n_heads", "n_layers"}
        if unknown:
            raise UserError(f"model.size: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                            "(use d_model, n_heads, n_layers)")
        d, h, l = PRESETS[DEFAULT_SIZE]
        d, h, l = given.get("d_model", d), given.get("n_heads", h), given.get("n_layers", l)
    elif isinstance(size, str) and size in PRESETS:
        d, h, l = PRESETS[size]
    elif isinstance(size, (int, float)) and not isinstance(size, bool):
        d, h, l = _from_scale(float(size))
    elif isinstance(size, str):
        try:
            scale = float(size)
        except ValueError:
            raise UserError(f"model.size {size!r}: unknown preset; choose one of {', '.join(PRESETS)}, "
                            "a scale factor such as 0.5, or {d_model: ..., n_heads: ..., n_layers: ...}") from None
        d, h, l = _from_scale(scale)
    else:
        raise UserError(f"model.size {size!r}: expected a preset name, a number or a dict")

    d, h, l = d_model or d, n_heads or h, n_layers or l
    for key, value in (("d_model", d), ("n_heads", h), ("n_layers", l)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"model.{key} {value!r}: must be a positive integer")
    if d % h or (d // h) % 2:
        raise UserError(f"model.d_model {d} must split into {h} heads of even size")
    return d, h, l


# ----------------------------------------------------------------------------------- the configs

@dataclass
class ModelOptions:
    """Every setting of a network besides its kind and dimensions, shared field for field by
    `VALLEConfig` (one network) and `ModelConfig` (the YAML `model` section)."""

    backbone: str = setting("transformer", " | ".join(BACKBONES))
    ffn: str = setting("swiglu", "transformer/bitnet feed-forward: swiglu (gated, LLaMA-style) | gelu; "
                                 "llama and mixtral are always gated")
    ffn_mult: int = setting(4, "feed-forward width as a multiple of d_model")
    experts: int = setting(1, "mixture-of-experts count (mixtral, retnet)")
    n_levels: int = setting(8, "codec levels (RVQ codebooks)")
    n_codes: int = setting(1024, "codes per level; the AR's STOP id equals this")
    n_text_tokens: int = setting(256, "text vocabulary size (must exceed the symbol map's largest id; id 0 is padding)")
    n_langs: int = setting(8, "language embedding entries (at least the data's language count)")
    dropout: float = setting(0.1, "dropout while training (both residual branches and inside the FFN)")
    attention_dropout: float = setting(0.0, "dropout on the attention probabilities while training (transformer, "
                                            "bitnet, llama, mixtral); on the CPU any value > 0 moves attention off "
                                            "its fused kernel: ~3x the step time and memory (benchmarks/README.md)")
    p_ar: float = setting(0.0, "share of samples trained as AR (level 0) in an ar+nar network; 0 = 1/n_levels, "
                               "uniform over the levels as in the reference")
    text_loss_weight: float = setting(0.0, "weight of the next-phoneme loss on the text of AR samples "
                                           "(the reference uses 1)")
    max_positions: int = setting(8192, "longest sequence (text + prompt + response)")
    kv_heads: int = setting(0, "key/value heads per layer (grouped-query attention: a smaller KV cache, for "
                               "batched decoding); must divide n_heads; 0 = n_heads (plain multi-head attention)")
    text_heads: int = setting(0, "heads per layer through which prompt and response tokens read only the text "
                                 "(transformer, bitnet)")
    guided_attention: float = setting(0.0, "weight of a guided-attention loss (Tachibana et al. 2017) pulling the "
                                           "text heads to the diagonal of text against audio; 0 = off")
    guided_attention_sigma: float = setting(0.2, "width of the guided-attention diagonal, as a fraction of the text")
    text_head_rate: float = setting(0.0, "text heads' aligned positions: audio frames per text token (e.g. the "
                                         "corpus mean); 0 = the shared positions")
    ar_group: int = setting(1, "VALL-E 2 grouped code modeling: level-0 codes the AR reads and predicts per step")
    medusa_heads: int = setting(0, "Medusa-style heads (0-4) on the AR's last hidden state proposing the steps "
                                   "t+2..t+1+K, verified in one forward pass (exact decoding, faster); 0 = off")
    medusa_loss_weight: float = setting(1.0, "weight of the Medusa heads' loss (head k's cross-entropy counts "
                                             "0.8**(k-1) of it)")
    medusa_distill: bool = setting(False, "self-distillation (Medusa-2) for the Medusa heads: head k learns the AR "
                                          "head's own (detached) distribution at the step it proposes, by KL "
                                          "divergence, instead of the true code; medusa{k}.acc is then agreement "
                                          "with the AR head's argmax")
    backbone_extra: dict[str, Any] = setting({}, "more keyword options for the backbone (e.g. rope_base)")


@dataclass
class VALLEConfig(StoredConfig, ModelOptions):
    """Everything needed to build one `VALLE` network; JSON-able (stored in checkpoints and in exported
    model files, whose older versions `from_dict` still reads)."""

    kind: str = setting(DEFAULT_KIND, " | ".join(KINDS))
    d_model: int = setting(PRESETS[DEFAULT_SIZE][0], "model width")
    n_heads: int = setting(PRESETS[DEFAULT_SIZE][1], "attention heads")
    n_layers: int = setting(PRESETS[DEFAULT_SIZE][2], "layers")

    def __post_init__(self) -> None:
        if self.p_ar is None:  # files exported before 2026-12 stored "1 / n_levels" as null
            self.p_ar = 0.0
        if self.kind not in KINDS:
            raise UserError(f"model.kind {self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.backbone not in BACKBONES:
            raise UserError(f"model.backbone {self.backbone!r}: choose one of {', '.join(BACKBONES)}")
        for key in ("d_model", "n_heads", "n_layers", "n_text_tokens", "ffn_mult", "experts", "n_codes",
                    "n_langs", "max_positions", "n_levels"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"model.{key} {value!r}: must be a positive integer")
        if self.n_codes < 2:
            raise UserError(f"model.n_codes {self.n_codes}: a codebook needs at least 2 codes")
        if self.kind != "ar" and self.n_levels < 2:
            raise UserError(f"model.n_levels {self.n_levels}: a {self.kind} model needs at least 2 levels")
        if self.ffn not in FFN_KINDS:
            raise UserError(f"model.ffn {self.ffn!r}: choose one of {', '.join(FFN_KINDS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout {self.dropout}: must be in [0, 1)")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise UserError(f"model.attention_dropout {self.attention_dropout}: must be in [0, 1)")
        if not 0.0 <= self.p_ar <= 1.0:
            raise UserError(f"model.p_ar {self.p_ar}: must be in [0, 1] (0 = 1/n_levels)")
        if self.text_loss_weight < 0:
            raise UserError(f"model.text_loss_weight {self.text_loss_weight}: must be >= 0")
        if not isinstance(self.text_heads, int) or not 0 <= self.text_heads < self.n_heads:
            raise UserError(f"model.text_heads {self.text_heads!r}: must be in 0..{self.n_heads - 1}")
        kv = self.kv_heads
        if not isinstance(kv, int) or isinstance(kv, bool) or kv < 0 or (kv and self.n_heads % kv):
            raise UserError(f"model.kv_heads {kv!r}: must divide n_heads {self.n_heads} (0 = n_heads)")
        if kv and kv != self.n_heads and self.backbone not in GQA_BACKBONES:
            raise UserError(f"model.kv_heads: the {self.backbone} backbone has no grouped key/value heads "
                            f"({', '.join(GQA_BACKBONES)} have)")
        if kv and self.text_heads % (self.n_heads // kv):
            raise UserError(f"model.text_heads {self.text_heads}: with kv_heads {kv} it must be a multiple of "
                            f"n_heads / kv_heads = {self.n_heads // kv}")
        if self.text_heads and self.backbone not in TEXT_HEAD_BACKBONES:
            raise UserError(f"model.text_heads: the {self.backbone} backbone has no text heads "
                            f"({' and '.join(TEXT_HEAD_BACKBONES)} have)")
        if self.guided_attention < 0 or (self.guided_attention > 0 and not self.text_heads):
            raise UserError(f"model.guided_attention {self.guided_attention}: must be >= 0, and needs "
                            "model.text_heads >= 1")
        if not self.guided_attention_sigma > 0:
            raise UserError(f"model.guided_attention_sigma {self.guided_attention_sigma}: must be > 0")
        if not self.text_head_rate >= 0 or (self.text_head_rate > 0 and not self.text_heads):
            raise UserError(f"model.text_head_rate {self.text_head_rate}: must be >= 0, and needs "
                            "model.text_heads >= 1")
        if not isinstance(self.ar_group, int) or isinstance(self.ar_group, bool) or not 1 <= self.ar_group <= 8:
            raise UserError(f"model.ar_group {self.ar_group!r}: must be an integer in 1..8")
        if not isinstance(self.medusa_heads, int) or isinstance(self.medusa_heads, bool) or not 0 <= self.medusa_heads <= 4:
            raise UserError(f"model.medusa_heads {self.medusa_heads!r}: must be an integer in 0..4")
        if self.medusa_heads and not self.has_ar:
            raise UserError(f"model.medusa_heads: a {self.kind} network has no AR to put the heads on")
        if not self.medusa_loss_weight >= 0:
            raise UserError(f"model.medusa_loss_weight {self.medusa_loss_weight}: must be >= 0")
        if not isinstance(self.medusa_distill, bool):
            raise UserError(f"model.medusa_distill {self.medusa_distill!r}: must be true or false")
        if not isinstance(self.backbone_extra, dict):
            raise UserError(f"model.backbone_extra {self.backbone_extra!r}: must be a mapping")

    @property
    def has_ar(self) -> bool:
        return self.kind in ("ar+nar", "ar")

    @property
    def has_nar(self) -> bool:
        return self.kind in ("ar+nar", "nar")

    @property
    def stop_id(self) -> int:
        return self.n_codes



@dataclass
class _KindAndSize:
    """The keys of the YAML `model` section that a network's config states otherwise (a base class of
    `ModelConfig` only so that they come first in `help=true`)."""

    kind: str = setting(DEFAULT_KIND, f"{' | '.join(PIPELINES)}: one network for both stages, or the "
                                      "reference's separate AR and NAR networks")
    size: str | dict[str, int] = setting(DEFAULT_SIZE, f"preset {' | '.join(PRESETS)}; a scale factor f "
                                         "(floor(1024 f) wide, floor(16 f) heads, 12 layers); or a dict "
                                         "{d_model, n_heads, n_layers} (left-out ones from full)")
    d_model: int = setting(0, "model width; 0 = from size")
    n_heads: int = setting(0, "attention heads; 0 = from size")
    n_layers: int = setting(0, "layers; 0 = from size")


@dataclass
class ModelConfig(ModelOptions, _KindAndSize):
    """The YAML `model` section: the network(s) to train. Besides the shared `ModelOptions` it has the
    pipeline kind, a size preset (dimensions left at 0 come from it) and the keys only training reads."""

    frozen_params: list[str] = setting([], "parameter-name prefixes excluded from training (a prefix may start "
                                           "with the network's name, e.g. nar.backbone)")
    name: str = setting("", "run/checkpoint name; empty = derived from kind, size and backbone")

    def dims(self) -> tuple[int, int, int]:
        """(d_model, n_heads, n_layers): the size preset with the explicit non-zero ones applied."""
        return resolve_dims(self.size, self.d_model, self.n_heads, self.n_layers)

    def networks(self, n_text_tokens: int | None = None, n_langs: int | None = None) -> dict[str, VALLEConfig]:
        """One `VALLEConfig` per network, named by its kind ("ar+nar", or "ar" and "nar"): these names
        are the keys of checkpoints and exported files. `n_text_tokens` / `n_langs` are what the data
        needs (the symbol map's size, the language count); the config must be at least that large."""
        if self.kind not in PIPELINES:
            raise UserError(f"model.kind {self.kind!r}: choose one of {', '.join(PIPELINES)}")
        if n_text_tokens is not None and n_text_tokens > self.n_text_tokens:
            raise UserError(f"model.n_text_tokens={self.n_text_tokens} is too small for the symbol map "
                            f"({n_text_tokens} symbols); set it to at least {n_text_tokens}")
        if n_langs is not None and n_langs > self.n_langs:
            raise UserError(f"model.n_langs={self.n_langs} is too small for the data's {n_langs} languages")
        d, h, l = self.dims()
        shared = {f.name: getattr(self, f.name) for f in fields(ModelOptions)}
        return {kind: VALLEConfig(kind=kind, d_model=d, n_heads=h, n_layers=l,
                                  **{**copy.deepcopy(shared), **({"medusa_heads": 0} if kind == "nar" else {})})
                for kind in PIPELINES[self.kind]}

    @property
    def full_name(self) -> str:
        """The run's name: ckpt/{full_name}/, logs/{full_name}/."""
        if self.name:
            return self.name
        parts = [self.kind.replace(",", "-")]
        if isinstance(self.size, dict):
            d, h, l = resolve_dims(self.size)
            parts.append(f"d{d}h{h}l{l}")
        elif str(self.size) != DEFAULT_SIZE:
            parts.append(str(self.size))
        if self.backbone != "transformer":
            parts.append(f"{self.experts}x{self.backbone}" if self.experts > 1 else self.backbone)
        return "-".join(parts)

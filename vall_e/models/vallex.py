"""The model family of the published VALL-E checkpoints (VALL-E X, Amphion's VALL-E), in this engine.

These checkpoints come from lifeiteng's module tree: two separate transformers, an AR one and a NAR
one, each with its own text and audio tables. Their forward pass differs from `vall_e.models.VALLE`
in the points below, which this module reproduces (it is written from the format's facts; the
tests compare it logit for logit with the original code at random weights):

* inputs: text ids (+ a per-token language embedding for VALL-E X), then the audio segment. Each
  segment gets sinusoidal positions (sin on even, cos on odd features, base 10000) scaled by its
  own scalar alpha, and the positions restart at 0 where the audio starts;
* AR: audio = [BOS (VALL-E X)] + prompt level-0 codes + generated codes; the mask is a prefix-LM
  mask: text sees all the text and no audio, audio sees all the text and the audio up to itself;
* NAR (target level k): audio = prompt frames (the sum of all levels, or the levels below k) +
  target frames (the sum of the levels below k), full attention, and every LayerNorm is adaptive:
  scale and shift come from a projection of a learned per-stage vector (a * LN(x) + c);
* blocks: pre-norm, attention with a packed q/k/v projection with bias, ReLU FFN (4d) with biases,
  LayerNorm eps 1e-5, a final norm; AR head 1025 outputs without bias (1024 = STOP), NAR heads of
  levels 1..6 tied to the embedding tables of levels 2..7 (`tied_heads`).

The decoding contract is `VALLE`'s (`ar_prefill`, `ar_step` with a preallocated KV cache, batched
`nar_pass`), so `vall_e.generation.tts.TTS` runs these models with every sampler, batching and streaming.

Text ids: with languages (`n_langs` > 0) an id carries its token's language, id = lang * n_text_tokens
+ token, because VALL-E X adds a language embedding per token (a prompt transcript in one language
followed by text in another is normal there). The `lang` arguments are therefore not used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vall_e.config.fields import StoredConfig
from vall_e.utils.errors import UserError

from .backbones.kv_cache import KVCache
from .rows_linear import decode_linear
from .valle import ARState

FAMILY = "vallex"


@dataclass
class VallexConfig(StoredConfig):
    """Everything needed to build a `VallexModel`; JSON-able (stored in the converted file's metadata)."""

    family: str = FAMILY
    kind: str = "ar+nar"  # always both stages in one file
    d_model: int = 1024
    n_heads: int = 16
    n_layers: int = 12
    n_text_tokens: int = 2048
    n_langs: int = 3  # 0 = no language embedding (Amphion)
    n_levels: int = 8
    n_codes: int = 1024
    prepend_bos: bool = True  # AR audio starts with BOS = n_codes + 1
    nar_prompt_all_levels: bool = True  # prompt frames sum all levels (their prefix_mode 1) or levels < k (0)
    tied_heads: bool = True  # NAR head of level k (1..n_levels-2) is the embedding table of level k+1
    ffn_mult: int = 4
    norm_eps: float = 1e-5
    max_positions: int = 8192  # text + prompt + response tokens the engine allows per sequence
    backbone: str = "vallex"  # for messages (TTS names the backbone when an option does not apply)

    def __post_init__(self) -> None:
        if self.family != FAMILY:
            raise UserError(f"model family {self.family!r} is not {FAMILY!r}")
        if self.kind != "ar+nar":
            raise UserError(f"a {FAMILY} model is always ar+nar, not {self.kind!r}")
        for key in ("d_model", "n_heads", "n_layers", "n_text_tokens", "n_codes", "ffn_mult", "max_positions"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"model.{key} {value!r}: must be a positive integer")
        if not isinstance(self.n_langs, int) or self.n_langs < 0:
            raise UserError(f"model.n_langs {self.n_langs!r}: must be an integer >= 0")
        if not isinstance(self.n_levels, int) or self.n_levels < 2:
            raise UserError(f"model.n_levels {self.n_levels!r}: must be an integer >= 2")
        if self.d_model % self.n_heads or self.d_model % 2:
            raise UserError(f"model.d_model {self.d_model} must be even and divisible by n_heads {self.n_heads}")

    @property
    def has_ar(self) -> bool:
        return True

    @property
    def has_nar(self) -> bool:
        return True

    @property
    def ar_group(self) -> int:
        """Level-0 codes per AR step (VALL-E 2's `model.ar_group`): these checkpoints predict one."""
        return 1

    @property
    def stop_id(self) -> int:
        return self.n_codes

    @property
    def bos_id(self) -> int:
        return self.n_codes + 1

    @property
    def n_text_ids(self) -> int:
        """Size of the id space of `text` arguments (language folded into the id)."""
        return self.n_text_tokens * max(1, self.n_langs)



def sinusoids(positions: Tensor, d_model: int) -> Tensor:
    """Float32 [..., d_model]: sin(p * w_i) on even features, cos(p * w_i) on odd ones,
    w_i = 10000^(-2i/d). positions: any shape of integer positions."""
    inv = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32, device=positions.device)
                    * -(math.log(10000.0) / d_model))
    angles = positions.to(torch.float32)[..., None] * inv
    out = torch.empty(*positions.shape, d_model, dtype=torch.float32, device=positions.device)
    out[..., 0::2] = torch.sin(angles)
    out[..., 1::2] = torch.cos(angles)
    return out


class _Segment(nn.Module):
    """Scaled sinusoidal positions of one segment (text or audio): x + alpha * PE(position).
    The table is computed once per length and device (float32, like the original) and cast."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.alpha = nn.Parameter(torch.ones(1))
        self._table: Tensor | None = None

    def table(self, length: int, device: torch.device) -> Tensor:
        t = self._table
        if t is None or t.shape[0] < length or t.device != device:
            n = max(length, 1024 if t is None else 2 * t.shape[0])
            t = sinusoids(torch.arange(n, device=device), self.d_model)
            self._table = t
        return t

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """x [..., S, d] + alpha * PE at the Long positions [..., S]."""
        pe = self.table(int(positions.max()) + 1 if positions.numel() else 1, x.device)[positions]
        return x + self.alpha * pe.to(x.dtype)


class _Block(nn.Module):
    """Pre-norm transformer block: x + Attn(N1(x)); x + FFN(N2(x)). With `adaptive`, each norm is
    a * LayerNorm(x) + c with (a, c) projected from a stage vector given per call."""

    def __init__(self, d: int, n_heads: int, ffn_mult: int, eps: float, adaptive: bool) -> None:
        super().__init__()
        self.n_heads, self.d = n_heads, d
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.up = nn.Linear(d, ffn_mult * d)
        self.down = nn.Linear(ffn_mult * d, d)
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.adaptive = adaptive
        if adaptive:
            self.norm1_proj = nn.Linear(d, 2 * d)
            self.norm2_proj = nn.Linear(d, 2 * d)

    def _norm(self, i: int, x: Tensor, stage: Tensor | None) -> Tensor:
        y = (self.norm1 if i == 1 else self.norm2)(x)
        if not self.adaptive:
            return y
        a, c = (self.norm1_proj if i == 1 else self.norm2_proj)(stage[None])[0].split(self.d, dim=-1)
        return a * y + c

    def forward(self, x: Tensor, allowed: Tensor | None, stage: Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0, step: bool = False) -> Tensor:
        """x [B, S, d]; allowed Bool[B, 1, S, K] (None = every key); with `cache`, keys/values are
        written at the cache's current length and attention runs over all cached keys."""
        B, S, d = x.shape
        H = self.n_heads
        lin = (lambda m, t: decode_linear(m, t.reshape(B, -1)).reshape(B, 1, -1)) if step else (lambda m, t: m(t))
        h = self._norm(1, x, stage)
        q, k, v = lin(self.qkv, h).view(B, S, 3, H, d // H).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + lin(self.out, a.transpose(1, 2).reshape(B, S, d))
        h = self._norm(2, x, stage)
        return x + lin(self.down, F.relu(lin(self.up, h)))


@dataclass
class VallexARState(ARState):
    """`ARState` plus each row's next audio position (positions restart where the audio starts).

    Beam search reorders `cache`, `valid`, `text` and `text_pos` but not `audio_pos`; it need not:
    a beam only ever continues a row of its own item, and all of an item's rows share one prompt and
    step together, so they hold the same `audio_pos`."""

    audio_pos: Tensor | None = None  # Long[B]


class VallexModel(nn.Module):
    """Both stages of a VALL-E X / Amphion VALL-E checkpoint (see the module docstring)."""

    def __init__(self, config: VallexConfig) -> None:
        super().__init__()
        self.config = c = config
        d, L = c.d_model, c.n_levels
        self.backbone = None  # no shared backbone object: TTS's compile option reports it unsupported
        # AR
        self.ar_text = nn.Embedding(c.n_text_tokens, d)
        self.ar_lang = nn.Embedding(c.n_langs, d) if c.n_langs else None
        self.ar_audio = nn.Embedding(c.n_codes + 1 + int(c.prepend_bos), d)  # n_codes = STOP, +1 = BOS
        self.ar_text_pos = _Segment(d)
        self.ar_audio_pos = _Segment(d)
        self.ar_layers = nn.ModuleList(_Block(d, c.n_heads, c.ffn_mult, c.norm_eps, False) for _ in range(c.n_layers))
        self.ar_norm = nn.LayerNorm(d, eps=c.norm_eps)
        self.ar_head = nn.Linear(d, c.n_codes + 1, bias=False)
        # NAR
        self.nar_text = nn.Embedding(c.n_text_tokens, d)
        self.nar_lang = nn.Embedding(c.n_langs, d) if c.n_langs else None
        self.nar_audio = nn.ModuleList([nn.Embedding(c.n_codes + 1, d)]
                                       + [nn.Embedding(c.n_codes, d) for _ in range(L - 1)])
        self.nar_text_pos = _Segment(d)
        self.nar_audio_pos = _Segment(d)
        self.nar_stages = nn.Parameter(torch.randn(L - 1, d))  # row k-1 conditions target level k
        self.nar_layers = nn.ModuleList(_Block(d, c.n_heads, c.ffn_mult, c.norm_eps, True) for _ in range(c.n_layers))
        self.nar_norm = nn.LayerNorm(d, eps=c.norm_eps)
        self.nar_norm_proj = nn.Linear(d, 2 * d)
        own_heads = [L - 1] if c.tied_heads else list(range(1, L))
        self.nar_heads = nn.ModuleDict({str(k): nn.Linear(d, c.n_codes, bias=False) for k in own_heads})

    @property
    def device(self) -> torch.device:
        return self.ar_norm.weight.device  # (a norm: linears may be replaced by quantized ones)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ inputs

    def _text(self, ids: Tensor, stage: str) -> Tensor:
        """Text ids (language folded in) -> [N, d] with the stage's positions."""
        c = self.config
        ids = ids.to(self.device).long().reshape(-1)
        if ids.numel() == 0:
            raise ValueError("empty text")
        if int(ids.min()) < 0 or int(ids.max()) >= c.n_text_ids:
            raise ValueError(f"text id out of range 0..{c.n_text_ids - 1}")
        table, lang, pos = ((self.ar_text, self.ar_lang, self.ar_text_pos) if stage == "ar"
                            else (self.nar_text, self.nar_lang, self.nar_text_pos))
        x = table(ids % c.n_text_tokens)
        if lang is not None:
            x = x + lang(ids // c.n_text_tokens)
        return pos(x, torch.arange(len(ids), device=self.device))

    def _check_codes(self, codes: Tensor, what: str) -> Tensor:
        codes = codes.to(self.device).long()
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.n_codes):
            raise ValueError(f"{what}: codes must be in 0..{self.config.n_codes - 1}")
        return codes

    def _ar_audio_ids(self, prompt: Tensor) -> Tensor:
        """[BOS] + prompt level-0 codes (Long[A])."""
        codes = self._check_codes(prompt if prompt.dim() == 1 else prompt[:, 0], "prompt")
        if self.config.prepend_bos:
            codes = torch.cat([codes.new_full((1,), self.config.bos_id), codes])
        return codes

    def _nar_audio(self, prompt: Tensor, resp: Tensor, level: int) -> Tensor:
        """Prompt frames [Tp, L] and response frames [T, >= level] -> [Tp + T, d] with positions.
        Levels are added in order (0, 1, 2, ...), as the original accumulates them."""
        c = self.config
        prompt = self._check_codes(prompt, "prompt")
        resp = self._check_codes(resp, "response")
        p_levels = c.n_levels if c.nar_prompt_all_levels else level
        if prompt.shape[1] < p_levels:
            raise ValueError(f"the prompt has {prompt.shape[1]} levels, {p_levels} are needed")
        x_p = self.nar_audio[0](prompt[:, 0])
        for j in range(1, p_levels):
            x_p = x_p + self.nar_audio[j](prompt[:, j])
        x_r = self.nar_audio[0](resp[:, 0])
        for j in range(1, level):
            x_r = x_r + self.nar_audio[j](resp[:, j])
        x = torch.cat([x_p, x_r])
        return self.nar_audio_pos(x, torch.arange(x.shape[0], device=self.device))

    # ------------------------------------------------------------------ AR

    @staticmethod
    def _left_pad(seqs: list[Tensor]) -> tuple[Tensor, Tensor]:
        S = max(s.shape[0] for s in seqs)
        x = seqs[0].new_zeros(len(seqs), S, seqs[0].shape[-1])
        valid = torch.zeros(len(seqs), S, dtype=torch.bool, device=x.device)
        for i, s in enumerate(seqs):
            x[i, S - len(s):] = s
            valid[i, S - len(s):] = True
        return x, valid

    def ar_prefill(self, text: list[Tensor], lang: Tensor | None, prompt: list[Tensor],
                   max_length: int) -> tuple[Tensor, VallexARState]:
        """Run text + [BOS] + prompt level-0 codes of each sample (left-padded to a common end).
        Returns logits [B, n_codes + 1] for the first response frame and the decoding state."""
        B = len(text)
        seqs, text_len, audio_len = [], [], []
        for i in range(B):
            xt = self._text(text[i], "ar")
            ids = self._ar_audio_ids(prompt[i])
            xa = self.ar_audio_pos(self.ar_audio(ids), torch.arange(len(ids), device=self.device))
            seqs.append(torch.cat([xt, xa]))
            text_len.append(len(xt))
            audio_len.append(len(ids))
        x, valid = self._left_pad(seqs)
        B, P, _ = x.shape
        text_tok = torch.zeros(B, P, dtype=torch.bool, device=self.device)  # which slots hold text
        for i, (seq, n) in enumerate(zip(seqs, text_len)):
            text_tok[i, P - len(seq):P - len(seq) + n] = True
        idx = torch.arange(P, device=self.device)
        causal = idx[None, :] <= idx[:, None]  # [q, k]
        # text queries see the text; audio queries see the text and earlier audio; padding sees itself
        allowed = text_tok[:, None, :] | (~text_tok[:, :, None] & causal[None])
        allowed = (allowed & valid[:, None, :]) | torch.eye(P, dtype=torch.bool, device=self.device)[None]
        cache = KVCache(self.config.n_layers, B, self.config.n_heads, P + max_length,
                        self.config.d_model // self.config.n_heads, device=self.device, dtype=x.dtype)
        h = x
        for j, layer in enumerate(self.ar_layers):
            h = layer(h, allowed[:, None], cache=cache, layer=j)
        cache.advance(P)
        logits = self.ar_head(self.ar_norm(h[:, -1]))
        valid_buf = torch.zeros(B, P + max_length, dtype=torch.bool, device=self.device)
        valid_buf[:, :P] = valid
        state = VallexARState(cache, valid_buf, P, torch.ones(B, dtype=torch.bool, device=self.device),
                              audio_pos=torch.tensor(audio_len, device=self.device))
        return logits, state

    def ar_step(self, tokens: Tensor, state: VallexARState) -> tuple[Tensor, VallexARState]:
        """Feed one level-0 code (or STOP) per row; logits [B, n_codes + 1] for the next frame."""
        if state.length >= state.valid.shape[1]:
            raise RuntimeError(f"AR decoding ran past its capacity of {state.valid.shape[1]} positions")
        tokens = tokens.to(self.device).long()
        x = self.ar_audio_pos(self.ar_audio(tokens)[:, None], state.audio_pos[:, None])
        state.valid[:, state.length] = True
        K = state.length + 1
        allowed = state.valid[:, None, None, :K]
        h = x
        for j, layer in enumerate(self.ar_layers):
            h = layer(h, allowed, cache=state.cache, layer=j, step=True)
        state.cache.advance(1)
        state.length += 1
        state.audio_pos = state.audio_pos + 1
        return decode_linear(self.ar_head, self.ar_norm(h[:, -1])), state

    def ar_full(self, text: list[Tensor], lang: Tensor | None, prompt: list[Tensor],
                resps: list[Tensor]) -> list[Tensor]:
        """Teacher-forced AR logits without a cache: [T_i + 1, n_codes + 1] per sample, row t
        predicting response frame t (the prompt is the prefix, the response follows it)."""
        audio, rows = [], []
        for i in range(len(text)):
            r = resps[i] if resps[i].dim() == 1 else resps[i][:, 0]
            audio.append(torch.cat([prompt[i][:, 0].to(self.device).long(), r.to(self.device).long()]))
            rows.append(len(r) + 1)
        return [self._ar_rows([t], [a], n)[0] for t, a, n in zip(text, audio, rows)]

    def _ar_rows(self, text: list[Tensor], audio: list[Tensor], n_last: int) -> list[Tensor]:
        """The last `n_last` rows of AR logits of text + [BOS] + audio, one sample at a time."""
        out = []
        for t, a in zip(text, audio):
            xt = self._text(t, "ar")
            ids = self._ar_audio_ids(a)
            xa = self.ar_audio_pos(self.ar_audio(ids), torch.arange(len(ids), device=self.device))
            x = torch.cat([xt, xa])[None]
            N, S = len(xt), x.shape[1]
            idx = torch.arange(S, device=self.device)
            is_text = idx < N
            allowed = is_text[None, :] | (~is_text[:, None] & (idx[None, :] <= idx[:, None]))
            h = x
            for layer in self.ar_layers:
                h = layer(h, allowed[None, None])
            out.append(self.ar_head(self.ar_norm(h[0, S - n_last:])))
        return out

    # ------------------------------------------------------------------ NAR

    def nar_head(self, level: int, h: Tensor) -> Tensor:
        """Logits of level `level`'s codes: through the embedding table of level + 1 when tied."""
        if self.config.tied_heads and level < self.config.n_levels - 1:
            return F.linear(h, self.nar_audio[level + 1].weight)
        return self.nar_heads[str(level)](h)

    def nar_pass(self, text: list[Tensor], lang: Tensor | None, prompt: list[Tensor], resps: list[Tensor],
                 level: int) -> list[Tensor]:
        """Logits [T_i, n_codes] of code level `level` (1..n_levels-1) from levels 0..level-1 of
        resps [T_i, >= level], batched (right padding, every valid key visible)."""
        c = self.config
        if not 1 <= level < c.n_levels:
            raise ValueError(f"NAR level must be in 1..{c.n_levels - 1}, not {level}")
        seqs, starts = [], []
        for i in range(len(text)):
            if resps[i].shape[1] < level:
                raise ValueError(f"sample {i}: {resps[i].shape[1]} levels given, level {level} needs {level}")
            xt = self._text(text[i], "nar")
            xa = self._nar_audio(prompt[i], resps[i], level)
            seqs.append(torch.cat([xt, xa]))
            starts.append(len(xt) + prompt[i].shape[0])
        S = max(s.shape[0] for s in seqs)
        x = seqs[0].new_zeros(len(seqs), S, c.d_model)
        valid = torch.zeros(len(seqs), S, dtype=torch.bool, device=self.device)
        for i, s in enumerate(seqs):
            x[i, :len(s)] = s
            valid[i, :len(s)] = True
        allowed = None if bool(valid.all()) else valid[:, None, None, :]
        stage = self.nar_stages[level - 1]
        h = x
        for layer in self.nar_layers:
            h = layer(h, allowed, stage=stage)
        a, b = self.nar_norm_proj(stage[None])[0].split(c.d_model, dim=-1)
        h = a * self.nar_norm(h) + b
        return [self.nar_head(level, h[i, s:len(seq)]) for i, (s, seq) in enumerate(zip(starts, seqs))]

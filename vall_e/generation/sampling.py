"""Logits processing and token sampling for VALL-E decoding: batched, on the logits' own device.

Every processor is a pure function of `logits [B, V]` (or `[B, T, V]` for a NAR pass, where the
same per-sequence settings apply to all T frames) and, where it needs one, a per-sequence token
history `[B, t]` in which `pad_id` (default -1) marks empty slots anywhere in a row. Nothing loops
over the batch in Python, so one call serves a whole batch of texts.

Fixes against the reference (numbers of docs/reference-differences.md):

* #5: the repetition penalty divides positive logits and multiplies negative ones, so a penalised
  token always loses probability; its decay makes the penalty *fade* with distance.
* #6: mirostat keeps one μ per sequence, initialised to 2·tau.
* #7: `BeamSearch` is a real beam search (hypotheses reordered, length-normalised scores).
* #8: `ban_tokens` lets a NAR pass exclude STOP.

`TokenSampler.sample` applies, in this order (the reference's order, plus the new steps):

1. repetition penalty (history), 2. length penalty on STOP (AR), 3. banned ids -> -inf
   (steps 1-3 are `TokenSampler.penalize`; the AR applies 1-2 with its STOP floor, caps and repeat
   guard through `vall_e.generation.constraints.DecodingConstraints`, for beam search too);
4. temperature 0 -> greedy argmax of the penalised logits, and stop here;
5. top-k, 6. top-p, 7. min-p (filters), 8. temperature, static or dynamic (per row, from the
   filtered distribution);
9. draw: mirostat (AR) truncates and draws; otherwise a categorical draw from the filtered
   distribution, and with repetition-aware sampling (AR) a second draw from the unfiltered,
   tempered distribution replaces it where the first token is repeated too often recently.

Randomness. Each draw inverts the row's CDF with one uniform from a counter-based hash (SplitMix64)
keyed by (seed, sequence id, step, draw, frame). So a sequence's tokens depend only on its own
logits, its id and the step, never on which other sequences share the batch or how the batch is
padded: a text sampled alone (`sequence_ids=[i]`) gives the same tokens as in a batch at position
i. A plain `torch.Generator` cannot give that (the batch size shifts its stream). Passing
`generator=` uses that generator's `torch.rand` instead (reproducible, but batch-dependent).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import Tensor

from vall_e.utils.errors import UserError

PAD_ID = -1
"""Default padding value of history tensors."""

DYNAMIC_TEMPERATURE_MODES = ("pmax", "entropy")
MIN_TEMPERATURE = 1e-3
"""Floor of a dynamic temperature."""


# ---------------------------------------------------------------------------------------------
# parameters


@dataclass(frozen=True)
class Range:
    """The allowed values of one numeric setting: bounds (None = open) and what the special value
    means. It checks values (`SamplingParams`, `GenerationSettings`) and gives the same bounds to the
    server's request schema (`schema`), so a limit is written once."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    note: str = ""

    def ok(self, v: float) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def describe(self) -> str:
        def fmt(v: float) -> str:
            return f"{v:g}" if isinstance(v, float) else str(v)

        lo = f"[{fmt(self.ge)}" if self.ge is not None else f"({fmt(self.gt)}" if self.gt is not None else None
        hi = f"{fmt(self.le)}]" if self.le is not None else f"{fmt(self.lt)})" if self.lt is not None else None
        if lo and hi:
            text = f"must be in {lo}, {hi}"
        elif lo:
            text = f"must be {'>=' if self.ge is not None else '>'} {lo[1:]}"
        elif hi:
            text = f"must be {'<=' if self.le is not None else '<'} {hi[:-1]}"
        else:
            text = "any value"
        return f"{text} ({self.note})" if self.note else text

    def schema(self) -> dict[str, float]:
        """The bounds as pydantic `Field` keywords (JSON schema minimum/maximum)."""
        return {k: v for k, v in (("ge", self.ge), ("gt", self.gt), ("le", self.le), ("lt", self.lt)) if v is not None}


SAMPLING_RANGES: dict[str, Range] = {
    "temperature": Range(ge=0, note="0 = greedy"),
    "top_k": Range(ge=0, note="0 = off"),
    "top_p": Range(gt=0, le=1, note="1 = off"),
    "min_p": Range(ge=0, lt=1, note="0 = off"),
    "repetition_penalty": Range(gt=0, note="1 = off"),
    "repetition_penalty_decay": Range(ge=0),
    "mirostat_tau": Range(ge=0, note="0 = off"),
    "mirostat_eta": Range(ge=0),
    "beam_width": Range(ge=0, note="0 or 1 = off"),
    "ras_window": Range(ge=0, note="0 = off"),
    "ras_ratio": Range(ge=0, le=1),
    "seed": Range(ge=0, le=2**53 - 1, note="null = random"),  # exact as a JSON number
}
"""The bounds of `SamplingParams`' numeric options (the others take any finite value)."""


def check_fields(obj: object, section: str, ranges: dict[str, Range]) -> None:
    """Type and range checks of a settings dataclass: numbers finite, ints integral, `ranges` held
    (None passes where the field's default is None). Raises `UserError` naming `section.key`."""
    for f in fields(obj):  # type: ignore[arg-type]
        v = getattr(obj, f.name)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        if v is None and f.default is None:
            continue
        what = None
        if kind.startswith(("float", "int")):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                what = "must be a finite number"
            elif kind.startswith("int") and not isinstance(v, int):
                what = "must be an integer"
            elif f.name in ranges and not ranges[f.name].ok(v):
                what = ranges[f.name].describe()
        elif kind == "str" and not isinstance(v, str):
            what = "must be a string"
        elif kind == "bool" and not isinstance(v, bool):
            what = "must be true or false"
        if what:
            raise UserError(f"{section}.{f.name}={v!r}: {what}")


@dataclass(frozen=True)
class SamplingParams:
    """Every sampler option of one decoding stage (AR or NAR). Invalid values raise `UserError`.

    temperature: 0 = greedy. min_temperature: a value in [0, temperature) turns on dynamic
    temperature (`dynamic_temperature_mode` "pmax" is the reference's formula, "entropy" scales by
    the normalised entropy). top_k 0 / top_p 1 / min_p 0 = off. repetition_penalty 1 = off;
    repetition_penalty_decay 0 = the same penalty at every distance, d > 0 = penalty**(dist**-d).
    length_penalty (STOP logit scaled by (len+1)**penalty; > 0 gives longer output) 0 = off.
    mirostat_tau 0 = off. beam_width 0/1 = off; beam_length_alpha normalises beam scores by
    length**alpha. ras_window/ras_ratio: VALL-E 2 repetition-aware sampling (window 0 = off; paper
    defaults 10 / 0.1; it only differs from plain sampling when a filter is on). max_ar_context:
    how many recent response frames the AR attends to (<= 0 = all; `DecodingConstraints` applies
    it). seed None = drawn from torch's global RNG. medusa: decode with the model's Medusa heads when
    it has them (`model.medusa_heads`; greedy output identical, sampling the same distribution, see
    `vall_e.generation.speculative`). medusa_tree: greedy only: verify a tree of the heads' top
    candidates per pass instead of a chain of their best ("16,8,4": 16 candidates at depth 1, 8 under
    the best of them, 4 under the best of those; "" = the chain). Bounds: `SAMPLING_RANGES`.
    """

    temperature: float = 1.0
    min_temperature: float = -1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_penalty_decay: float = 0.0
    length_penalty: float = 0.0
    mirostat_tau: float = 0.0
    mirostat_eta: float = 0.1
    beam_width: int = 0
    beam_length_alpha: float = 1.0
    ras_window: int = 10
    ras_ratio: float = 0.1
    max_ar_context: int = -1
    dynamic_temperature_mode: str = "pmax"
    seed: int | None = None
    medusa: bool = False
    medusa_tree: str = ""

    def __post_init__(self) -> None:
        check_fields(self, "sampling", SAMPLING_RANGES)
        if self.medusa_tree:
            from vall_e.generation.speculative import TREE_MAX_DEPTH, parse_tree
            parse_tree(self.medusa_tree, TREE_MAX_DEPTH)  # the syntax; the depth is checked against the model
        if self.dynamic_temperature_mode not in DYNAMIC_TEMPERATURE_MODES:
            raise UserError(f"sampling.dynamic_temperature_mode={self.dynamic_temperature_mode!r}: must be one of "
                            f"{', '.join(DYNAMIC_TEMPERATURE_MODES)}")
        if self.uses_beam and self.uses_mirostat:
            raise UserError(f"sampling.beam_width={self.beam_width!r}: beam search cannot be combined with "
                            "mirostat (mirostat_tau > 0)")

    # --- switches -----------------------------------------------------------------------------
    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def dynamic(self) -> bool:
        """Dynamic temperature is on: min_temperature in [0, temperature)."""
        return 0 <= self.min_temperature < self.temperature

    @property
    def uses_mirostat(self) -> bool:
        return self.mirostat_tau > 0

    @property
    def uses_beam(self) -> bool:
        return self.beam_width > 1

    @property
    def uses_ras(self) -> bool:
        return self.ras_window > 0 and self.ras_ratio > 0

    # --- recommended stage defaults -------------------------------------------------------------
    @classmethod
    def ar_defaults(cls, **changes) -> SamplingParams:
        """AR: the reference README's temperature 0.95, no filters, RAS at the paper's 10 / 0.1."""
        return cls(**{"temperature": 0.95, **changes})

    @classmethod
    def nar_defaults(cls, **changes) -> SamplingParams:
        """NAR: the README's temperature 0.2. RAS is off (frames are drawn in parallel, there is no
        recent past) and so is the repetition penalty: the reference penalised against the previous
        *level's* codes, which belong to another codebook (docs/reference-differences.md #5)."""
        return cls(**{"temperature": 0.2, "ras_window": 0, **changes})


# ---------------------------------------------------------------------------------------------
# processors (pure functions)


def _expand_rows(x: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-row tensor [B] or [B, V] so it broadcasts against `like` [B, ..., V]."""
    if x.ndim == 1:
        return x.view(x.shape + (1,) * (like.ndim - 1))
    return x.view(x.shape[:1] + (1,) * (like.ndim - 2) + x.shape[1:])


def _distances(history: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """(valid mask, distance from the end counted over valid tokens: 1 = the most recent)."""
    valid = history != pad_id
    dist = valid.flip(-1).long().cumsum(-1).flip(-1)
    return valid, dist


def _check_history(logits: Tensor, history: Tensor) -> Tensor:
    if history.ndim != 2 or history.shape[0] != logits.shape[0]:
        raise ValueError(f"history must be [B={logits.shape[0]}, t], got {tuple(history.shape)}")
    return history.to(device=logits.device, dtype=torch.long)


def apply_repetition_penalty(logits: Tensor, history: Tensor | None, penalty: float, decay: float = 0.0,
                             pad_id: int = PAD_ID) -> Tensor:
    """Penalise every token of a sequence's history, once, at its most recent occurrence.

    The factor at distance d (1 = the last token) is penalty ** (d ** -decay): the full penalty
    for the last token, fading towards 1 with distance when decay > 0 (the reference's comment says
    the decay applies "to how far away it is", but its formula penalty * d**decay grew with
    distance). Positive logits are divided by the factor and negative ones multiplied, so with
    penalty > 1 the token always loses probability (the reference divided both:
    docs/reference-differences.md #5). Ids outside [0, V) (padding) are ignored.
    """
    if penalty == 1.0 or history is None or history.numel() == 0:
        return logits
    history = _check_history(logits, history)
    B, V = logits.shape[0], logits.shape[-1]
    valid, dist = _distances(history, pad_id)
    valid = valid & (history >= 0) & (history < V)
    index = torch.where(valid, history, V)  # invalid -> a spare column, dropped below
    nearest = torch.full((B, V + 1), math.inf, device=logits.device)
    nearest.scatter_reduce_(1, index, torch.where(valid, dist.float(), math.inf), reduce="amin")
    nearest = nearest[:, :V]
    seen = torch.isfinite(nearest)
    exponent = torch.where(seen, nearest.clamp(min=1).pow(-float(decay)), 0.0)
    factor = _expand_rows(torch.pow(float(penalty), exponent), logits)
    out = torch.where(logits > 0, logits / factor, logits * factor)
    return out.to(logits.dtype)


def apply_length_penalty(logits: Tensor, lengths: Tensor | int, stop_id: int, penalty: float) -> Tensor:
    """Scale the STOP logit by (length + 1) ** penalty, per sequence, in the direction that lowers it.

    With penalty > 0 STOP gets less likely as the sequence grows (longer output); < 0 the opposite.
    Like the repetition penalty, positive logits are divided and negative ones multiplied (the
    reference divided both, which raised a negative STOP logit).
    """
    if penalty == 0.0:
        return logits
    B = logits.shape[0]
    lengths = torch.as_tensor(lengths, device=logits.device).float().expand(B)
    factor = _expand_rows((lengths + 1).pow(float(penalty)), logits[..., 0])
    stop = logits[..., stop_id]
    out = logits.clone()
    out[..., stop_id] = torch.where(stop > 0, stop / factor, stop * factor).to(logits.dtype)
    return out


def ban_tokens(logits: Tensor, ids: Sequence[int] | Tensor, rows: Tensor | None = None) -> Tensor:
    """Set the logits of `ids` to -inf (in every row, or where the bool `rows` [B] is true)."""
    if isinstance(ids, (list, tuple)) and not ids:  # nothing to ban: no tensor to build
        return logits
    ids = torch.as_tensor(ids, dtype=torch.long, device=logits.device).flatten()
    if ids.numel() == 0:
        return logits
    banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    banned[ids] = True
    if rows is not None:
        banned = banned & _expand_rows(rows.to(logits.device, torch.bool), logits)
    return logits.masked_fill(banned, -math.inf)


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the logits >= the k-th largest of each row (ties at the k-th are kept, as in HF)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest most-probable set whose probability reaches p.

    A token is dropped when the tokens ranked above it already hold >= p of the mass; the top
    token is always kept.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(-1)
    before = probs.cumsum(-1) - probs
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def apply_min_p(logits: Tensor, min_p: float) -> Tensor:
    """Keep tokens whose probability is >= min_p times the row's top probability."""
    if min_p <= 0.0:
        return logits
    top = logits.amax(-1, keepdim=True)
    return logits.masked_fill(logits < top + math.log(min_p), -math.inf)


def apply_temperature(logits: Tensor, temperature: float | Tensor) -> Tensor:
    """Divide by a temperature (a number, or per row: shape logits.shape[:-1]). Must be > 0."""
    if isinstance(temperature, Tensor):  # not checked here: that would cost a device sync per step
        return logits / temperature.to(logits.device, logits.dtype).unsqueeze(-1)
    if temperature <= 0:
        raise ValueError("temperature must be > 0 (use greedy decoding for 0)")
    return logits if temperature == 1.0 else logits / temperature


def dynamic_temperature(logits: Tensor, temperature: float, min_temperature: float,
                        mode: str = "pmax") -> Tensor:
    """Per-row temperature in [min_temperature, temperature]: confident rows get colder.

    "pmax" is the reference's (kalomaze's early DynaTemp): T - (T - Tmin) * sigmoid(10 (p_max - 0.5)).
    "entropy": Tmin + (T - Tmin) * H / log(n), with H the row's entropy over its n allowed tokens.
    Returns a tensor of shape logits.shape[:-1], floored at MIN_TEMPERATURE (min_temperature 0 on a
    certain row would otherwise divide by zero; the floor is as good as greedy).
    """
    x = logits.float()
    span = temperature - min_temperature
    if mode == "pmax":
        p_max = x.softmax(-1).amax(-1)
        t = temperature - span * torch.sigmoid(10.0 * (p_max - 0.5))
    elif mode == "entropy":
        logp = x.log_softmax(-1)
        p = logp.exp()
        entropy = -torch.where(p > 0, p * logp, 0.0).sum(-1)
        n = torch.isfinite(x).sum(-1).float()
        norm = torch.where(n > 1, entropy / n.clamp(min=2).log(), 0.0).clamp(0, 1)
        t = min_temperature + span * norm
    else:
        raise ValueError(f"unknown dynamic temperature mode {mode!r}")
    return t.clamp(min=MIN_TEMPERATURE)


def recent_counts(history: Tensor, tokens: Tensor, window: int, pad_id: int = PAD_ID) -> Tensor:
    """How often tokens[b] occurs among the last `window` valid tokens of history[b] ([B] long)."""
    valid, dist = _distances(history, pad_id)
    recent = valid & (dist <= window)
    return ((history == tokens.unsqueeze(-1)) & recent).sum(-1)


def repetition_aware_select(nucleus_tokens: Tensor, full_tokens: Tensor, history: Tensor | None,
                            window: int, ratio: float, pad_id: int = PAD_ID) -> tuple[Tensor, Tensor]:
    """VALL-E 2 repetition-aware sampling, per sequence.

    Where the nucleus-sampled token occurs at least window * ratio times in the sequence's last
    `window` tokens (CosyVoice's `>=` rule; 10 / 0.1 = "seen at all in the last 10"), take the
    token drawn from the full distribution instead. Returns (tokens, resampled mask).
    """
    if history is None or history.numel() == 0 or window <= 0 or ratio <= 0:
        return nucleus_tokens, torch.zeros_like(nucleus_tokens, dtype=torch.bool)
    history = history.to(device=nucleus_tokens.device, dtype=torch.long)
    counts = recent_counts(history, nucleus_tokens, window, pad_id)
    resample = counts.float() >= window * ratio - 1e-6
    return torch.where(resample, full_tokens, nucleus_tokens), resample


# ---------------------------------------------------------------------------------------------
# mirostat


class Mirostat:
    """Mirostat v1 (Basu et al. 2021) with one surprise target state μ per sequence.

    μ starts at 2·tau for every sequence (the reference started at 2·eta and shared one state
    across the batch: docs/reference-differences.md #6). `truncate` keeps each row's top-k, with k
    from the row's estimated Zipf exponent and its own μ; `update` moves μ by eta·(surprise - tau)
    per sequence.
    """

    def __init__(self, tau: float, eta: float, batch_size: int, device: torch.device | str | None = None,
                 n_vocab: int | None = None, m: int = 100):
        self.tau, self.eta, self.n_vocab, self.m = float(tau), float(eta), n_vocab, m
        self.mu = torch.full((batch_size,), 2.0 * float(tau), dtype=torch.float32, device=device)

    def top_k(self, logits: Tensor) -> Tensor:
        """k per row (long [B]) for the current μ."""
        B, V = logits.shape
        logp = logits.double().log_softmax(-1)
        sorted_logp = logp.sort(-1, descending=True).values
        m = min(self.m, V - 1)
        if m < 1:
            return torch.ones(B, dtype=torch.long, device=logits.device)
        i = torch.arange(m, device=logits.device, dtype=torch.float64)
        t = torch.log((i + 2) / (i + 1))
        b = sorted_logp[:, :m] - sorted_logp[:, 1:m + 1]  # ln(p_i / p_{i+1})
        ok = torch.isfinite(b)
        num = torch.where(ok, t * b, 0.0).sum(-1)
        den = torch.where(ok, t * t, 0.0).sum(-1)
        s = (num / den.clamp(min=1e-12)).clamp(min=1e-3)
        eps = s - 1
        n = float(self.n_vocab or V)
        small = eps.abs() < 1e-6
        ratio = torch.where(small, 1 / math.log(n), eps / (1 - n ** (-torch.where(small, 1.0, eps))))
        mu = self.mu.to(logits.device).double().clamp(max=1000.0)
        k = ((ratio * torch.pow(2.0, mu)) ** (1 / s)).round() + 1
        k = torch.nan_to_num(k, nan=1.0, posinf=float(V)).clamp(1, V)
        return torch.where(den > 0, k, 1.0).long()

    def truncate(self, logits: Tensor) -> Tensor:
        """Logits with every token ranked beyond the row's k set to -inf."""
        k = self.top_k(logits)
        order = logits.argsort(-1, descending=True)
        keep_sorted = torch.arange(logits.shape[-1], device=logits.device) < k.unsqueeze(-1)
        keep = keep_sorted.scatter(-1, order, keep_sorted)
        return logits.masked_fill(~keep, -math.inf)

    def update(self, logits: Tensor, tokens: Tensor) -> Tensor:
        """μ -= eta·(surprise - tau), surprise = -log2 p(token) under the untruncated `logits`."""
        logp = logits.float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        surprise = -logp / math.log(2)
        self.mu = self.mu - self.eta * (surprise.to(self.mu.device) - self.tau)
        return surprise

    def reorder(self, index: Tensor) -> None:
        self.mu = self.mu[index.to(self.mu.device)]


# ---------------------------------------------------------------------------------------------
# randomness

_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)
_DRAWS = 2  # independent draws per step (slots): 0 = main, 1 = repetition-aware fallback
# A step's counters are step * _COUNTER_STRIDE + slot + 1. The stride is wider than _DRAWS only so that
# the random streams, and with them every seeded output, stay what they were when 4 slots were reserved.
_COUNTER_STRIDE = 4
_UNIFORM_BLOCK = 64  # AR steps whose uniforms TokenSampler computes at once


def _lsr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bits."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix64(x: Tensor) -> Tensor:
    """SplitMix64's finaliser on int64 tensors (multiplication wraps mod 2**64)."""
    x = (x ^ _lsr(x, 30)) * _M1
    x = (x ^ _lsr(x, 27)) * _M2
    return x ^ _lsr(x, 31)


def sequence_keys(seed: int, sequence_ids: Tensor) -> Tensor:
    """One 64-bit random key per sequence from (seed, sequence id)."""
    seed_t = torch.tensor(int(seed) & ((1 << 63) - 1), dtype=torch.long, device=sequence_ids.device)
    base = _mix64(seed_t * _GOLDEN + 0x5851F42D4C957F2D)
    return _mix64(base + (sequence_ids.long() + 1) * _GOLDEN)


def counter_uniform(keys: Tensor, step: int, slot: int, shape: Sequence[int] = ()) -> Tensor:
    """float64 uniforms in [0, 1) of shape [B, *shape]: a pure function of (key, step, slot, position)."""
    salt = _mix64(torch.tensor((step * _COUNTER_STRIDE + slot + 1), dtype=torch.long, device=keys.device) * _GOLDEN)
    base = _mix64(keys ^ salt)
    numel = math.prod(shape)
    pos = torch.arange(1, numel + 1, dtype=torch.long, device=keys.device)
    bits = _lsr(_mix64(base.unsqueeze(-1) + pos * _GOLDEN), 11)  # top 53 bits
    return (bits.double() / float(1 << 53)).view(keys.shape[0], *shape)


def counter_uniform_steps(keys: Tensor, first_step: int, n_steps: int) -> Tensor:
    """float64 [B, n_steps, _DRAWS]: `counter_uniform(keys, first_step + i, slot)[b]` at [b, i, slot].

    The same arithmetic on a whole block of steps at once, so an AR step reads its uniforms with one
    index instead of ~40 small integer ops (bit-identical: int64 products wrap the same way).
    """
    steps = torch.arange(first_step, first_step + n_steps, dtype=torch.long, device=keys.device)
    counters = steps[:, None] * _COUNTER_STRIDE + torch.arange(_DRAWS, dtype=torch.long, device=keys.device) + 1
    salt = _mix64(counters * _GOLDEN)  # [n_steps, _DRAWS]
    base = _mix64(keys[:, None, None] ^ salt)
    bits = _lsr(_mix64(base + _GOLDEN), 11)  # position 1 of counter_uniform's shape () draw
    return bits.double() / float(1 << 53)


def categorical_cdf(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(probabilities float32, cumulative float64) of softmax(logits), for `categorical_search`."""
    probs = logits.float().softmax(-1)
    return probs, probs.double().cumsum(-1)


def categorical_search(probs: Tensor, cdf: Tensor, uniform: Tensor) -> Tensor:
    """The token whose CDF interval holds uniform x total (see `categorical_draw`)."""
    target = (uniform.to(cdf.device, torch.float64) * cdf[..., -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
    ok = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) > 0
    return torch.where(ok, tokens, probs.argmax(-1))


def categorical_draw(logits: Tensor, uniform: Tensor) -> Tensor:
    """Draw from softmax(logits) by inverting the CDF with one uniform per row (shape logits.shape[:-1]).

    One uniform per row (not per token, as Gumbel-max needs) keeps the hashing cheap for NAR passes
    on CPU. A token with probability 0 (filtered, banned) is never returned: should float rounding
    of the CDF ever land on one, the row's argmax is taken instead.
    """
    return categorical_search(*categorical_cdf(logits), uniform)


# ---------------------------------------------------------------------------------------------
# sampler


class TokenSampler:
    """Turns a batch of logits into tokens with one `SamplingParams`, keeping per-sequence state.

    logits are [B, V] (AR: one step) or [B, T, V] (NAR: all frames of a level at once; mirostat,
    RAS and the length penalty are AR-only). `stop_id` is needed for the length penalty; pass
    `banned_ids=[stop_id]` for NAR passes whose head has a STOP column. `sequence_ids` (default
    0..B-1) name the sequences for the random streams; see the module docstring. Call `reorder`
    when the caller reorders or drops rows of its batch.
    """

    def __init__(self, params: SamplingParams, stop_id: int | None = None, batch_size: int = 1,
                 device: torch.device | str | None = None, generator: torch.Generator | None = None,
                 banned_ids: Sequence[int] = (), sequence_ids: Sequence[int] | Tensor | None = None,
                 pad_id: int = PAD_ID):
        self.params = params
        self.stop_id = stop_id
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.generator = generator
        self.banned_ids = list(banned_ids)
        self.pad_id = pad_id
        if params.length_penalty != 0 and stop_id is None:
            raise ValueError("length_penalty needs stop_id")
        self.seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self.step = 0
        self.last_temperature: Tensor | float | None = None
        self.reset(batch_size, sequence_ids)

    def reset(self, batch_size: int | None = None, sequence_ids: Sequence[int] | Tensor | None = None) -> None:
        """Start new sequences (e.g. the rows of the next NAR level): fresh keys and mirostat state.

        The step counter keeps running, so a reset sampler never reuses earlier random numbers.
        """
        self.batch_size = batch_size = self.batch_size if batch_size is None else batch_size
        ids = torch.arange(batch_size) if sequence_ids is None else torch.as_tensor(sequence_ids).long()
        if ids.shape != (batch_size,):
            raise ValueError(f"sequence_ids must have {batch_size} entries")
        self.keys = sequence_keys(self.seed, ids.to(self.device))
        self._block: tuple[int, Tensor | None] = (0, None)  # AR uniforms of a block of steps (see _uniform)
        p = self.params
        self.mirostat = (Mirostat(p.mirostat_tau, p.mirostat_eta, batch_size, self.device)
                         if p.uses_mirostat else None)
        self.last_resampled = torch.zeros(batch_size, dtype=torch.bool, device=self.device)

    # --- stages ----------------------------------------------------------------------------------
    def penalize(self, logits: Tensor, history: Tensor | None = None, lengths: Tensor | None = None) -> Tensor:
        """Steps 1-3 (repetition penalty, length penalty, bans) on float32 logits.

        The AR applies these through `DecodingConstraints.process` (with its STOP floor and caps),
        for sampling and beam search alike. `lengths` defaults to the number of valid history tokens.
        """
        p = self.params
        x = logits.float()
        x = apply_repetition_penalty(x, history, p.repetition_penalty, p.repetition_penalty_decay, self.pad_id)
        if p.length_penalty != 0 and x.ndim == 2:
            if lengths is None:
                lengths = ((history != self.pad_id).sum(-1) if history is not None
                           else torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
            x = apply_length_penalty(x, lengths, self.stop_id, p.length_penalty)
        return ban_tokens(x, self.banned_ids)

    def filter(self, logits: Tensor) -> Tensor:
        """Steps 5-7: top-k, top-p, min-p."""
        p = self.params
        return apply_min_p(apply_top_p(apply_top_k(logits, p.top_k), p.top_p), p.min_p)

    def _uniform(self, shape: Sequence[int], slot: int) -> Tensor:
        if self.generator is not None:
            return torch.rand(tuple(shape), generator=self.generator, device=self.generator.device,
                              dtype=torch.float64)
        if len(shape) == 1:  # one draw per sequence (an AR step): from a block of precomputed steps
            first, block = self._block
            if block is None or not first <= self.step < first + block.shape[1]:
                first, block = self._block = (self.step, counter_uniform_steps(self.keys, self.step, _UNIFORM_BLOCK))
            return block[:, self.step - first, slot]
        return counter_uniform(self.keys, self.step, slot, shape[1:])

    def _draw(self, logits: Tensor, slot: int) -> Tensor:
        return categorical_draw(logits, self._uniform(logits.shape[:-1], slot))

    @property
    def _filters(self) -> bool:
        """Whether `filter` can change logits (top-k, top-p or min-p on)."""
        p = self.params
        return 0 < p.top_k or p.top_p < 1.0 or p.min_p > 0.0

    # --- the pipeline ----------------------------------------------------------------------------
    def sample(self, logits: Tensor, history: Tensor | None = None, lengths: Tensor | None = None,
               penalized: bool = False) -> Tensor:
        """Tokens (long [B] or [B, T]) for one decoding step; see the module docstring for the order.

        penalized: the caller already applied the penalties (steps 1-2; the AR's
        `DecodingConstraints.process` does), so only the bans are applied here."""
        if logits.ndim not in (2, 3) or logits.shape[0] != self.batch_size:
            raise ValueError(f"logits must be [B={self.batch_size}, V] or [B, T, V], got {tuple(logits.shape)}")
        p = self.params
        ar = logits.ndim == 2
        if self.mirostat is not None and not ar:
            raise ValueError("mirostat is for AR steps ([B, V] logits)")
        x = ban_tokens(logits.float(), self.banned_ids) if penalized else self.penalize(logits, history, lengths)
        self.last_resampled = torch.zeros(logits.shape[0], dtype=torch.bool, device=x.device)
        if p.greedy:
            self.step += 1
            self.last_temperature = 0.0
            return x.argmax(-1)
        filtered = self.filter(x)
        temperature = (dynamic_temperature(filtered, p.temperature, p.min_temperature, p.dynamic_temperature_mode)
                       if p.dynamic else p.temperature)
        self.last_temperature = temperature
        filtered = apply_temperature(filtered, temperature)
        if self.mirostat is not None:
            tokens = self._draw(self.mirostat.truncate(filtered), 0)
            self.mirostat.update(filtered, tokens)
        elif ar and p.uses_ras and history is not None and history.numel() > 0:
            probs, cdf = categorical_cdf(filtered)
            tokens = categorical_search(probs, cdf, self._uniform(filtered.shape[:-1], 0))
            if self._filters:  # the fallback draws from the unfiltered distribution
                probs, cdf = categorical_cdf(apply_temperature(x, temperature))
            full = categorical_search(probs, cdf, self._uniform(filtered.shape[:-1], 1))
            tokens, self.last_resampled = repetition_aware_select(
                tokens, full, history, p.ras_window, p.ras_ratio, self.pad_id)
        else:
            tokens = self._draw(filtered, 0)
        self.step += 1
        return tokens

    def distribution(self, logits: Tensor, history: Tensor | None = None) -> Tensor:
        """The probabilities [B, V] with which `sample(logits, history, penalized=True)` returns each
        token of an AR step (steps 3-9, the repetition-aware fallback as the mixture it draws from):
        one-hot for greedy decoding. Exact speculative sampling accepts and resamples against it.
        Not for mirostat, whose state depends on the draws (ValueError)."""
        if self.mirostat is not None:
            raise ValueError("mirostat has no stateless distribution")
        p = self.params
        x = ban_tokens(logits.float(), self.banned_ids)
        if p.greedy:
            return torch.zeros_like(x).scatter_(-1, x.argmax(-1, keepdim=True), 1.0)
        filtered = self.filter(x)
        temperature = (dynamic_temperature(filtered, p.temperature, p.min_temperature, p.dynamic_temperature_mode)
                       if p.dynamic else p.temperature)
        probs = apply_temperature(filtered, temperature).softmax(-1)
        if p.uses_ras and self._filters and history is not None and history.numel() > 0:
            # a draw of a token seen too often in the window is replaced by a draw from the unfiltered
            # distribution: P(x) = pf(x) (1 - r(x)) + (sum_y pf(y) r(y)) pu(x)
            full = apply_temperature(x, temperature).softmax(-1)
            history = history.to(device=x.device, dtype=torch.long)
            valid, dist = _distances(history, self.pad_id)
            recent = valid & (dist <= p.ras_window) & (history >= 0) & (history < x.shape[-1])
            counts = torch.zeros(x.shape[0], x.shape[-1] + 1, device=x.device)
            counts.scatter_add_(1, torch.where(recent, history, x.shape[-1]), recent.float())
            repeated = (counts[:, :-1] >= p.ras_window * p.ras_ratio - 1e-6).float()
            moved = (probs * repeated).sum(-1, keepdim=True)
            probs = probs * (1 - repeated) + moved * full
        return probs

    def reorder(self, index: Tensor) -> None:
        """Follow the caller's batch: row r now holds old row index[r] (reorder, drop or repeat)."""
        index = torch.as_tensor(index, dtype=torch.long)
        self.keys = self.keys[index.to(self.keys.device)]
        self._block = (0, None)
        if self.mirostat is not None:
            self.mirostat.reorder(index)
        self.last_resampled = self.last_resampled[index.to(self.last_resampled.device)]
        self.batch_size = int(index.numel())


# ---------------------------------------------------------------------------------------------
# beam search


class BeamSearch:
    """A real beam search for the AR (the reference's was greedy over B rows:
    docs/reference-differences.md #7).

    The caller repeats each batch item `beam_width` times (`repeat_interleave`, rows b*W..b*W+W-1),
    and per step passes log-probabilities [B*W, V] (re-normalised here with log_softmax, so raw
    logits also work) to `step`, which returns the next token per row and `reorder_index`: row r
    continues old row reorder_index[r], so the caller does `cache = cache.index_select(0, idx)`.
    Initially only beam 0 of each item is live, so identical beams are not expanded W times.

    Every live beam's STOP extension is scored (cumulative log-prob / length**alpha, the length
    counting the STOP); the best finished hypothesis per item is kept. An item is done when no live
    beam can still beat it (an exact bound, since log-probs are <= 0; with `max_length` None and
    alpha > 0 nothing is ever provably beaten, so the caller's step limit ends the search), or after
    `max_length` tokens. Done items are frozen: their rows get `stop_id` and identity reordering.
    """

    def __init__(self, batch_size: int, beam_width: int, stop_id: int, max_length: int | None = None,
                 length_alpha: float = 1.0, device: torch.device | str | None = None, pad_id: int = PAD_ID):
        if beam_width < 1 or (max_length is not None and max_length < 1):
            raise ValueError("beam_width and max_length must be >= 1")
        B, W = batch_size, beam_width
        self.batch_size, self.beam_width, self.stop_id = B, W, stop_id
        self.max_length, self.alpha, self.pad_id = max_length, float(length_alpha), pad_id
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.scores = torch.full((B, W), -math.inf, device=self.device)
        self.scores[:, 0] = 0.0
        self.tokens = torch.empty((B * W, 0), dtype=torch.long, device=self.device)
        self.length = 0
        self.best_score = torch.full((B,), -math.inf, device=self.device)
        self.best_tokens = torch.empty((B, 0), dtype=torch.long, device=self.device)  # pad-filled
        self.best_length = torch.zeros(B, dtype=torch.long, device=self.device)
        self.done = torch.zeros(B, dtype=torch.bool, device=self.device)

    @property
    def all_done(self) -> bool:
        return bool(self.done.all())

    def _norm(self, length: float) -> float:
        return float(length) ** self.alpha

    def step(self, logprobs: Tensor) -> tuple[Tensor, Tensor]:
        """One step: (next token per row [B*W], reorder_index [B*W]) from logprobs [B*W, V]."""
        B, W = self.batch_size, self.beam_width
        if self.max_length is not None and self.length >= self.max_length:
            raise RuntimeError("beam search is past max_length")
        V = logprobs.shape[-1]
        if logprobs.shape != (B * W, V):
            raise ValueError(f"logprobs must be [{B * W}, V], got {tuple(logprobs.shape)}")
        lp = logprobs.to(self.device).float().log_softmax(-1).view(B, W, V)
        total = self.scores.unsqueeze(-1) + lp  # [B, W, V]
        L, L1 = self.length, self.length + 1

        # finished hypotheses: every live beam + STOP
        stop_score, stop_beam = (total[:, :, self.stop_id] / self._norm(L1)).max(-1)
        better = (stop_score > self.best_score) & ~self.done
        if L > 0:
            rows = torch.arange(B, device=self.device) * W + stop_beam
            self.best_tokens = torch.where(better.unsqueeze(-1), self.tokens[rows], self.best_tokens)
        self.best_length = torch.where(better, L, self.best_length)
        self.best_score = torch.where(better, stop_score, self.best_score)
        self.best_tokens = torch.cat([self.best_tokens, self.best_tokens.new_full((B, 1), self.pad_id)], 1)

        # live beams: the W best non-STOP continuations
        total[:, :, self.stop_id] = -math.inf
        top_scores, top_index = total.view(B, W * V).topk(W, dim=-1)
        beam, token = top_index // V, top_index % V
        base = torch.arange(B, device=self.device).unsqueeze(-1) * W
        frozen = self.done.unsqueeze(-1)
        reorder = torch.where(frozen, base + torch.arange(W, device=self.device), base + beam).flatten()
        token = torch.where(frozen, self.stop_id, token).flatten()
        self.scores = torch.where(frozen, self.scores, top_scores)
        self.tokens = torch.cat([self.tokens[reorder], token.unsqueeze(-1)], dim=1)
        self.length = L1

        if self.max_length is not None and L1 >= self.max_length:
            self.done = torch.ones_like(self.done)
        else:  # a live beam's finished score is <= c / l**alpha for some l in [L1+1, max_length]
            longest = self.max_length if self.max_length is not None else math.inf
            bound = torch.maximum(self.scores / self._norm(L1 + 1), self.scores / self._norm(longest))
            bound = bound.amax(-1)
            self.done = self.done | (self.best_score >= bound) | ~torch.isfinite(self.scores).any(-1)
        return token, reorder

    def best_scores(self) -> Tensor:
        """The normalised score of each item's `best()` sequence ([B])."""
        live_score = (self.scores / self._norm(max(self.length, 1))).amax(-1)
        return torch.where(torch.isfinite(self.best_score), self.best_score, live_score)

    def best(self) -> list[Tensor]:
        """Per batch item: the best finished sequence (without STOP), or else the best live one."""
        W = self.beam_width
        live_beam = (self.scores / self._norm(max(self.length, 1))).argmax(-1)
        fin = torch.isfinite(self.best_score).tolist()
        blen, lb = self.best_length.tolist(), live_beam.tolist()
        out = []
        for b in range(self.batch_size):  # assembling the output list, once
            if fin[b]:
                out.append(self.best_tokens[b, :blen[b]].clone())
            else:
                out.append(self.tokens[b * W + lb[b]].clone())
        return out

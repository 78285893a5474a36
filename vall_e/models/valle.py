"""The VALL-E core: embeddings, sequence layout, per-sample AR/NAR masks, heads, loss and inference steps.

One network serves both stages (kind "ar+nar", the default), or a network does only one of them
("ar" / "nar", the reference's legacy pair). Per sample the sequence is

    [text ids] SEP [language] SEP [prompt frames] SEP [response frames]

* prompt frame   = sum of the n_levels level embeddings of its codes;
* AR response    = level-0 codes through the AR table (n_codes + 1 rows; id n_codes = STOP);
* NAR response   = for target level k, the sum of the NAR tables of levels 0..k-1 (separate from the
                   AR table, as in the reference), plus a learned embedding of k (the reference has
                   none; the paper conditions the NAR on its stage).

Attention is causal for AR samples and bidirectional for NAR samples, chosen per sample in one batch.

Heads: one per level. The AR head has n_codes + 1 outputs (STOP); each NAR head has n_codes outputs,
so the NAR can never emit STOP (the reference's shared head let it: docs/reference-differences.md #8).
Per-level heads also spare one projection from serving 8 codebooks whose ids mean unrelated things;
they cost (n_levels - 1) x d x n_codes parameters (7M at the full size, ~4%).

Two options change the AR (both off by default, so a plain VALL-E is unchanged):
* `ar_group` G > 1 is VALL-E 2's grouped code modeling (arXiv 2406.05370): each AR position reads
  the sum of G level-0 code embeddings (one table per slot) and predicts the next G codes through
  one head of G x (n_codes + 1) outputs; the codes are followed by STOP up to a whole group. The AR
  sequence is G times shorter.
* `text_head_rate` r > 0 gives the text heads (`text_heads`) their own rotary positions: text token
  n sits at n * r and response frame j at j (the first frame of a group for G > 1), so a frame that
  is where the average speaker would be in the text is at relative distance 0 from its phoneme.
  The diagonal of text against audio, which the guided-attention loss asks for, then needs no
  content-based search to find; the heads only correct for the speaker's and phoneme's own pace.

`VALLEConfig`, what a network is built from, is defined with the YAML `model` section that shares its
fields, in `vall_e.config.model`; it is importable from here too.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vall_e.config.model import KINDS, TEXT_HEAD_BACKBONES, VALLEConfig
from vall_e.utils.errors import UserError

from .backbones import build_backbone
from .backbones.base import BackboneOutput, Mask
from .backbones.kv_cache import KVCache
from .rows_linear import decode_linear

logger = logging.getLogger(__name__)

__all__ = ["KINDS", "ARState", "LevelEmbedding", "VALLE", "VALLEConfig"]

class LevelEmbedding(nn.Module):
    """Sum of per-level code embeddings: frame [L] -> sum_l table_l(code_l), one table per level.

    Stored as one [n_levels * n_codes, d] table with per-level offsets: a single gather per call.
    """

    def __init__(self, n_levels: int, n_codes: int, d_model: int) -> None:
        super().__init__()
        self.n_levels, self.n_codes = n_levels, n_codes
        self.table = nn.Embedding(n_levels * n_codes, d_model)
        self.register_buffer("offsets", torch.arange(n_levels) * n_codes, persistent=False)

    def forward(self, codes: Tensor) -> Tensor:
        """codes [T, L] with L <= n_levels (levels 0..L-1) -> [T, d]."""
        L = codes.shape[-1]
        if L > self.n_levels:
            raise ValueError(f"{L} code levels given, this embedding has {self.n_levels}")
        return self.table(codes.long() + self.offsets[:L]).sum(-2)


class MedusaHead(nn.Module):
    """One Medusa-1 head: a residual SiLU block, then a projection to the AR's outputs. The block starts
    at zero and the projection as a copy of the AR head (`VALLE.init_medusa_from_ar`), so an untrained
    head proposes what the AR head would, and training only has to learn the shift in time."""

    def __init__(self, d_model: int, n_out: int) -> None:
        super().__init__()
        self.block = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, n_out)

    def forward(self, h: Tensor) -> Tensor:
        return self.out(h + F.silu(self.block(h)))


@dataclass
class ARState:
    """Incremental AR decoding state (mutated in place by `ar_step`)."""

    cache: Any  # the backbone's cache
    valid: Tensor  # Bool[B, capacity]: which key slots are real tokens (left padding is False)
    length: int  # filled slots
    causal: Tensor  # Bool[B], all True
    text: Tensor | None = None  # Bool[B, capacity]: which slots hold text (models with text heads)
    text_pos: Tensor | None = None  # Float[B, capacity]: text heads' positions (text_head_rate > 0)
    prefix: int = 0  # slots of the (left-padded) prefix
    hidden: Tensor | None = None  # [B, d]: the last position's hidden state (what Medusa heads read)


class _Targets:
    """Flat (sample, position, target) lists for the scored positions of a padded batch."""

    def __init__(self) -> None:
        self.samples: list[Tensor] = []
        self.positions: list[Tensor] = []
        self.targets: list[Tensor] = []
        self.subs: list[Tensor] = []

    def add(self, sample: int, positions: Tensor, targets: Tensor, sub: Tensor | None = None) -> None:
        self.samples.append(torch.full((len(positions),), sample))
        self.positions.append(positions)
        self.targets.append(targets)
        self.subs.append(torch.zeros(len(positions), dtype=torch.long) if sub is None else sub)

    def done(self) -> "_Targets":
        self.sample, self.pos, self.target, self.sub = (
            torch.cat(t) for t in (self.samples, self.positions, self.targets, self.subs))
        return self

    def per_sample_mean(self, values: Tensor, batch_size: int) -> Tensor:
        """Mean of per-token `values` over each sample's tokens: Float[batch_size]."""
        sample = self.sample.to(values.device)
        total = torch.zeros(batch_size, device=values.device).index_add_(0, sample, values)
        return total / torch.bincount(self.sample, minlength=batch_size).clamp_min(1).to(values.device)


class VALLE(nn.Module):
    def __init__(self, config: VALLEConfig) -> None:
        super().__init__()
        self.config = c = config
        d = c.d_model
        self.text_emb = nn.Embedding(c.n_text_tokens, d, padding_idx=0)
        self.lang_emb = nn.Embedding(c.n_langs, d)
        self.prompt_emb = LevelEmbedding(c.n_levels, c.n_codes, d)
        self.sep = nn.Parameter(torch.zeros(d))
        if c.has_ar:
            G = c.ar_group
            self.ar_emb = nn.Embedding(G * (c.n_codes + 1), d)  # row n_codes = STOP (per group slot)
            self.ar_head = nn.Linear(d, G * (c.n_codes + 1))
            self.register_buffer("ar_offsets", torch.arange(G) * (c.n_codes + 1), persistent=False)
        if c.has_nar:
            self.nar_emb = LevelEmbedding(c.n_levels - 1, c.n_codes, d)  # input levels 0..n_levels-2
            self.level_emb = nn.Embedding(c.n_levels - 1, d)  # row k-1 = target level k
            self.nar_heads = nn.ModuleList(nn.Linear(d, c.n_codes) for _ in range(c.n_levels - 1))
        if c.medusa_heads and c.has_ar:  # head k proposes the step after next + k - 1 (see MedusaHead)
            self.medusa_heads = nn.ModuleList(MedusaHead(d, c.ar_group * (c.n_codes + 1))
                                              for _ in range(c.medusa_heads))
        if c.text_loss_weight > 0 and c.has_ar:  # the text loss is next-token, so only AR samples have one
            self.text_head = nn.Linear(d, c.n_text_tokens)
        extra = dict(c.backbone_extra)
        if c.backbone in TEXT_HEAD_BACKBONES:
            extra.setdefault("ffn", c.ffn)
            if c.text_heads:
                extra.setdefault("text_heads", c.text_heads)
        if c.kv_heads and c.kv_heads != c.n_heads:
            extra.setdefault("kv_heads", c.kv_heads)
        self.backbone = build_backbone(c.backbone, d_model=d, n_heads=c.n_heads, n_layers=c.n_layers,
                                       ffn_mult=c.ffn_mult, dropout=c.dropout, experts=c.experts,
                                       attention_dropout=c.attention_dropout,
                                       max_positions=c.max_positions, **extra)
        if c.guided_attention > 0:
            self.backbone.collect_text_attention = True
        self._init_embeddings_and_heads()
        self.init_medusa_from_ar()
        logger.info("VALL-E %s (%s, d=%d, heads=%d, layers=%d): %.2fM parameters", c.kind, c.backbone,
                    c.d_model, c.n_heads, c.n_layers, self.num_parameters() / 1e6)

    def _init_embeddings_and_heads(self) -> None:
        for name, module in self.named_modules():
            if name.startswith("backbone"):
                continue  # the backbone initializes itself
            if isinstance(module, (nn.Embedding, nn.Linear)):
                nn.init.normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.text_emb.weight[0].zero_()
        nn.init.normal_(self.sep, std=0.02)

    @torch.no_grad()
    def init_medusa_from_ar(self) -> None:
        """Start every Medusa head as the AR head (its residual block at zero): also used when heads are
        added to an AR trained without them (`trainer.medusa_only`)."""
        for head in getattr(self, "medusa_heads", ()):
            nn.init.zeros_(head.block.weight)
            nn.init.zeros_(head.block.bias)
            head.out.weight.copy_(self.ar_head.weight)
            head.out.bias.copy_(self.ar_head.bias)

    def medusa_logits(self, h: Tensor) -> Tensor:
        """Hidden states [..., d] -> the heads' logits [..., K, n_codes + 1] ([..., K, G, n_codes + 1]
        with `ar_group` G > 1): head k (0-based) proposes the step k + 2 after the hidden's position."""
        heads = getattr(self, "medusa_heads", None)
        if heads is None:
            raise ValueError("this model has no Medusa heads (model.medusa_heads=0)")
        out = torch.stack([decode_linear(head.out, h + F.silu(head.block(h))) for head in heads], -2)
        G = self.config.ar_group
        return out if G == 1 else out.unflatten(-1, (G, -1))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if hasattr(self.backbone, "gradient_checkpointing"):
            self.backbone.gradient_checkpointing = enabled

    @property
    def device(self) -> torch.device:
        return self.sep.device

    # ------------------------------------------------------------------ sequence building

    def _prefix(self, text: Tensor, lang: Tensor, prompt: Tensor) -> Tensor:
        """[text] SEP [lang] SEP [prompt] SEP -> [N + Tp + 4, d]."""
        dev, sep = self.device, self.sep[None]
        return torch.cat([
            self.text_emb(text.to(dev).long()), sep,
            self.lang_emb(lang.to(dev).long().reshape(1)), sep,
            self.prompt_emb(prompt.to(dev)), sep,
        ])

    def _response(self, codes: Tensor, level: int) -> Tensor:
        """Response input for target `level`: codes [T, >= max(level, 1)] -> [T, d]."""
        codes = codes.to(self.device).long()
        if level == 0:
            if self.config.ar_group > 1:
                return self._ar_embed(self._ar_groups(codes[:, 0])[:-1])
            return self.ar_emb(codes[:, 0])
        return self.nar_emb(codes[:, :level]) + self.level_emb.weight[level - 1]

    @staticmethod
    def _pad(seqs: list[Tensor], left: bool = False) -> tuple[Tensor, Tensor]:
        """Stack [S_i, d] sequences into x [B, S, d] and valid Bool[B, S] (zeros at padding)."""
        S = max(s.shape[0] for s in seqs)
        x = seqs[0].new_zeros(len(seqs), S, seqs[0].shape[-1])
        valid = torch.zeros(len(seqs), S, dtype=torch.bool, device=x.device)
        for i, s in enumerate(seqs):
            sl = slice(S - len(s), S) if left else slice(0, len(s))
            x[i, sl] = s
            valid[i, sl] = True
        return x, valid

    def _text_flags(self, valid: Tensor, text: list[Tensor]) -> Tensor | None:
        """Bool[B, S]: which tokens are text (each sequence starts with its text, padding either
        side); None for models without text heads."""
        if not self.config.text_heads:
            return None
        index = valid.long().cumsum(-1) - 1  # position within the sample
        n = torch.tensor([len(t) for t in text], device=valid.device)[:, None]
        return valid & (index < n)

    def _mask(self, causal: Tensor, valid: Tensor, text: list[Tensor], resp_start: list[int] | None = None) -> Mask:
        """The attention pattern of a batch. `resp_start`: each sample's count of tokens before its
        response (the prefix length), which places the response frames for `text_head_rate`."""
        flags = self._text_flags(valid, text)
        text_pos = None
        c = self.config
        if flags is not None and c.text_head_rate > 0:
            index = (valid.long().cumsum(-1) - 1).float()
            rs = torch.tensor(resp_start if resp_start is not None else [1 << 30] * len(text),
                              device=valid.device, dtype=torch.float32)[:, None]
            step = torch.where(causal, float(c.ar_group), 1.0).to(valid.device)[:, None]
            text_pos = torch.where(flags, index * c.text_head_rate,
                                   torch.where(index >= rs, (index - rs) * step, torch.zeros_like(index)))
        return Mask(causal, valid, flags, text_pos)

    def _guided_attention_loss(self, attention: list[Tensor], targets: "_Targets", text: list[Tensor]) -> Tensor:
        """Mean over layers, samples and response rows of sum_n A[n] W[n], with A a text head's
        attention over the N phonemes and W = 1 - exp(-(n/N - j/R)^2 / (2 sigma^2)) for row j of R:
        the attention mass off the diagonal band, in [0, 1] whatever the text length."""
        dev = attention[0].device
        sample, rows = targets.sample.to(dev), targets.pos.to(dev)
        n_text = torch.tensor([len(t) for t in text], device=dev, dtype=torch.float32)
        counts = torch.bincount(sample, minlength=len(text))
        first = torch.cumsum(counts, 0) - counts  # targets are grouped by sample, in row order
        j = torch.arange(len(sample), device=dev) - first[sample]
        progress = (j.float() + 0.5) / counts[sample].float()  # [R]
        n_keys = attention[0].shape[-1]
        n = torch.arange(n_keys, device=dev, dtype=torch.float32)
        N = n_text[sample][:, None]
        sigma = self.config.guided_attention_sigma
        w = 1.0 - torch.exp(-(((n + 0.5) / N - progress[:, None]) ** 2) / (2 * sigma ** 2))
        w = torch.where(n < N, w, torch.zeros_like(w))  # [R, n_keys]
        per_row = torch.stack([(a[sample, :, rows] * w[:, None]).sum(-1).mean(-1) for a in attention]).mean(0)
        per_sample = torch.zeros(len(text), device=dev).index_add_(0, sample, per_row) / counts.clamp_min(1)
        return per_sample[counts > 0].mean()

    def _langs(self, lang: Tensor | None, batch_size: int) -> Tensor:
        if lang is None:
            return torch.zeros(batch_size, dtype=torch.long)
        return torch.as_tensor(lang).reshape(batch_size)

    def _ar_groups(self, codes0: Tensor) -> Tensor:
        """Level-0 codes Long[T] -> groups Long[ceil((T + 1) / G), G]: the codes, then STOP up to a
        whole group (at least one STOP)."""
        G, stop = self.config.ar_group, self.config.stop_id
        n = codes0.shape[0] + 1
        padded = F.pad(codes0, (0, (-n) % G + 1), value=stop)
        return padded.view(-1, G)

    def _ar_embed(self, groups: Tensor) -> Tensor:
        """Long[..., G] groups -> [..., d] (sum of each slot's embedding)."""
        return self.ar_emb(groups.long() + self.ar_offsets).sum(-2)

    def _head(self, h: Tensor, level: int) -> Tensor:
        return self.ar_head(h) if level == 0 else self.nar_heads[level - 1](h)

    # ------------------------------------------------------------------ training

    def sample_levels(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw each sample's target level: 0 = AR, k >= 1 = NAR (uniform over 1..n_levels-1)."""
        c = self.config
        if c.kind == "ar":
            return torch.zeros(batch_size, dtype=torch.long)
        nar = torch.randint(1, c.n_levels, (batch_size,), generator=generator)
        if c.kind == "nar":
            return nar
        p_ar = c.p_ar or 1.0 / c.n_levels  # 0 = uniform over the levels
        is_ar = torch.rand(batch_size, generator=generator) < p_ar
        return torch.where(is_ar, torch.zeros_like(nar), nar)

    def forward(self, batch: dict[str, Any], reduction: str = "mean") -> tuple[Tensor, dict[str, float]]:
        """Training loss for a batch.

        batch: text list[Long[N_i]], lang Long[B] (optional), prompt list[Long[Tp_i, L]],
        resps list[Long[T_i, n_levels]], levels Long[B] (optional; drawn when absent).
        Returns (loss, stats). reduction="mean": scalar loss = response CE (mean over tokens)
        + text_loss_weight * text CE + backbone aux loss. reduction="none": Float[B], each sample's
        mean response CE + text_loss_weight * its text CE (no aux loss).
        stats (floats): loss, nll, [text.nll], [aux], and for "ar" and "nar": tokens, nll, acc
        (top-1), acc10 (top-10); nll/acc/acc10 are left out when the batch has no such tokens.
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', not {reduction!r}")
        levels = self._target_levels(batch.get("levels"), len(batch["text"]))
        seqs, starts, resp_t, text_t = self._training_layout(batch, levels)
        x, valid = self._pad(seqs)
        out = self.backbone(x, self._mask((levels == 0).to(self.device), valid, batch["text"], starts))
        tok_level = levels[resp_t.sample]
        ce, top1, top10 = self._response_loss(out.hidden, resp_t, tok_level)
        values: dict[str, Tensor] = {"nll": ce.mean()}
        loss, per_sample = self._total_loss(values, ce, out, resp_t, text_t, batch["text"])
        if hasattr(self, "medusa_heads") and bool((levels == 0).any()):
            medusa = self._medusa_loss(out.hidden, resp_t, tok_level, values)
            loss = loss + self.config.medusa_loss_weight * medusa
            per_sample = per_sample + self.config.medusa_loss_weight * medusa.detach()
            values["loss"] = loss
        stats = self._stats(values, ce, top1, top10, tok_level)
        return (per_sample if reduction == "none" else loss), stats

    def _target_levels(self, levels: Any, batch_size: int) -> Tensor:
        """Each sample's target level, Long[B] on the CPU: the batch's own, checked, or drawn."""
        c = self.config
        if levels is None:
            return self.sample_levels(batch_size)
        levels = torch.as_tensor(levels).reshape(batch_size).cpu()
        for k in levels.tolist():
            if (k == 0 and not c.has_ar) or (k > 0 and not c.has_nar) or not 0 <= k < c.n_levels:
                raise ValueError(f"target level {k} is not valid for a {c.kind} model with {c.n_levels} levels")
        return levels

    def _response_loss(self, h: Tensor, resp_t: "_Targets", tok_level: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per response target: cross-entropy, and whether it is the top-1 and among the top-10 logits.
        Each level goes through its own head (with `ar_group` G > 1, a target reads its slot's logits)."""
        c, dev = self.config, self.device
        h_tok = h[resp_t.sample.to(dev), resp_t.pos.to(dev)]
        n = len(resp_t.target)
        ce = torch.zeros(n, device=dev)
        top1 = torch.zeros(n, dtype=torch.bool, device=dev)
        top10 = torch.zeros(n, dtype=torch.bool, device=dev)
        for k in tok_level.unique().tolist():
            idx = (tok_level == k).nonzero().squeeze(1).to(dev)
            logits = self._head(h_tok[idx], k).float()
            if k == 0 and c.ar_group > 1:
                sub = resp_t.sub[idx].to(dev)
                logits = logits.view(len(idx), c.ar_group, -1)[torch.arange(len(idx), device=dev), sub]
            t = resp_t.target[idx]
            ce[idx] = F.cross_entropy(logits, t, reduction="none")
            top = logits.topk(min(10, logits.shape[-1]), dim=-1).indices
            top1[idx] = top[:, 0] == t
            top10[idx] = (top == t[:, None]).any(-1)
        return ce, top1, top10

    def _medusa_loss(self, h: Tensor, resp_t: "_Targets", tok_level: Tensor, values: dict[str, Tensor]) -> Tensor:
        """Sum over heads k = 1..K of 0.8**(k-1) x head k's loss at each AR position (Medusa-1's
        weighting); positions whose shifted target is past the sequence's STOP are left out.

        By default head k's loss is the cross-entropy against the true code k steps after the AR head's,
        and `medusa{k}.nll` / `medusa{k}.acc` (top-1 against that code) are logged. With
        `medusa_distill` (Medusa-2's self-distillation) the target is instead the AR head's own
        distribution at that shifted position (same forward, same group slot, detached): the loss is
        KL(AR || head), logged as `medusa{k}.kl`; `medusa{k}.acc` is then the head's agreement with the
        AR head's argmax there (what greedy decoding accepts) and `medusa{k}.nll` is still the
        cross-entropy against the true code (not trained on)."""
        c, dev, G = self.config, self.device, self.config.ar_group
        ar = (tok_level == 0).nonzero().squeeze(1)  # AR targets: per sample in position order, G slots each
        sample, pos, target, sub = (t[ar] for t in (resp_t.sample, resp_t.pos, resp_t.target, resp_t.sub))
        h_tok = h[sample.to(dev), pos.to(dev)]
        rows = torch.arange(len(ar), device=dev)
        teacher = None
        if c.medusa_distill:  # the AR head's log-probabilities at every AR target (its own slot)
            with torch.no_grad():
                ar_logits = self._head(h_tok.detach(), 0).float()
                if G > 1:
                    ar_logits = ar_logits.view(len(ar), G, -1)[rows, sub.to(dev)]
                teacher = F.log_softmax(ar_logits, -1)
        total = h.new_zeros(())
        for k, head in enumerate(self.medusa_heads, start=1):
            shift = k * G  # the same slot k steps on: k * G targets later in the flat list
            if len(ar) <= shift:
                break
            keep = (sample[shift:] == sample[:-shift]).nonzero().squeeze(1).to(dev)
            if len(keep) == 0:
                continue
            logits = head(h_tok[keep]).float()
            if G > 1:
                logits = logits.view(len(keep), G, -1)[torch.arange(len(keep), device=dev), sub[keep.cpu()].to(dev)]
            t = target[shift:][keep.cpu()].to(dev)
            if teacher is None:
                loss = F.cross_entropy(logits, t)
                values[f"medusa{k}.nll"] = loss.detach()
                values[f"medusa{k}.acc"] = (logits.argmax(-1) == t).float().mean()
            else:
                p_log = teacher[shift:][keep]
                loss = F.kl_div(F.log_softmax(logits, -1), p_log, reduction="batchmean", log_target=True)
                values[f"medusa{k}.kl"] = loss.detach()
                values[f"medusa{k}.nll"] = F.cross_entropy(logits.detach(), t)
                values[f"medusa{k}.acc"] = (logits.argmax(-1) == p_log.argmax(-1)).float().mean()
            total = total + 0.8 ** (k - 1) * loss
        return total

    def _total_loss(self, values: dict[str, Tensor], ce: Tensor, out: BackboneOutput, resp_t: "_Targets",
                    text_t: "_Targets | None", text: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(the batch's loss, each sample's loss Float[B]): the response CE plus the text loss, the
        backbone's auxiliary loss and the guided-attention loss, each added to `values` as well."""
        c, dev, B = self.config, self.device, len(text)
        loss, per_sample = values["nll"], resp_t.per_sample_mean(ce, B)
        if text_t is not None:  # next-token loss on the text of AR samples
            logits = self.text_head(out.hidden[text_t.sample.to(dev), text_t.pos.to(dev)]).float()
            tce = F.cross_entropy(logits, text_t.target, reduction="none")
            loss = loss + c.text_loss_weight * tce.mean()
            per_sample = per_sample + c.text_loss_weight * text_t.per_sample_mean(tce, B)
            values["text.nll"] = tce.mean()
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
            values["aux"] = out.aux_loss
        if c.guided_attention > 0 and out.text_attention:
            ga = self._guided_attention_loss(out.text_attention, resp_t, text)
            loss = loss + c.guided_attention * ga
            values["ga"] = ga
        values["loss"] = loss
        return loss, per_sample

    @staticmethod
    def _stats(values: dict[str, Tensor], ce: Tensor, top1: Tensor, top10: Tensor,
               tok_level: Tensor) -> dict[str, float]:
        """`values` and the AR's and NAR's token count, nll and accuracies as floats (one device sync);
        a part without tokens in the batch reports only its count."""
        is_ar = (tok_level == 0).to(ce.device)
        for name, sel in (("ar", is_ar), ("nar", ~is_ar)):
            denom = sel.sum().clamp_min(1)
            values[f"{name}.tokens"] = sel.sum()
            values[f"{name}.nll"] = (ce * sel).sum() / denom
            values[f"{name}.acc"] = (top1 & sel).sum() / denom
            values[f"{name}.acc10"] = (top10 & sel).sum() / denom
        floats = torch.stack([v.detach().float().reshape(()) for v in values.values()]).tolist()  # one sync
        stats = dict(zip(values, floats))
        for name in ("ar", "nar"):
            if stats[f"{name}.tokens"] == 0:
                for key in ("nll", "acc", "acc10"):
                    del stats[f"{name}.{key}"]
        return stats

    def _training_layout(self, batch: dict[str, Any], levels: Tensor
                         ) -> tuple[list[Tensor], list[int], "_Targets", "_Targets | None"]:
        """Input sequences [S_i, d], their prefix lengths, and the (sample, position, target) lists for
        responses and text.

        AR (level 0): inputs are the level-0 codes; the last SEP predicts code 0, each code the next,
        the last code STOP. With `ar_group` G > 1 each position holds a group of G codes and predicts
        the next group (a position's G targets are listed in slot order, `sub` says which slot).
        NAR (level k): inputs are levels < k, targets level k at the same positions.
        """
        c, dev = self.config, self.device
        text, prompt, resps = batch["text"], batch["prompt"], batch["resps"]
        lang = self._langs(batch.get("lang"), len(text))
        seqs, starts, resp_t, text_t = [], [], _Targets(), _Targets()
        for i, k in enumerate(levels.tolist()):
            prefix = self._prefix(text[i], lang[i], prompt[i])
            P, codes = prefix.shape[0], resps[i].to(dev).long()
            starts.append(P)
            T = codes.shape[0]
            seqs.append(torch.cat([prefix, self._response(codes, k)]))
            if k == 0 and c.ar_group > 1:
                groups = self._ar_groups(codes[:, 0])
                n = groups.shape[0]
                resp_t.add(i, torch.arange(P - 1, P - 1 + n).repeat_interleave(c.ar_group), groups.flatten(),
                           sub=torch.arange(c.ar_group).repeat(n))
            elif k == 0:
                resp_t.add(i, torch.arange(P - 1, P + T), F.pad(codes[:, 0], (0, 1), value=c.stop_id))
                if hasattr(self, "text_head"):
                    ids = text[i].to(dev).long()
                    text_t.add(i, torch.arange(len(ids) - 1), ids[1:])
            else:
                resp_t.add(i, torch.arange(P, P + T), codes[:, k])
        return seqs, starts, resp_t.done(), (text_t.done() if text_t.samples else None)

    # ------------------------------------------------------------------ inference

    def _require(self, part: str) -> None:
        ok = self.config.has_ar if part == "ar" else self.config.has_nar
        if not ok:
            raise ValueError(f"a {self.config.kind} model has no {part.upper()} part")

    def ar_prefill(self, text: list[Tensor], lang: Tensor | None, prompt: list[Tensor],
                   max_length: int) -> tuple[Tensor, ARState]:
        """Start batched AR decoding: run the prefixes (left-padded so they all end at the same slot).

        max_length: the most response steps that will be fed back through `ar_step` (cache capacity
        beyond the longest prefix). Returns logits [B, n_codes + 1] for the first response frame
        ([B, G, n_codes + 1] for the first group with `ar_group` G > 1).
        """
        self._require("ar")
        B = len(text)
        lang = self._langs(lang, B)
        x, valid = self._pad([self._prefix(text[i], lang[i], prompt[i]) for i in range(B)], left=True)
        P = x.shape[1]
        capacity = P + max_length
        if getattr(self.backbone, "static_decode", False):  # a fixed-shape step: few capacities, few graphs
            capacity = self.backbone.static_capacity(capacity)
        valid_buf = torch.zeros(B, capacity, dtype=torch.bool, device=self.device)
        valid_buf[:, :P] = valid
        causal = torch.ones(B, dtype=torch.bool, device=self.device)
        lens = valid.sum(-1).tolist()
        mask = self._mask(causal, valid, text, [int(n) for n in lens])
        text_buf = pos_buf = None
        if mask.text is not None:
            text_buf = torch.zeros(B, capacity, dtype=torch.bool, device=self.device)
            text_buf[:, :P] = mask.text
        if mask.text_pos is not None:
            pos_buf = torch.zeros(B, capacity, device=self.device)
            pos_buf[:, :P] = mask.text_pos
        cache = self.backbone.new_cache(B, capacity, self.device, x.dtype)
        out = self.backbone(x, mask, cache=cache, use_cache=True)
        logits = self.ar_head(out.hidden[:, -1])
        if self.config.ar_group > 1:
            logits = logits.view(B, self.config.ar_group, -1)
        return logits, ARState(out.cache, valid_buf, P, causal, text_buf, pos_buf, P, out.hidden[:, -1])

    def ar_step(self, tokens: Tensor, state: ARState) -> tuple[Tensor, ARState]:
        """Feed one response frame per sample (Long[B] level-0 codes, or STOP) and get the logits for
        the next, [B, n_codes + 1]; with `ar_group` G > 1, one group per sample (Long[B, G]) and the
        next group's logits [B, G, n_codes + 1]."""
        self._require("ar")
        if state.length >= state.valid.shape[1]:
            raise RuntimeError(f"AR decoding ran past its capacity of {state.valid.shape[1]} positions")
        if self.config.ar_group > 1:
            x = self._ar_embed(tokens.to(self.device).long())[:, None]
        else:
            x = self.ar_emb(tokens.to(self.device).long())[:, None]
        state.valid[:, state.length] = True
        K = state.length + 1
        text_pos = None
        if state.text_pos is not None:
            state.text_pos[:, state.length] = float((state.length - state.prefix) * self.config.ar_group)
            text_pos = state.text_pos[:, :K]
        if getattr(state.cache, "static", False) and not torch.is_grad_enabled():  # the GPU decode path
            out = self.backbone.decode_static(x, state.valid, state.cache, state.text, state.text_pos)
        else:
            out = self.backbone(x, Mask(state.causal, state.valid[:, :K],
                                        None if state.text is None else state.text[:, :K], text_pos),
                                cache=state.cache, use_cache=True)
        state.cache = out.cache
        state.length += 1
        state.hidden = out.hidden[:, -1]
        logits = decode_linear(self.ar_head, state.hidden)
        if self.config.ar_group > 1:
            logits = logits.view(logits.shape[0], self.config.ar_group, -1)
        return logits, state

    def ar_verify(self, tokens: Tensor, state: ARState, steps: Tensor, tree: Tensor | None = None
                  ) -> tuple[Tensor, Tensor]:
        """Feed S response steps per sample in one forward pass (a chosen step and the Medusa heads'
        proposals after it): tokens Long[B, S] (Long[B, S, G] with `ar_group` G > 1). `steps` Long[B]:
        response steps each sample has kept so far (its text heads' positions; rows of a batch keep
        different counts). Returns the AR logits after each fed step, [B, S, n_codes + 1] ([B, S, G,
        n_codes + 1]), and the hidden states [B, S, d]. The cache holds all S; `ar_rollback` drops the
        rejected ones. `tree` Bool[S, S] (`Mask.block`): the S steps are a tree of candidates, step i
        following its ancestors (tree[i, j]) instead of every step before it; `ar_keep` then keeps one
        path of it."""
        self._require("ar")
        B, S = tokens.shape[:2]
        L = state.length
        if L + S > state.valid.shape[1]:
            raise RuntimeError(f"AR decoding ran past its capacity of {state.valid.shape[1]} positions")
        tokens = tokens.to(self.device).long()
        x = self._ar_embed(tokens) if self.config.ar_group > 1 else self.ar_emb(tokens)
        state.valid[:, L:L + S] = True
        text_pos = None
        if state.text_pos is not None:
            offsets = torch.arange(S, device=self.device) if tree is None else tree.to(self.device).sum(-1) - 1
            state.text_pos[:, L:L + S] = ((steps.to(self.device)[:, None] + offsets) * self.config.ar_group).float()
            text_pos = state.text_pos[:, :L + S]
        out = self.backbone(x, Mask(state.causal, state.valid[:, :L + S],
                                    None if state.text is None else state.text[:, :L + S], text_pos,
                                    None if tree is None else tree.to(self.device)),
                            cache=state.cache, use_cache=True)
        state.cache = out.cache
        state.length = L + S
        logits = decode_linear(self.ar_head, out.hidden.reshape(B * S, -1)).view(B, S, -1)  # a few rows
        if self.config.ar_group > 1:
            logits = logits.unflatten(-1, (self.config.ar_group, -1))
        return logits, out.hidden

    @classmethod
    def ar_keep(cls, state: ARState, start: int, slots: Tensor, hidden: Tensor | None = None) -> None:
        """Keep one path of a tree `ar_verify` fed at `start`: slots Long[B, n] (offsets from `start`,
        each row's path in order) move to start .. start + n - 1 in every layer's keys and values (and
        the text heads' positions), and the cache is cut after them (`ar_rollback`)."""
        n = slots.shape[1]
        if start + n > state.length or bool((slots >= state.length - start).any()):
            raise ValueError(f"ar_keep: slots past the {state.length - start} steps fed at {start}")
        cache = state.cache
        if isinstance(cache, KVCache):
            layers = list(zip(cache.k_layers, cache.v_layers))
        elif hasattr(cache, "layers") and all(hasattr(layer, "keys") for layer in cache.layers):
            layers = [(layer.keys, layer.values) for layer in cache.layers]  # transformers' DynamicCache
        else:
            raise UserError(f"Medusa's tree verification needs a KV cache whose slots it can move; the "
                            f"{type(cache).__name__} of this backbone cannot (leave medusa_tree empty)")
        for keys, values in layers:
            for t in (keys, values):
                B, H, _, Dh = t.shape
                index = slots.to(t.device).view(B, 1, n, 1).expand(B, H, n, Dh)
                t.narrow(2, start, n).copy_(t.narrow(2, start, state.length - start).gather(2, index))
        if state.text_pos is not None:
            tail = state.text_pos[:, start:state.length]
            state.text_pos[:, start:start + n] = tail.gather(1, slots.to(tail.device))
        cls.ar_rollback(state, start + n, hidden)

    @staticmethod
    def ar_rollback(state: ARState, length: int, hidden: Tensor | None = None) -> None:
        """Forget every cache slot from `length` on (the rejected proposals of `ar_verify`), so the next
        step writes there; `hidden` [B, d] becomes the state's last hidden state."""
        if length > state.length:
            raise ValueError(f"cannot roll the AR cache forward ({state.length} -> {length})")
        cache = state.cache
        if isinstance(cache, KVCache):
            cache.length = length
            cache.slot.fill_(length)  # the static (GPU) path's write position lives on the device
        elif hasattr(cache, "crop"):  # transformers' DynamicCache (llama, mixtral)
            if length < state.length:  # a negative count drops that many (transformers 5 takes nothing else)
                cache.crop(length - state.length)
            for attr in ("vall_e_length",):  # the llama backbone's own length counter
                if hasattr(cache, attr):
                    setattr(cache, attr, length)
        else:
            raise UserError(f"Medusa decoding needs a KV cache it can roll back; the {type(cache).__name__} "
                            "of this backbone cannot (use a transformer, bitnet, llama or mixtral backbone)")
        state.valid[:, length:state.length] = False
        state.length = length
        if hidden is not None:
            state.hidden = hidden

    @torch.no_grad()
    def text_alignment(self, text: Tensor, lang: Tensor | int, prompt: Tensor, codes0: Tensor) -> Tensor:
        """The text heads' attention (averaged over the heads) of every AR position over the text, with
        the level-0 codes `codes0` Long[T] teacher-forced: [n_layers, AR positions, N]. A model that
        reads has it on the diagonal. Needs text heads (transformer or bitnet)."""
        self._require("ar")
        if not self.config.text_heads:
            raise ValueError("text_alignment needs a model with text heads (model.text_heads >= 1)")
        prefix = self._prefix(text, torch.as_tensor(lang), prompt)
        seq = torch.cat([prefix, self._response(codes0.reshape(-1, 1), 0)])
        x, valid = self._pad([seq])
        mask = self._mask(torch.ones(1, dtype=torch.bool, device=self.device), valid, [text], [prefix.shape[0]])
        self.backbone.report_text_attention = True
        try:
            out = self.backbone(x, mask)
        finally:
            self.backbone.report_text_attention = False
        return torch.stack([a[0, :, prefix.shape[0] - 1:, :len(text)].mean(0) for a in out.text_attention])

    def ar_full(self, text: list[Tensor], lang: Tensor | None, prompt: list[Tensor],
                resps: list[Tensor]) -> list[Tensor]:
        """AR logits by full recomputation (no cache; the reference's way).

        resps: level-0 codes Long[T_i] (or [T_i, L], column 0 used). Returns [T_i + 1, n_codes + 1]
        per sample: row t predicts response frame t (the last row predicts the frame after T_i). With
        `ar_group` G > 1: [ceil((T_i + 1) / G), G, n_codes + 1], row t predicting group t.
        """
        self._require("ar")
        B = len(text)
        lang = self._langs(lang, B)
        seqs, starts = [], []
        for i in range(B):
            codes = resps[i] if resps[i].dim() == 2 else resps[i][:, None]
            prefix = self._prefix(text[i], lang[i], prompt[i])
            starts.append(prefix.shape[0] - 1)
            seqs.append(torch.cat([prefix, self._response(codes, 0)]))
        x, valid = self._pad(seqs)
        h = self.backbone(x, self._mask(torch.ones(B, dtype=torch.bool, device=self.device), valid, text,
                                        [s + 1 for s in starts])).hidden
        G = self.config.ar_group
        out = [self.ar_head(h[i, s:len(seq)]) for i, (s, seq) in enumerate(zip(starts, seqs))]
        return out if G == 1 else [o.view(o.shape[0], G, -1) for o in out]

    def nar_pass(self, text: list[Tensor], lang: Tensor | None, prompt: list[Tensor], resps: list[Tensor],
                 level: int) -> list[Tensor]:
        """Logits for code level `level` (>= 1) from levels 0..level-1 of resps [T_i, >= level], batched.

        Returns [T_i, n_codes] per sample (no STOP column).
        """
        self._require("nar")
        if not 1 <= level < self.config.n_levels:
            raise ValueError(f"NAR level must be in 1..{self.config.n_levels - 1}, not {level}")
        B = len(text)
        lang = self._langs(lang, B)
        seqs, starts = [], []
        for i in range(B):
            if resps[i].shape[1] < level:
                raise ValueError(f"sample {i}: {resps[i].shape[1]} levels given, level {level} needs {level}")
            prefix = self._prefix(text[i], lang[i], prompt[i])
            starts.append(prefix.shape[0])
            seqs.append(torch.cat([prefix, self._response(resps[i], level)]))
        x, valid = self._pad(seqs)
        h = self.backbone(x, self._mask(torch.zeros(B, dtype=torch.bool, device=self.device), valid, text,
                                        starts)).hidden
        head = self.nar_heads[level - 1]
        return [head(h[i, s:len(seq)]) for i, (s, seq) in enumerate(zip(starts, seqs))]

"""Medusa decoding: several AR steps per forward pass, with exactly the output of one step at a time.

A model with `model.medusa_heads` K has K small heads on the AR's last hidden state; head k proposes
the step k + 1 after the one the AR head predicts. A decoding step

1. picks the next step x0 from the AR's logits (or takes the correction the previous step left),
2. drafts K steps after it from the heads,
3. feeds [x0, draft 1..K] through the KV cache in ONE forward pass (`VALLE.ar_verify`): K + 1 sets of
   AR logits, the i-th conditioned on x0 and drafts 1..i-1,
4. verifies the drafts in order against those logits, one frame at a time with the same
   `DecodingConstraints` (penalties, STOP floor, caps, repeat guard) and `TokenSampler` settings as the
   one-step loop; it keeps the longest accepted prefix and rolls the cache back (`VALLE.ar_rollback`).

Exactness. Greedy: a draft frame is accepted when it is the argmax the one-step loop would take, and
the first mismatch is replaced by that argmax, so the codes are those of plain greedy decoding (up to
float rounding between a K + 1-position and a one-position forward pass). Sampling: exact speculative
sampling (Leviathan et al. 2023, Chen et al. 2023): a draft frame d drawn from the head's distribution
q is accepted with probability min(1, p(d) / q(d)), p being the distribution the one-step loop draws
from (`TokenSampler.distribution`, with the repeat guard's STOP folded in); on rejection the frame is
drawn from norm(max(0, p - q)). Every frame then has distribution p given the frames before it, so the
output distribution is unchanged (the tokens of a seeded run are not the same as the one-step loop's:
the draws are made differently).

With `ar_group` G > 1 a step is a group of G frames; frames are verified one by one, and after a
rejection the rest of that group is drawn from the same logits (they condition only on earlier groups).

Batches: rows accept different counts. The cache keeps the longest row's steps; the slots a shorter row
rejected are marked invalid for it (holes, like left padding), so its positions stay its own. Rows
therefore need up to K + 1 cache slots per step (batch 1 rolls back exactly and needs no more).

Not covered (the caller decodes one step at a time instead): beam search, mirostat (its state depends
on the draws), a rolling context (`max_ar_context`), and backbones whose cache cannot be rolled back
(retnet).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor

from vall_e.generation.constraints import DecodingConstraints
from vall_e.generation.sampling import PAD_ID, SamplingParams, TokenSampler, apply_length_penalty
from vall_e.utils.errors import UserError


@dataclass(frozen=True)
class MedusaTree:
    """A tree of candidate steps for greedy verification (Medusa's tree attention): node 0 is the step
    the AR picked, a node at depth d is one of head d's top candidate groups (ranked by joint
    log-probability of their G frames), nodes in breadth-first order.

    parent/depth/rank: Long[S] per node (the root is its own parent, depth 0); levels[d]: the node
    indices at depth d + 1; ranks[d]: their candidate ranks; widths[d]: head d's candidates used;
    block: Bool[S, S], node i's ancestors and itself (`Mask.block`)."""

    parent: Tensor
    depth: Tensor
    levels: tuple[Tensor, ...]
    ranks: tuple[Tensor, ...]
    widths: tuple[int, ...]
    block: Tensor

    @property
    def size(self) -> int:
        return int(self.parent.shape[0])

    def frame_offsets(self, group: int) -> Tensor:
        """Long[S * group]: frames before each frame of the step after each node (its depth's)."""
        return (self.depth[:, None] * group + torch.arange(group, device=self.depth.device)).flatten()


TREE_MAX_NODES = 256
TREE_MAX_DEPTH = 4  # model.medusa_heads is at most 4


def parse_tree(spec: str, heads: int, device: torch.device | str = "cpu") -> MedusaTree:
    """`medusa_tree` ("16x2,8,4") -> MedusaTree: one entry per depth, "W" (head d's top W candidates
    under each expanded node of the depth above) or "WxE" (and the best E of them are expanded to
    the next depth; E = 1 when left out). "16,8,4" is 16 + 8 + 4 candidates, 29 rows with the root."""
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    widths, expand = [], []
    for e in entries:
        w, _, x = e.lower().partition("x")
        if not w.isdigit() or (x and not x.isdigit()) or int(w) < 1 or (x and not 1 <= int(x) <= int(w)):
            raise UserError(f"medusa_tree={spec!r}: each depth is W or WxE (1 <= E <= W), e.g. 16x2,8,4")
        widths.append(int(w))
        expand.append(int(x) if x else 1)
    if not widths:
        raise UserError(f"medusa_tree={spec!r}: give the candidates per depth, e.g. 16,8,4")
    if len(widths) > heads:
        raise UserError(f"medusa_tree={spec!r} has {len(widths)} depths; the model has {heads} Medusa heads")
    parent, depth, rank = [0], [0], [0]
    frontier = [0]
    for d, (w, e) in enumerate(zip(widths, expand)):
        nxt = []
        for p in frontier:
            for r in range(w):
                parent.append(p)
                depth.append(d + 1)
                rank.append(r)
                if r < e:
                    nxt.append(len(parent) - 1)
        frontier = nxt
        if len(parent) > TREE_MAX_NODES:
            raise UserError(f"medusa_tree={spec!r}: more than {TREE_MAX_NODES} nodes")
    n = len(parent)
    block = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):  # breadth-first: a parent's row is complete before its children's
        block[i] |= block[parent[i]]
    par, dep, rk = (torch.tensor(v, device=device) for v in (parent, depth, rank))
    levels = tuple(torch.nonzero(dep == d + 1)[:, 0] for d in range(len(widths)))
    return MedusaTree(par, dep, levels, tuple(rk[lv] for lv in levels), tuple(widths), block.to(device))


def top_groups(log_probs: Tensor, n: int) -> Tensor:
    """The n most likely groups of G frames under independent per-frame log-probabilities [B, G, V]:
    Long[B, n, G], best first."""
    B, G, V = log_probs.shape
    top = log_probs.topk(min(n, V), -1)
    scores, groups = top.values[:, 0], top.indices[:, 0, :, None]
    for g in range(1, G):
        joint = (scores[:, :, None] + top.values[:, g, None, :]).flatten(1)
        scores, flat = joint.topk(min(n, joint.shape[1]), -1)
        k = top.values.shape[-1]
        groups = torch.cat([groups.gather(1, (flat // k)[..., None].expand(-1, -1, g)),
                            top.indices[:, g].gather(1, flat % k)[..., None]], -1)
    return groups


def medusa_unsupported(model: Any, params: SamplingParams) -> str | None:
    """Why `medusa_steps` cannot decode with these settings (None: it can)."""
    if not getattr(model.config, "medusa_heads", 0) or not hasattr(model, "medusa_heads"):
        return "the model has no Medusa heads"
    if not params.medusa:
        return "turned off (medusa=false)"
    if params.uses_beam:
        return "beam search decodes one step at a time"
    if params.uses_mirostat:
        return "mirostat's state depends on every draw"
    if params.max_ar_context and params.max_ar_context > 0:
        return "a rolling context (max_ar_context) is not supported with Medusa decoding"
    if model.config.backbone == "retnet":
        return "the retnet backbone's recurrent state cannot be rolled back"
    return None


def medusa_steps(model: Any, text_ids: list[Tensor], langs: Tensor, prompts: list[Tensor], params: SamplingParams,
                 rules: DecodingConstraints, stop_id: int, device: torch.device,
                 stats: dict[str, float] | None = None) -> Iterator[tuple[int, Tensor, Tensor]]:
    """The AR loop with Medusa heads, as a generator like `TTS.ar_steps`: it yields (frame, tokens[B],
    done[B]) after every frame it keeps (with B > 1, rows keep frames at different times: `tokens` holds
    the frame of the rows that took one) and returns the level-0 codes per sample.

    stats, when given, receives `passes` (forward passes after the prefill), `steps` (AR steps kept,
    summed over the rows that were still decoding) and `steps_per_pass` (steps a decoding row kept
    per pass, on average: 1 for one-step decoding)."""
    G, K = model.config.ar_group, model.config.medusa_heads
    B = len(text_ids)
    dev = device
    limit = rules.limit
    tree = parse_tree(params.medusa_tree, K, dev) if params.medusa_tree and params.greedy else None
    if tree is not None and max(tree.widths) > model.config.n_codes ** G:
        raise UserError(f"medusa_tree={params.medusa_tree!r}: more candidates per depth than the model has "
                        f"groups of codes ({model.config.n_codes ** G})")
    fed = K + 1 if tree is None else max(K + 1, tree.size)  # the most steps one pass feeds
    tree_offsets = None if tree is None else tree.frame_offsets(G)  # frames before each tree node's next step
    n_steps = -(-(limit + 1) // G) + 1
    capacity = (n_steps + 2) * (K + 1) + fed if B > 1 else n_steps + K + fed + 2
    logits, state = model.ar_prefill([t.to(dev) for t in text_ids], langs.to(dev), [p.to(dev) for p in prompts],
                                     max_length=capacity)
    sampler = TokenSampler(params, stop_id=stop_id, batch_size=B, device=dev)
    generator = torch.Generator(device=dev).manual_seed(sampler.seed)
    greedy = params.greedy
    M = rules.max_repeat_frames
    width = max(n_steps * G + (K + 2) * G, M, max(0, params.ras_window))
    hist = torch.full((B, width), PAD_ID, dtype=torch.long, device=dev)  # right-aligned: last frame at the end
    codes = torch.full((B, limit + 3), PAD_ID, dtype=torch.long, device=dev)  # the last column: a bin
    lengths = torch.zeros(B, dtype=torch.long, device=dev)  # live frames per row
    frames = torch.zeros(B, dtype=torch.long, device=dev)  # frames taken per row (STOP and after included)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    kept = torch.zeros(B, dtype=torch.long, device=dev)  # response steps in the cache per row
    stop = torch.full((B,), stop_id, dtype=torch.long, device=dev)
    pending = torch.zeros(B, G, dtype=torch.long, device=dev)  # a row's next step, when already chosen
    has_pending = torch.zeros(B, dtype=torch.bool, device=dev)
    window = max(0, params.ras_window)
    n_passes = n_kept = n_rows = 0
    bounds = [0, 0]  # the smallest and largest frame a row may be about to take in this step

    def target(frame_logits: Tensor) -> Tensor:
        """Probabilities [B, V] of the frame the one-step loop would take next in each row."""
        x = rules.process(frame_logits, hist if rules.needs_history else None, lengths, bounds[0], bounds[1])
        probs = sampler.distribution(x, hist[:, -window:] if window else None)
        if bounds[1] >= M:  # the repeat guard turns a looping code into STOP
            loop = rules.repeat_codes(hist, width)
            if loop is not None:
                rows = loop >= 0
                index = loop.clamp(min=0)[:, None]
                moved = torch.where(rows[:, None], probs.gather(-1, index), 0.0)
                probs = probs.scatter(-1, index, torch.where(rows[:, None], 0.0, probs.gather(-1, index)))
                probs[:, stop_id] += moved[:, 0]
        return torch.where(done[:, None], torch.nn.functional.one_hot(stop, probs.shape[-1]).to(probs.dtype), probs)

    def draw(probs: Tensor) -> Tensor:
        if greedy:
            return probs.argmax(-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    def commit(tokens: Tensor, rows: Tensor) -> None:
        """`rows` take `tokens` as their next frame (the bookkeeping of the one-step loop)."""
        nonlocal hist, lengths, done
        now_done = done | (tokens == stop_id)
        value = torch.where(now_done, torch.full_like(tokens, PAD_ID), tokens)
        hist = torch.where(rows[:, None], torch.cat([hist[:, 1:], value[:, None]], 1), hist)
        live = rows & ~now_done
        codes.scatter_(1, lengths[:, None], torch.where(live, tokens, codes.gather(1, lengths[:, None])[:, 0])[:, None])
        lengths = lengths + live.long()
        frames.add_(rows.long())
        done = torch.where(rows, now_done, done)

    def greedy_block(block: Tensor, offsets: Tensor | None = None) -> Tensor:
        """The one-step loop's greedy picks [B, n] for the logits [B, n, V] of the next n frames, frame j's
        conditioned on the frames before it being the drafted ones (the picks only count up to the first
        frame that differs from its draft). Only for `fast`: no processor reads the history there, so
        frame j's logits change only by its row's length. `offsets` Long[n]: frames before frame j
        (default j); given, the frames are groups of G of a tree, and STOP carries on within a group only."""
        n = block.shape[1]
        x = block.float()
        lens = lengths[:, None] + (torch.arange(n, device=dev) if offsets is None else offsets)  # live frames before frame j
        if params.length_penalty:
            x = apply_length_penalty(x.flatten(0, 1), lens.flatten(), stop_id, params.length_penalty).view_as(x)
        x = x.clone()
        x[..., stop_id] = torch.where(lens < rules.floor[:, None], -torch.inf, x[..., stop_id])
        best = x.argmax(-1)
        best = torch.where((lens >= rules.caps[:, None]) | done[:, None], stop_id, best)
        if offsets is not None:  # groups of a tree: after STOP only STOP, within each group
            after = (best == stop_id).view(B, -1, G).long().cumsum(2).view(B, n) > 0
            return torch.where(after, stop_id, best)
        return torch.where((best == stop_id).long().cumsum(1) > 0, stop_id, best)  # after STOP only STOP

    def commit_block(tokens: Tensor, counts: Tensor) -> None:
        """Row b takes tokens[b, :counts[b]] as its next frames (`commit` for a block at once)."""
        nonlocal hist, lengths, done
        n = tokens.shape[1]
        take = torch.arange(n, device=dev)[None] < counts[:, None]
        stopped = take & (tokens == stop_id)
        now_done = done[:, None] | (stopped.long().cumsum(1) > 0)  # done after frame j
        live = take & ~now_done
        value = torch.where(now_done, PAD_ID, tokens)
        hist = torch.cat([hist, value], 1).gather(1, torch.arange(width, device=dev)[None] + counts[:, None])
        pos = torch.where(live, lengths[:, None] + live.long().cumsum(1) - 1, codes.shape[1] - 1)
        codes.scatter_(1, pos, torch.where(live, tokens, PAD_ID))
        lengths = lengths + live.long().sum(1)
        frames.add_(counts)
        done = done | stopped.any(1)

    def fast() -> bool:
        """Whether this step can verify greedily in a few batched ops: no history-reading processor,
        and no row near the repeat guard (its trailing run of one code + this step's frames < M)."""
        if not greedy or rules.needs_history or sampler.banned_ids:
            return False
        last = hist[:, -1:]
        run = ((hist == last) & (last != PAD_ID)).flip(1).long().cumprod(1).sum(1)
        return int(torch.where(done, 0, run).max()) + (K + 1) * G < M

    while not bool(done.all()):
        bounds[0], bounds[1] = int(frames.min()), int(frames.max()) + (K + 1) * G
        batched = fast()
        # 1. the next step: the correction a row was left with, or picked from the AR's logits
        x0 = pending.clone()
        pick = ~has_pending
        if batched and bool(pick.any()):
            tok = greedy_block(logits.view(B, G, -1))
            x0 = torch.where(pick[:, None], tok, x0)
            before = frames.clone()
            commit_block(tok, torch.where(pick, G, 0))
            for g in range(G if B == 1 else 0):
                yield int(before[0]) + g, tok[:, g], done
        elif not batched:
            for g in range(G):
                if bool(pick.any()):
                    tok = draw(target(logits if G == 1 else logits[:, g]))
                    tok = torch.where(done, stop, tok)
                    x0[:, g] = torch.where(pick, tok, x0[:, g])
                    commit(tok, pick)
                    yield int(frames.max()) - 1, tok, done
        if bool(done.all()):
            break
        if tree is not None and batched:  # greedy over a tree of the heads' top candidates
            L = state.length
            lp = model.medusa_logits(state.hidden).float().view(B, K, G, -1).log_softmax(-1)
            nodes = torch.cat([top_groups(lp[:, d], w)[:, tree.ranks[d]] for d, w in enumerate(tree.widths)], 1)
            feed = torch.where(done[:, None, None], stop_id, torch.cat([x0[:, None], nodes], 1))  # [B, S, G]
            S = feed.shape[1]
            v_logits, v_hidden = model.ar_verify(feed if G > 1 else feed[..., 0], state, kept, tree.block)
            n_passes += 1
            was_live = ~done
            picks = greedy_block(v_logits.float().view(B, S * G, -1), tree_offsets).view(B, S, G)
            # a node is accepted when it is the pick after its parent and its parent is accepted
            acc = torch.cat([was_live[:, None], (feed[:, 1:] == picks[:, tree.parent[1:]]).all(-1)], 1)
            for level in tree.levels:
                acc[:, level] &= acc[:, tree.parent[level]]
            # at most one node per depth is accepted (siblings differ): the path, root first
            path = torch.zeros(B, len(tree.levels) + 1, dtype=torch.long, device=dev)
            for d, level in enumerate(tree.levels):
                hit = acc[:, level]
                path[:, d + 1] = torch.where(hit.any(1), level[hit.long().argmax(1)], 0)
            accepted = acc[:, 1:].sum(1)
            last = path.gather(1, accepted[:, None])  # the deepest accepted node (the root: none)
            steps_out = feed.gather(1, path[:, 1:, None].expand(B, path.shape[1] - 1, G))
            steps_out = torch.cat([steps_out, steps_out[:, :1]], 1)
            correction = picks.gather(1, last[:, :, None].expand(B, 1, G))
            steps_out.scatter_(1, accepted.view(B, 1, 1).expand(B, 1, G), correction)  # the path, then the pick after it
            counts = torch.where(was_live, (accepted + 1) * G, 0)
            before = frames.clone()
            commit_block(steps_out.view(B, -1), counts)
            for j in range(int(counts[0]) if B == 1 else 0):
                yield int(before[0]) + j, steps_out.view(B, -1)[:, j], done
            pending, has_pending = correction[:, 0], was_live.clone()
            keep = 1 + accepted
            longest = int(torch.where(was_live, keep, torch.ones_like(keep)).max())
            hidden = v_hidden.gather(1, last[:, :, None].expand(B, 1, v_hidden.shape[-1]))[:, 0]
            model.ar_keep(state, L, path[:, :longest], hidden)
            state.valid[:, L:L + longest] &= torch.arange(longest, device=dev)[None, :] < keep[:, None]
            logits = v_logits.view(B, S, G, -1).gather(1, last.view(B, 1, 1, 1).expand(B, 1, G, v_logits.shape[-1]))[:, 0]
            logits = logits if G > 1 else logits[:, 0]
            kept = kept + keep
            n_kept += int((keep * was_live).sum())
            n_rows += int(was_live.sum())
            continue
        # 2. drafts from the heads
        head_logits = model.medusa_logits(state.hidden).float()  # [B, K, (G,) V]
        head_logits = head_logits.view(B, K, G, -1)
        if greedy:
            drafts = head_logits.argmax(-1)  # [B, K, G]
            q = None
        else:
            q = sampler.distribution(head_logits.flatten(0, 2)).view(B, K, G, -1)
            drafts = torch.multinomial(q.flatten(0, 2), 1, generator=generator).view(B, K, G)
        feed = torch.cat([x0[:, None], drafts], 1)  # [B, K + 1, G]
        feed = torch.where(done[:, None, None], stop_id, feed)
        L = state.length
        # 3. one forward pass over x0 and the drafts
        v_logits, v_hidden = model.ar_verify(feed if G > 1 else feed[..., 0], state, kept)
        n_passes += 1
        v_logits = v_logits.float().view(B, K + 1, G, -1)
        # 4. verify the drafts in order
        was_live = ~done
        verifying = ~done
        accepted = torch.zeros(B, dtype=torch.long, device=dev)
        has_pending = torch.zeros(B, dtype=torch.bool, device=dev)
        if batched:  # greedy: every frame's pick at once, then the longest matching prefix per row
            picks = greedy_block(v_logits[:, :K].reshape(B, K * G, -1))
            match = (picks == drafts.view(B, K * G)).long().cumprod(1).sum(1)  # frames accepted
            accepted = torch.where(was_live, match // G, 0)
            has_pending = was_live & (match < K * G)
            # the rejected group is completed from the same logits: it becomes the next step
            end = torch.where(has_pending, (accepted + 1) * G, torch.where(was_live, K * G, 0))
            pending = torch.where(has_pending[:, None], picks.view(B, K, G).gather(
                1, accepted.clamp(max=K - 1).view(B, 1, 1).expand(B, 1, G))[:, 0], pending)
            before = frames.clone()
            commit_block(picks, end)
            for j in range(int(end[0]) if B == 1 else 0):
                yield int(before[0]) + j, picks[:, j], done
        for i in range(1, K + 1 if not batched else 1):
            if not bool(verifying.any()):
                break
            rejected = torch.zeros(B, dtype=torch.bool, device=dev)
            group = torch.zeros(B, G, dtype=torch.long, device=dev)
            for g in range(G):
                p = target(v_logits[:, i - 1, g])
                d = drafts[:, i - 1, g]
                if greedy:
                    best = p.argmax(-1)
                    ok, fix, fill = best == d, best, best
                else:
                    qi = q[:, i - 1, g]
                    pd, qd = p.gather(-1, d[:, None])[:, 0], qi.gather(-1, d[:, None])[:, 0]
                    u = torch.rand(B, generator=generator, device=dev, dtype=p.dtype)
                    ok = u * qd < pd
                    residual = (p - qi).clamp(min=0)
                    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
                    fix = torch.multinomial(residual, 1, generator=generator)[:, 0]
                    fill = draw(p)
                ok = ok | done  # a finished row's frames are STOP whatever was drafted
                fix = torch.where(done, stop, fix)
                tok = torch.where(rejected, fill, torch.where(ok, d, fix))
                tok = torch.where(done, stop, tok)
                rejected = rejected | (verifying & ~ok)
                group[:, g] = tok
                commit(tok, verifying)
                yield int(frames.max()) - 1, tok, done
            pending = torch.where((verifying & rejected)[:, None], group, pending)
            has_pending = has_pending | (verifying & rejected)
            accepted = accepted + (verifying & ~rejected).long()
            verifying = verifying & ~rejected & ~done  # a row that took STOP has nothing left to verify
        # 5. keep each row's accepted steps: the cache holds the longest row's, shorter rows get holes
        keep = 1 + accepted
        longest = int(torch.where(was_live, keep, torch.ones_like(keep)).max())
        slots = torch.arange(K + 1, device=dev)
        hole = (slots[None, :] >= keep[:, None]) & (slots[None, :] < longest)
        hidden = v_hidden.gather(1, accepted.view(B, 1, 1).expand(B, 1, v_hidden.shape[-1]))[:, 0]
        model.ar_rollback(state, L + longest, hidden)
        state.valid[:, L:L + longest] &= ~hole[:, :longest]
        logits = v_logits.gather(1, accepted.view(B, 1, 1, 1).expand(B, 1, G, v_logits.shape[-1]))[:, 0]
        logits = logits if G > 1 else logits[:, 0]
        kept = kept + keep
        n_kept += int((keep * was_live).sum())
        n_rows += int(was_live.sum())
    if stats is not None:
        stats.update(passes=n_passes, steps=n_kept, steps_per_pass=n_kept / max(n_rows, 1))
    return [codes[i, : int(lengths[i])].clone() for i in range(B)]

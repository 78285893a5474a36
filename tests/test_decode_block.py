"""The few-token decode block (`TransformerBackbone._decode_block`, a Medusa verification pass): the same
hidden states as the general forward and as full recomputation, with padding, holes in the cache, text
heads and grouped-query attention; and through the model, the logits one-step decoding gives."""
from __future__ import annotations

import pytest
import torch

from vall_e.models.backbones import transformer as tr
from vall_e.models.backbones.base import BackboneShape, Mask
from vall_e.models.backbones.transformer import TransformerBackbone

D = 32


def backbone(H: int = 4, kv: int = 0, text_heads: int = 0) -> TransformerBackbone:
    torch.manual_seed(0)
    return TransformerBackbone(BackboneShape(d_model=D, n_heads=H, n_layers=3, kv_heads=kv),
                               text_heads=text_heads).eval()


def sequence(B: int, n: int, seed: int = 0):
    """x [B, n, D]; valid with left padding of 0, 2, 4.. and holes (invalid slots in the middle, as a
    batched Medusa pass leaves for the proposals a row rejected); text: the first 6 valid slots."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, D, generator=g)
    valid = torch.ones(B, n, dtype=torch.bool)
    text = torch.zeros(B, n, dtype=torch.bool)
    for b in range(B):
        valid[b, : 2 * b] = False
        text[b, 2 * b: 2 * b + 6] = True
        if b % 2:
            valid[b, n - 9: n - 7] = False  # a hole in the cached part
    return x, valid, text


def run(model: TransformerBackbone, x, valid, text, P: int, block: bool):
    """Prefill all but the last P positions through the cache, then the last P at once."""
    B, n, _ = x.shape
    causal = torch.ones(B, dtype=torch.bool)
    tk = text if model.text_heads else None
    cache = model.new_cache(B, n + 4, x.device, x.dtype)
    with torch.inference_mode():
        model(x[:, : n - P], Mask(causal, valid[:, : n - P], None if tk is None else tk[:, : n - P]), cache=cache)
        rows = tr.BLOCK_ROWS
        tr.BLOCK_ROWS = rows if block else 1  # 1: the general forward
        try:
            out = model(x[:, n - P:], Mask(causal, valid, tk), cache=cache)
        finally:
            tr.BLOCK_ROWS = rows
    return out.hidden, cache


@pytest.mark.parametrize("H,kv,text_heads", [(4, 0, 0), (4, 0, 1), (4, 2, 0), (4, 2, 2)])
@pytest.mark.parametrize("P", [2, 4, 5])
def test_block_equals_the_general_forward_and_full_recompute(H, kv, text_heads, P):
    model = backbone(H, kv, text_heads)
    x, valid, text = sequence(3, 24)
    fast, c1 = run(model, x, valid, text, P, block=True)
    slow, c2 = run(model, x, valid, text, P, block=False)
    assert torch.allclose(fast, slow, atol=1e-5)
    n = x.shape[1]
    for a, b in zip(c1.k_layers + c1.v_layers, c2.k_layers + c2.v_layers):
        assert torch.allclose(a[:, :, :n], b[:, :, :n], atol=1e-5)
    assert c1.length == c2.length == n
    with torch.inference_mode():  # no cache: the whole sequence at once
        full = model(x, Mask(torch.ones(3, dtype=torch.bool), valid, text if text_heads else None)).hidden
    live = valid[:, -P:]
    assert torch.allclose(fast[live], full[:, -P:][live], atol=1e-5)


def test_block_is_taken_only_for_a_few_causal_tokens_on_a_cache(monkeypatch):
    model = backbone()
    calls = []
    real = model._decode_block
    monkeypatch.setattr(model, "_decode_block", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, valid, _ = sequence(2, 20)
    run(model, x, valid, None, 4, block=True)
    assert calls == [1]
    run(model, x, valid, None, tr.BLOCK_ROWS + 1, block=True)  # too many rows: the general forward
    assert calls == [1]
    with torch.no_grad():  # an empty cache (a prefill) and bidirectional samples take the general forward
        cache = model.new_cache(2, 30, x.device, x.dtype)
        model(x[:, :4], Mask(torch.ones(2, dtype=torch.bool), valid[:, :4]), cache=cache)
        model(x[:, 4:7], Mask(torch.zeros(2, dtype=torch.bool), valid[:, :7]), cache=cache)
    assert calls == [1]


@pytest.mark.parametrize("G,text_heads", [(1, 0), (2, 1)])
def test_verify_gives_the_logits_of_one_step_decoding_with_per_row_holes(G, text_heads):
    """Batch 3: a pass, a rollback keeping 4, 2 and 1 steps per row (holes for the shorter rows), then a
    second pass: its logits equal the one-step loop's (`ar_step`, the fused one-token path) fed the same
    kept steps, and the general forward's."""
    from vall_e.generation.tts import cpu_decode_layout
    from vall_e.models.valle import VALLE, VALLEConfig

    torch.manual_seed(0)
    kw = {"text_heads": text_heads, "text_head_rate": 2.0} if text_heads else {}
    model = VALLE(VALLEConfig(kind="ar+nar", d_model=D, n_heads=2, n_layers=2, n_text_tokens=40, n_codes=64,
                              n_levels=2, dropout=0.0, ar_group=G, medusa_heads=3, **kw)).eval()
    cpu_decode_layout(model)  # the layout decoding uses on the CPU (column-major wide weights)
    g = torch.Generator().manual_seed(3)
    B = 3
    texts = [torch.randint(1, 40, (5 + 3 * i,), generator=g) for i in range(B)]
    prompts = [torch.randint(0, 64, (8 + 2 * i, 2), generator=g) for i in range(B)]
    langs = torch.zeros(B, dtype=torch.long)
    feed1 = torch.randint(0, 64, (B, 4, G), generator=g)
    feed2 = torch.randint(0, 64, (B, 4, G), generator=g)
    keep = torch.tensor([4, 2, 1])

    def squeeze(t):
        return t if G > 1 else t[..., 0]

    def speculative(block: bool):
        rows = tr.BLOCK_ROWS
        tr.BLOCK_ROWS = rows if block else 1
        try:
            with torch.inference_mode():
                _, state = model.ar_prefill(texts, langs, prompts, max_length=20)
                L = state.length
                _, hidden = model.ar_verify(squeeze(feed1), state, torch.zeros(B, dtype=torch.long))
                model.ar_rollback(state, L + 4, hidden[:, -1])
                hole = torch.arange(4)[None] >= keep[:, None]
                state.valid[:, L:L + 4] &= ~hole
                logits, _ = model.ar_verify(squeeze(feed2), state, keep)
        finally:
            tr.BLOCK_ROWS = rows
        return logits

    fast, slow = speculative(True), speculative(False)
    assert torch.allclose(fast, slow, atol=1e-5)
    for b in range(B):  # each row alone, one step at a time
        with torch.inference_mode():
            _, state = model.ar_prefill(texts[b:b + 1], langs[b:b + 1], prompts[b:b + 1], max_length=20)
            steps = torch.cat([feed1[b, : int(keep[b])], feed2[b]])
            for j, s in enumerate(steps):
                logits, state = model.ar_step(squeeze(s[None]), state)
                if j >= int(keep[b]):
                    assert torch.allclose(logits[0], fast[b, j - int(keep[b])], atol=1e-5)

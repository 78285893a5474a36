"""The GPU decode path (static KV cache, fixed-shape step) checked on the CPU: it must decode the
codes the ordinary cached path decodes, and its compiled step what the eager one computes."""
from __future__ import annotations

import shutil

import pytest
import torch

from vall_e.config.model import resolve_dims
from vall_e.models.valle import VALLE, VALLEConfig

N_TEXT = 64
VARIANTS = {"plain": {}, "text_heads": {"text_heads": 2, "text_head_rate": 2.5},
            "gqa": {"kv_heads": 2}, "group": {"ar_group": 2}}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def tiny(**kw) -> VALLE:
    torch.manual_seed(0)
    d, h, l = resolve_dims("tiny")
    return VALLE(VALLEConfig(d_model=d, n_heads=h, n_layers=l, n_text_tokens=N_TEXT, dropout=0.0, **kw)).eval()


def greedy(model: VALLE, steps: int = 40) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy codes [B, steps] (STOP never picked) and the logits of every step, batch of 2 left-padded."""
    g = torch.Generator().manual_seed(7)
    text = [torch.randint(1, N_TEXT, (n,), generator=g) for n in (9, 17)]
    prompt = [torch.randint(0, 1024, (n, 8), generator=g) for n in (30, 12)]
    G = model.config.ar_group
    codes, seen = [], []
    with torch.inference_mode():
        logits, state = model.ar_prefill(text, torch.tensor([1, 0]), prompt, max_length=steps)
        for _ in range(steps):
            seen.append(logits)
            tok = logits[..., :1024].argmax(-1)
            codes.append(tok)
            logits, state = model.ar_step(tok, state)
    assert state.cache.static == model.backbone.static_decode
    return torch.stack(codes, 1).reshape(2, -1), seen


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_static_cache_decode_equals_the_dynamic_cache(variant):
    model = tiny(**VARIANTS[variant])
    want, want_logits = greedy(model)
    model.backbone.static_decode = True
    got, got_logits = greedy(model)
    assert torch.equal(got, want)
    for a, b in zip(got_logits, want_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert len(set(want.flatten().tolist())) > 5  # a real sequence
    # the static cache is reused for the next decode of the same shape (a captured graph keeps its addresses)
    cache = model.backbone.new_cache(2, 300, torch.device("cpu"), torch.float32)
    assert cache is model.backbone.new_cache(2, 300, torch.device("cpu"), torch.float32) and cache.length == 0


def test_static_step_rejects_a_full_cache_and_a_dynamic_cache():
    model = tiny()
    model.backbone.static_decode = True
    cache = model.backbone.new_cache(1, 4, torch.device("cpu"), torch.float32)
    x = torch.zeros(1, 1, model.config.d_model)
    valid = torch.ones(1, 4, dtype=torch.bool)
    with torch.inference_mode():
        for _ in range(4):
            model.backbone.decode_static(x, valid, cache)
        with pytest.raises(RuntimeError, match="full"):
            model.backbone.decode_static(x, valid, cache)
        model.backbone.static_decode = False
        with pytest.raises(ValueError, match="static cache"):
            model.backbone.decode_static(x, valid, model.backbone.new_cache(1, 4, torch.device("cpu"), torch.float32))


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("g++") and not shutil.which("c++"), reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_static_step_equals_eager():
    model = tiny(text_heads=2, text_head_rate=2.5)
    model.backbone.static_decode = True
    want, want_logits = greedy(model, steps=12)
    model.backbone.compile_decode(static=True)
    got, got_logits = greedy(model, steps=12)
    assert torch.equal(got, want)
    for a, b in zip(got_logits, want_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

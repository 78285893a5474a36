"""GPU checks (skipped without CUDA): every backbone's cached decoding on the GPU, bf16 training
steps, and bf16 inference through the model's AR/NAR API. Run on a lent GPU with
`python -m pytest tests/test_gpu.py tests/test_train.py -k "cuda or gpu" -q`."""
from __future__ import annotations

import time

import pytest
import torch

from vall_e.config.model import BACKBONES
from vall_e.models.valle import VALLE, VALLEConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model(backbone: str, d: int = 128, layers: int = 4, dtype=torch.float32) -> VALLE:
    torch.manual_seed(0)
    cfg = VALLEConfig(kind="ar+nar", d_model=d, n_heads=4, n_layers=layers, n_text_tokens=64, n_langs=2,
                      dropout=0.0, backbone=backbone, experts=4 if backbone == "mixtral" else 1)
    return VALLE(cfg).cuda().to(dtype).eval()


def _inputs(B: int = 2):
    g = torch.Generator().manual_seed(7)
    text = [torch.randint(1, 64, (n,), generator=g).cuda() for n in (9, 17)[:B]]
    prompt = [torch.randint(0, 1024, (n, 8), generator=g).cuda() for n in (30, 12)[:B]]
    return text, torch.tensor([1, 0][:B]).cuda(), prompt


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_gpu_cached_decoding_equals_full_recompute(backbone):
    model = _model(backbone)
    text, lang, prompt = _inputs()
    steps = 24
    with torch.no_grad():
        logits, state = model.ar_prefill(text, lang, prompt, max_length=steps)
        toks, cached = [], []
        for _ in range(steps):
            cached.append(logits)
            tok = logits[:, :1024].argmax(-1)
            toks.append(tok)
            logits, state = model.ar_step(tok, state)
        full_tokens = torch.zeros(2, 0, dtype=torch.long, device="cuda")
        worst = 0.0
        for t in range(steps):
            rows = model.ar_full(text, lang, prompt, list(full_tokens))
            full = torch.stack([r[-1] for r in rows])
            worst = max(worst, float((full - cached[t]).abs().max()))
            full_tokens = torch.cat([full_tokens, full[:, :1024].argmax(-1, keepdim=True)], 1)
    print(f"{backbone}: max |cached - full| logit difference on GPU (fp32, TF32 off) = {worst:.2e}")
    assert worst < 1e-3
    assert torch.equal(torch.stack(toks, 1), full_tokens)


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_gpu_bf16_training_steps_are_finite_and_learn(backbone):
    model = _model(backbone)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(3)
    batch = {"text": [torch.randint(1, 64, (20,), generator=g).cuda() for _ in range(4)],
             "lang": torch.zeros(4, dtype=torch.long).cuda(),
             "prompt": [torch.randint(0, 1024, (40, 8), generator=g).cuda() for _ in range(4)],
             "resps": [torch.randint(0, 1024, (60, 8), generator=g).cuda() for _ in range(4)]}
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model(batch)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    print(f"{backbone}: bf16 loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0]


def test_gpu_bf16_ar_decode_speed_cache_vs_recompute():
    """Report (not assert) cached vs full-recompute AR speed on the GPU in bf16 at the quarter size."""
    model = _model("transformer", d=256, layers=12, dtype=torch.bfloat16)
    text, lang, prompt = _inputs(1)
    n = 375
    with torch.no_grad():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits, state = model.ar_prefill(text, lang, prompt, max_length=n)
        for _ in range(n):
            logits, state = model.ar_step(logits[:, :1024].argmax(-1), state)
        torch.cuda.synchronize()
        cached = time.perf_counter() - t0
        t0 = time.perf_counter()
        toks = torch.zeros(1, 0, dtype=torch.long, device="cuda")
        for _ in range(n):
            row = model.ar_full(text, lang, prompt, list(toks))[0][-1]
            toks = torch.cat([toks, row[:1024].argmax(-1).view(1, 1)], 1)
        torch.cuda.synchronize()
        full = time.perf_counter() - t0
    print(f"GPU bf16 quarter AR, {n} tokens: cached {n / cached:.0f} tok/s, recompute {n / full:.0f} tok/s, "
          f"speed-up {full / cached:.1f}x")
    assert cached < full

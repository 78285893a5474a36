"""The VALL-E core: config, presets, AR/NAR masks, training loss, cached AR decoding, overfitting."""
from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F

from vall_e.config.model import PRESETS, resolve_dims
from vall_e.models.valle import VALLE, VALLEConfig
from vall_e.utils.errors import UserError

torch.set_num_threads(1)
N_TEXT = 64


def tiny(kind: str = "ar+nar", **kw) -> VALLE:
    torch.manual_seed(0)
    d, h, l = resolve_dims("tiny")
    kw.setdefault("dropout", 0.0)
    return VALLE(VALLEConfig(kind=kind, d_model=d, n_heads=h, n_layers=l, n_text_tokens=N_TEXT, **kw)).eval()


def random_sample(g: torch.Generator, n_text: int, n_prompt: int, n_resp: int):
    text = torch.randint(1, N_TEXT, (n_text,), generator=g)
    return text, torch.randint(0, 1024, (n_prompt, 8), generator=g), torch.randint(0, 1024, (n_resp, 8), generator=g)


def make_batch(samples, levels=None, lang=None) -> dict:
    batch = {"text": [s[0] for s in samples], "prompt": [s[1] for s in samples], "resps": [s[2] for s in samples]}
    if levels is not None:
        batch["levels"] = torch.tensor(levels)
    if lang is not None:
        batch["lang"] = torch.tensor(lang)
    return batch


# ---------------------------------------------------------------- config and presets


def test_config_round_trips_through_json_and_validates():
    cfg = VALLEConfig(kind="nar", d_model=64, n_heads=4, n_layers=2, p_ar=0.25, backbone_extra={"rope_base": 500.0})
    again = VALLEConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(UserError, match="kind"):
        VALLEConfig(kind="nar+ar")
    with pytest.raises(UserError, match="bogus"):
        VALLEConfig.from_dict({"bogus": 1})
    with pytest.raises(UserError, match="p_ar"):
        VALLEConfig(p_ar=1.5)


def test_presets_and_explicit_dimensions():
    assert resolve_dims("quarter") == (256, 4, 12)
    assert resolve_dims("half") == (512, 8, 12)
    assert resolve_dims("full") == (1024, 16, 12)
    assert resolve_dims("double") == (1024, 16, 24)
    assert resolve_dims("full", n_layers=6) == (1024, 16, 6)
    assert resolve_dims("tiny", d_model=128, n_heads=8) == (128, 8, PRESETS["tiny"][2])
    assert resolve_dims(0.5) == resolve_dims("0.5") == (512, 8, 12)  # docs/reference-differences.md #10: floats work
    d, h, l = resolve_dims(0.3)  # floor(1024 * 0.3) = 307 does not split into 4 heads: rounded down
    assert (h, l) == (4, 12) and d % (2 * h) == 0 and 300 <= d <= 307
    # docs/reference-differences.md #10: dicts work
    assert resolve_dims({"dim": 384, "heads": 6, "layers": 3}) == (384, 6, 3)
    for bad in ("huge", 0.01, {"depth": 3}):
        with pytest.raises(UserError):
            resolve_dims(bad)
    with pytest.raises(UserError, match="heads"):
        resolve_dims("full", n_heads=7)


def test_full_preset_parameter_count():
    d, h, l = resolve_dims("full")
    with torch.device("meta"):
        model = VALLE(VALLEConfig(d_model=d, n_heads=h, n_layers=l, n_text_tokens=256))
    n = model.num_parameters()
    print(f"\nfull ar+nar transformer (SwiGLU FFN): {n / 1e6:.1f}M parameters")
    backbone = sum(p.numel() for p in model.backbone.parameters())
    # per layer: qkv 3d^2, out d^2 + d, gated FFN 3 x 4d^2 (no biases), two LayerNorms 4d; final LayerNorm 2d
    assert backbone == l * (16 * d * d + 5 * d) + 2 * d
    assert 180e6 <= n <= 260e6, n


def test_kv_heads_default_keeps_the_parameter_count_and_groups_shrink_the_cache():
    """model.kv_heads defaults to n_heads: the presets build what they built before (qkv 3 d^2 per
    layer); kv_heads = n_heads / 4 drops 2 x 3/4 d^2 per layer from the projection and shrinks the KV cache 4x."""
    d, h, l = resolve_dims("quarter")
    counts = {}
    for kv in (0, h, h // 4):
        with torch.device("meta"):
            m = VALLE(VALLEConfig(d_model=d, n_heads=h, n_layers=l, n_text_tokens=256, kv_heads=kv))
        counts[kv] = sum(p.numel() for p in m.backbone.parameters())
        if kv == h // 4:
            cache = m.backbone.new_cache(2, 10, torch.device("meta"), torch.float32)
            assert cache.k_layers[0].shape == (2, h // 4, 10, d // h)
    assert counts[0] == counts[h] == l * (16 * d * d + 5 * d) + 2 * d
    assert counts[0] - counts[h // 4] == l * 2 * (d * d - d * d // 4)
    assert VALLEConfig().kv_heads == 0
    for bad, match in (({"kv_heads": 3}, "divide"), ({"kv_heads": 2, "backbone": "retnet"}, "retnet"),
                       ({"n_heads": 4, "kv_heads": 2, "text_heads": 1, "d_model": 64}, "multiple")):
        with pytest.raises(UserError, match=match):
            VALLEConfig(**bad)


def test_gelu_ffn_option_parameter_count():
    d, h, l = resolve_dims("full")
    with torch.device("meta"):
        model = VALLE(VALLEConfig(d_model=d, n_heads=h, n_layers=l, n_text_tokens=256, ffn="gelu"))
    backbone = sum(p.numel() for p in model.backbone.parameters())
    # per layer: qkv 3d^2, out d^2 + d, FFN 8d^2 + 5d, two LayerNorms 4d; then the final LayerNorm 2d
    assert backbone == l * (12 * d * d + 10 * d) + 2 * d
    print(f"\nfull ar+nar transformer (GELU FFN): {model.num_parameters() / 1e6:.1f}M parameters")
    with pytest.raises(UserError):
        VALLEConfig(ffn="relu")


# ---------------------------------------------------------------- masks


def test_ar_is_causal():
    model = tiny()
    g = torch.Generator().manual_seed(1)
    text, prompt, resps = random_sample(g, 12, 20, 30)
    t = 14
    changed = resps.clone()
    changed[t + 1:] = torch.randint(0, 1024, changed[t + 1:].shape, generator=g)
    with torch.no_grad():
        a = model.ar_full([text], None, [prompt], [resps[:, 0]])[0]
        b = model.ar_full([text], None, [prompt], [changed[:, 0]])[0]
    # row j predicts frame j from frames < j: rows <= t + 1 only see frames <= t
    assert torch.allclose(a[:t + 2], b[:t + 2], atol=1e-6)
    assert not torch.allclose(a[t + 2:], b[t + 2:], atol=1e-3)


def test_nar_is_bidirectional():
    model = tiny()
    g = torch.Generator().manual_seed(2)
    text, prompt, resps = random_sample(g, 12, 20, 30)
    changed = resps.clone()
    changed[25:, :3] = (changed[25:, :3] + 1) % 1024
    with torch.no_grad():
        a = model.nar_pass([text], None, [prompt], [resps], level=3)[0]
        b = model.nar_pass([text], None, [prompt], [changed], level=3)[0]
    assert a.shape == (30, 1024)  # no STOP column at NAR outputs
    assert not torch.allclose(a[:5], b[:5], atol=1e-4)  # later frames changed earlier logits


# ---------------------------------------------------------------- training forward


@pytest.mark.parametrize("heads", [{}, {"text_heads": 1}], ids=["plain", "text_heads"])
def test_mixed_batch_equals_samples_one_at_a_time(heads):
    model = tiny(text_loss_weight=0.5, n_langs=3, **heads)
    g = torch.Generator().manual_seed(3)
    samples = [random_sample(g, n, p, r) for n, p, r in ((9, 20, 30), (15, 12, 44), (6, 30, 17), (12, 25, 38))]
    levels, langs = [0, 3, 7, 0], [2, 0, 1, 1]
    with torch.no_grad():
        together, stats = model(make_batch(samples, levels, langs), reduction="none")
        alone = torch.cat([model(make_batch([s], [k], [la]), reduction="none")[0]
                           for s, k, la in zip(samples, levels, langs)])
    assert torch.allclose(together, alone, rtol=1e-5, atol=1e-5), (together, alone)
    assert stats["ar.tokens"] == 31 + 39 and stats["nar.tokens"] == 44 + 17
    for key in ("loss", "nll", "text.nll", "ar.nll", "ar.acc", "ar.acc10", "nar.nll", "nar.acc", "nar.acc10"):
        assert isinstance(stats[key], float)


@pytest.mark.parametrize("heads", [{}, {"text_heads": 1}], ids=["plain", "text_heads"])
def test_training_loss_matches_the_inference_paths(heads):
    """The AR target is next-frame with STOP at the end; the NAR target is level k at the same frames."""
    model = tiny(**heads)
    g = torch.Generator().manual_seed(4)
    samples = [random_sample(g, 10, 15, 20), random_sample(g, 7, 11, 26)]
    with torch.no_grad():
        per_sample, stats = model(make_batch(samples, [0, 5]), reduction="none")
        text, prompt, resps = zip(*samples)
        ar = model.ar_full([text[0]], None, [prompt[0]], [resps[0][:, 0]])[0]
        nar = model.nar_pass([text[1]], None, [prompt[1]], [resps[1]], level=5)[0]
    ar_target = torch.cat([resps[0][:, 0], torch.tensor([1024])])  # STOP = n_codes
    assert torch.allclose(per_sample[0], F.cross_entropy(ar, ar_target), atol=1e-5)
    assert torch.allclose(per_sample[1], F.cross_entropy(nar, resps[1][:, 5]), atol=1e-5)
    mean = (F.cross_entropy(ar, ar_target, reduction="sum") + F.cross_entropy(nar, resps[1][:, 5], reduction="sum")) / 47
    assert abs(stats["nll"] - mean.item()) < 1e-4 and stats["loss"] == stats["nll"]


def test_nar_inputs_carry_the_target_level():
    """The NAR input has a learned embedding of the target level (the reference has none)."""
    model = tiny().train()
    g = torch.Generator().manual_seed(8)
    loss, _ = model(make_batch([random_sample(g, 8, 10, 20), random_sample(g, 9, 12, 18)], [2, 6]))
    loss.backward()
    used = model.level_emb.weight.grad.abs().sum(-1) > 0  # row k-1 = level k
    assert used.tolist() == [False, True, False, False, False, True, False]


def test_level_sampling():
    model = tiny()
    torch.manual_seed(5)
    levels = model.sample_levels(8000)
    assert abs((levels == 0).float().mean().item() - 1 / 8) < 0.02  # uniform by default
    assert set(levels.tolist()) == set(range(8))
    model = tiny(p_ar=0.5)
    assert abs((model.sample_levels(8000) == 0).float().mean().item() - 0.5) < 0.03
    assert (tiny("ar").sample_levels(100) == 0).all()
    nar_levels = tiny("nar").sample_levels(1000)
    assert nar_levels.min() == 1 and nar_levels.max() == 7


@pytest.mark.parametrize("kind", ["ar", "nar"])
def test_split_kinds_train(kind):
    model = tiny(kind).train()
    g = torch.Generator().manual_seed(6)
    batch = make_batch([random_sample(g, 8, 10, 20), random_sample(g, 11, 14, 15)])
    loss, stats = model(batch)  # levels drawn by kind
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.backbone.parameters())
    other = "nar" if kind == "ar" else "ar"
    assert stats[f"{other}.tokens"] == 0 and f"{other}.nll" not in stats and stats[f"{kind}.tokens"] > 0
    with pytest.raises(ValueError):
        model(dict(batch, levels=torch.tensor([1, 1] if kind == "ar" else [0, 0])))
    if kind == "ar":
        assert not hasattr(model, "nar_heads")
        with pytest.raises(ValueError, match="no NAR"):
            model.nar_pass(batch["text"], None, batch["prompt"], batch["resps"], 1)
    else:
        assert not hasattr(model, "ar_head")
        with pytest.raises(ValueError, match="no AR"):
            model.ar_prefill(batch["text"], None, batch["prompt"], 10)


# ---------------------------------------------------------------- cached AR decoding


@pytest.mark.parametrize("heads", [{}, {"text_heads": 1},
                                   {"kv_heads": 2, "text_heads": 2, "text_head_rate": 3.0, "ar_group": 1},
                                   {"kv_heads": 1, "backbone": "llama"}],
                         ids=["plain", "text_heads", "gqa_text_heads", "gqa_llama"])
def test_cached_greedy_decoding_equals_full_recompute(heads):
    model = tiny(n_langs=2, **heads)
    g = torch.Generator().manual_seed(7)
    text = [torch.randint(1, N_TEXT, (n,), generator=g) for n in (9, 17)]
    prompt = [torch.randint(0, 1024, (n, 8), generator=g) for n in (30, 12)]
    lang = torch.tensor([1, 0])
    steps = 50
    with torch.no_grad():
        logits, state = model.ar_prefill(text, lang, prompt, max_length=steps)
        cached_tokens, cached_logits = [], []
        for _ in range(steps):
            cached_logits.append(logits)
            tok = logits[:, :1024].argmax(-1)  # STOP banned so all 50 frames are decoded
            cached_tokens.append(tok)
            logits, state = model.ar_step(tok, state)
        cached_tokens = torch.stack(cached_tokens, 1)

        full_tokens = torch.zeros(2, 0, dtype=torch.long)
        for t in range(steps):
            rows = model.ar_full(text, lang, prompt, list(full_tokens))
            full = torch.stack([r[-1] for r in rows])
            assert torch.allclose(full, cached_logits[t], atol=1e-4), (t, (full - cached_logits[t]).abs().max())
            full_tokens = torch.cat([full_tokens, full[:, :1024].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached_tokens, full_tokens)
    assert len(set(cached_tokens.flatten().tolist())) > 5  # a real sequence, not one repeated code
    with pytest.raises(RuntimeError):
        model.ar_step(cached_tokens[:, -1], state)  # capacity of 50 frames used up


# ---------------------------------------------------------------- overfitting


def structured_corpus(n_levels: int = 8, n_codes: int = 1024):
    """4 utterances (75-150 frames) whose codes follow a deterministic, speech-like rule.

    Each phoneme spans a run of frames; the level-0 code depends on the phoneme and the frame within
    it, and level k is a fixed scramble of level k-1 and the phoneme (as a residual quantizer's levels
    depend on the ones before).
    """
    g = torch.Generator().manual_seed(1234)

    def codes_for(text: torch.Tensor, T: int, offset: int) -> torch.Tensor:
        phone_idx = torch.arange(T) * len(text) // T
        phone = text[phone_idx]
        within = torch.arange(T) - torch.searchsorted(phone_idx, phone_idx)
        levels = [(phone * 37 + within * 11 + offset) % n_codes]
        for k in range(1, n_levels):
            levels.append((levels[-1] * 173 + 29 * k + phone) % n_codes)
        return torch.stack(levels, -1)

    utterances = []
    for T in (75, 100, 125, 150):
        text = torch.randint(3, N_TEXT, (T // 5,), generator=g)
        text[0], text[-1] = 1, 2  # <s> ... </s>
        prompt = codes_for(torch.randint(3, N_TEXT, (15,), generator=g), 75, 5)
        utterances.append((text, prompt, codes_for(text, T, 0)))
    return utterances


def test_tiny_model_overfits_a_fixed_batch():
    model = tiny().train()
    utterances = structured_corpus()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, betas=(0.9, 0.98), weight_decay=0.0)
    # evaluation: every utterance at every level, levels forced, dropout off
    eval_batch = make_batch(utterances * 8, [k for k in range(8) for _ in utterances])

    start, stats = time.time(), {}
    for step in range(1, 301):
        # every (utterance, level) pair once per 8 steps, 8 samples per step
        loss, _ = model(make_batch(utterances + utterances, [(step + i) % 8 for i in range(8)]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 40 and step % 10 == 0:
            with torch.no_grad():
                stats = model.eval()(eval_batch)[1]
            model.train()
            if stats["ar.acc"] >= 0.95 and stats["nar.acc"] >= 0.95:
                break
    print(f"\noverfit: step {step}, {time.time() - start:.1f}s, AR acc {stats['ar.acc']:.3f}, NAR acc {stats['nar.acc']:.3f}")
    assert stats["ar.acc"] >= 0.95 and stats["nar.acc"] >= 0.95, (step, stats)

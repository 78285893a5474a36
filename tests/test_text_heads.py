"""Text heads and the guided-attention loss: masks, what the heads can see, the loss, decoding, config."""
from __future__ import annotations

import pytest
import torch

from vall_e.models.backbones.base import BackboneShape, Mask
from vall_e.models.backbones.transformer import Attention, TransformerBackbone
from vall_e.config.model import resolve_dims
from vall_e.models.valle import VALLE, VALLEConfig, _Targets
from vall_e.utils.errors import UserError

torch.set_num_threads(1)
N_TEXT = 64


def tiny(**kw) -> VALLE:
    torch.manual_seed(0)
    d, h, l = resolve_dims("tiny")
    kw.setdefault("dropout", 0.0)
    return VALLE(VALLEConfig(d_model=d, n_heads=h, n_layers=l, n_text_tokens=N_TEXT, **kw))


def test_text_head_mask():
    """Text queries keep their usual (causal / bidirectional) pattern; every other query sees only the
    valid text keys; padding is never seen; no row is left empty."""
    # sample 0: right-padded, 3 text + 3 other tokens + 2 padding; sample 1: left-padded, 2 pad + 2 text + 4 other
    valid = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    text = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    mask = Mask(causal=torch.tensor([True, False]), valid=valid, text=text)
    allowed = mask.text_head_bias(8)[:, 0]
    normal = mask.attention_bias(8)[:, 0]
    assert torch.equal(allowed[0, :3], normal[0, :3])  # text rows: causal as usual
    for row in range(3, 8):
        assert allowed[0, row].tolist() == [True, True, True, False, False, False, False, False]
    assert torch.equal(allowed[1, 2:4], normal[1, 2:4])  # text rows of the NAR sample: bidirectional
    for row in range(4, 8):
        assert allowed[1, row].tolist() == [False, False, True, True, False, False, False, False]
    assert bool(allowed.any(-1).all())
    # the last S queries only (a decode step against a cache)
    assert torch.equal(mask.text_head_bias(1)[:, 0, 0], allowed[:, -1])
    with pytest.raises(ValueError):
        Mask(causal=mask.causal, valid=valid).text_head_bias(8)


def test_text_head_output_depends_only_on_the_text():
    """With the other heads' output projection zeroed, an audio row's attention output does not
    change when other audio tokens change, and does change when the text changes."""
    torch.manual_seed(0)
    attn = Attention(d_model=32, n_heads=4, dropout=0.0, text_heads=1).eval()
    with torch.no_grad():
        attn.out.weight[:, 8:] = 0  # only head 0 (the text head) reaches the output
    bb = TransformerBackbone(BackboneShape(32, 4, 1))
    S, N = 10, 4
    valid = torch.ones(1, S, dtype=torch.bool)
    text = torch.zeros(1, S, dtype=torch.bool)
    text[0, :N] = True
    mask = Mask(causal=torch.tensor([True]), valid=valid, text=text)
    cos, sin = bb.rotary.lookup(mask.positions(S), S, torch.float32)
    cos, sin = cos[:, None, None], sin[:, None, None]
    bias = bb._bias(mask.attention_bias(S), torch.float32)
    tbias = bb._bias(mask.text_head_bias(S), torch.float32)
    x = torch.randn(1, S, 32)
    with torch.no_grad():
        base = attn(x, cos, sin, bias, False, None, 0, tbias)
        other_audio = x.clone()
        other_audio[0, 6] += 1.0
        changed_audio = attn(other_audio, cos, sin, bias, False, None, 0, tbias)
        other_text = x.clone()
        other_text[0, 1] += 1.0
        changed_text = attn(other_text, cos, sin, bias, False, None, 0, tbias)
        without = attn(other_audio, cos, sin, bias, False, None, 0, None)  # plain attention, for contrast
        plain = attn(x, cos, sin, bias, False, None, 0, None)
    rows = [r for r in range(N, S) if r != 6]  # row 6's own query changed
    assert torch.allclose(base[0, rows], changed_audio[0, rows], atol=1e-6)
    assert not torch.allclose(base[0, N:], changed_text[0, N:], atol=1e-4)
    assert not torch.allclose(plain[0, 7:], without[0, 7:], atol=1e-4)  # unmasked, later rows would see it


def test_guided_attention_loss_prefers_the_diagonal():
    model = tiny(text_heads=1, guided_attention=1.0)
    N, R = 6, 12
    text = [torch.arange(1, N + 1)]
    targets = _Targets()
    targets.add(0, torch.arange(10, 10 + R), torch.zeros(R, dtype=torch.long))
    targets.done()

    def attention(column_of_row):
        a = torch.zeros(1, 1, 10 + R, N)
        for j in range(R):
            a[0, 0, 10 + j, column_of_row(j)] = 1.0
        return [a]

    diagonal = model._guided_attention_loss(attention(lambda j: j * N // R), targets, text)
    reverse = model._guided_attention_loss(attention(lambda j: N - 1 - j * N // R), targets, text)
    uniform = model._guided_attention_loss([torch.full((1, 1, 10 + R, N), 1.0 / N)], targets, text)
    assert 0 <= float(diagonal) < float(uniform) < float(reverse) <= 1.0
    # by hand for the diagonal: sum_n A W over rows (the attention mass off the band), averaged
    j = torch.arange(R)
    n = j * N // R
    w = 1 - torch.exp(-(((n + 0.5) / N - (j + 0.5) / R) ** 2) / (2 * 0.2 ** 2))
    assert abs(float(diagonal) - float(w.mean())) < 1e-6


def test_guided_attention_trains_the_text_heads_toward_the_diagonal():
    model = tiny(text_heads=1, guided_attention=1.0).train()
    g = torch.Generator().manual_seed(0)
    batch = {"text": [torch.randint(1, N_TEXT, (n,), generator=g) for n in (12, 20)],
             "prompt": [torch.randint(0, 1024, (n, 8), generator=g) for n in (15, 10)],
             "resps": [torch.randint(0, 1024, (n, 8), generator=g) for n in (40, 60)],
             "levels": torch.tensor([0, 3])}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        loss, stats = model(batch)
        first = stats["ga"] if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert "ga" in stats and stats["loss"] > stats["nll"]
    assert stats["ga"] < 0.7 * first, (first, stats["ga"])


def test_text_head_settings_are_checked():
    with pytest.raises(UserError):
        VALLEConfig(d_model=64, n_heads=4, text_heads=4)
    with pytest.raises(UserError):
        VALLEConfig(d_model=64, n_heads=4, backbone="llama", text_heads=1)
    with pytest.raises(UserError):
        VALLEConfig(d_model=64, n_heads=4, guided_attention=1.0)  # no text heads to guide
    cfg = VALLEConfig(d_model=64, n_heads=4, text_heads=1, guided_attention=0.5)
    assert VALLEConfig.from_dict(cfg.to_dict()) == cfg
    assert VALLEConfig.from_dict({k: v for k, v in cfg.to_dict().items()
                                  if not k.startswith(("text_heads", "guided"))}).text_heads == 0  # older exports
    with pytest.raises(ValueError):
        TransformerBackbone(BackboneShape(64, 4, 1), text_heads=1)(
            torch.zeros(1, 3, 64), Mask(torch.tensor([True]), torch.ones(1, 3, dtype=torch.bool)))


def test_guided_attention_refuses_gradient_checkpointing():
    model = tiny(text_heads=1, guided_attention=1.0).train()
    model.set_gradient_checkpointing(True)
    g = torch.Generator().manual_seed(0)
    batch = {"text": [torch.randint(1, N_TEXT, (8,), generator=g)], "prompt": [torch.randint(0, 1024, (5, 8), generator=g)],
             "resps": [torch.randint(0, 1024, (9, 8), generator=g)], "levels": torch.tensor([0])}
    with pytest.raises(UserError, match="gradient checkpointing"):
        model(batch)
    model.config.guided_attention = 0.0
    model.backbone.collect_text_attention = False
    loss, _ = model(batch)  # text heads alone work with checkpointing
    loss.backward()


def test_engine_with_text_heads_batches_and_beams(tmp_path, tiny_encodec_dir):
    """Exported and loaded through the engine: a batch decodes what each text decodes alone (greedy,
    left padding with text flags), and beam search reorders the text flags with the cache."""
    from dataclasses import replace

    from tests.conftest import export_tiny_model
    from vall_e.generation.sampling import SamplingParams
    from vall_e.generation.settings import GenerationSettings
    from vall_e.generation.tts import TTS
    from vall_e.text.phonemes import phonemize
    from vall_e.text.symmap import Symmap

    texts = ["Hello there.", "The quick brown fox jumps over the lazy dog."]
    symmap = Symmap.build([phonemize(t) for t in texts])
    cfg = VALLEConfig(kind="ar+nar", d_model=32, n_heads=2, n_layers=2, n_text_tokens=len(symmap) + 8,
                      dropout=0.0, text_heads=1, guided_attention=1.0)
    torch.manual_seed(0)
    path = export_tiny_model(tmp_path / "model.safetensors", VALLE(cfg), cfg, symmap, tiny_encodec_dir)
    tts = TTS.from_pretrained(path, device="cpu")
    assert tts.models["ar+nar"].config.text_heads == 1
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1024, (n, 8), generator=g) for n in (30, 45)]
    greedy = GenerationSettings(ar=replace(SamplingParams.ar_defaults(), temperature=0.0),
                                nar=replace(SamplingParams.nar_defaults(), temperature=0.0), max_ar_steps=20)
    together = tts.generate_codes(texts, prompts, greedy)
    alone = [tts.generate_codes([t], [p], greedy)[0] for t, p in zip(texts, prompts)]
    for a, b in zip(together, alone):
        assert torch.equal(a, b)
    beams = tts.generate_codes(texts, prompts, replace(greedy, ar=replace(greedy.ar, beam_width=3), max_ar_steps=12))
    assert all(c.shape[0] <= 12 and c.shape[1] == 8 for c in beams)

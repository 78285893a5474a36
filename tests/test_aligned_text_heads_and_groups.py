"""The text heads' aligned positions (`text_head_rate`) and VALL-E 2's grouped AR (`ar_group`):
the sequence layout, cached decoding against full recomputation, training targets, and the engine."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.conftest import export_tiny_model
from vall_e.generation.sampling import SamplingParams
from vall_e.generation.settings import GenerationSettings
from vall_e.generation.tts import TTS
from vall_e.models.valle import VALLE, VALLEConfig
from vall_e.text.phonemes import phonemize
from vall_e.text.symmap import Symmap
from vall_e.utils.errors import UserError

torch.set_num_threads(1)


def tiny(G: int = 1, rate: float = 4.5, **kw) -> VALLE:
    torch.manual_seed(0)
    kw.setdefault("dropout", 0.0)
    model = VALLE(VALLEConfig(d_model=32, n_heads=4, n_layers=2, n_text_tokens=40, n_codes=64, n_levels=4,
                              text_heads=1, guided_attention=1.0, text_head_rate=rate, ar_group=G, **kw))
    with torch.no_grad():  # no identity hides a bug: perturb every norm
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    text = [torch.randint(3, 40, (n,), generator=g) for n in (9, 5)]
    prompt = [torch.randint(0, 64, (n, 4), generator=g) for n in (7, 12)]
    resps = [torch.randint(0, 64, (n, 4), generator=g) for n in (11, 8)]
    return text, prompt, resps


def test_text_head_positions_follow_text_and_response():
    """Text token n at n * rate; response frame j at j (AR: the group's first frame); all else at 0."""
    for G, causal in ((1, True), (2, True), (2, False)):
        model = tiny(G)
        valid = torch.ones(1, 12, dtype=torch.bool)
        text = [torch.arange(3, 7)]  # 4 text tokens, then 3 other prefix tokens, then 5 response tokens
        mask = model._mask(torch.tensor([causal]), valid, text, [7])
        step = G if causal else 1
        want = [n * 4.5 for n in range(4)] + [0.0] * 3 + [j * step for j in range(5)]
        assert mask.text_pos[0].tolist() == pytest.approx(want)
    plain = VALLE(VALLEConfig(d_model=32, n_heads=4, n_layers=1, n_text_tokens=40, text_heads=1))
    assert plain._mask(torch.tensor([True]), valid, text, [7]).text_pos is None  # rate 0: shared positions


@pytest.mark.parametrize("G", [1, 2, 3])
def test_cached_decoding_equals_full_recomputation(G):
    """Prefill + one step at a time through the KV cache gives the logits of the full forward, for a
    left-padded batch, with aligned text-head positions."""
    model = tiny(G).eval()
    text, prompt, resps = batch()
    with torch.no_grad():
        full = model.ar_full(text, None, prompt, resps)
        groups = [model._ar_groups(r[:, 0]) for r in resps]
        n = min(g.shape[0] for g in groups)
        logits, state = model.ar_prefill(text, None, prompt, max_length=n)
        steps = [logits]
        for t in range(n - 1):
            tok = torch.stack([g[t] for g in groups])
            logits, state = model.ar_step(tok[:, 0] if G == 1 else tok, state)
            steps.append(logits)
    inc = torch.stack(steps, 1)  # [B, n, (G,) V]
    for i in range(2):
        assert torch.allclose(inc[i], full[i][:n], atol=1e-5), (G, i, (inc[i] - full[i][:n]).abs().max())


def test_groups_end_with_stop():
    model = tiny(3)
    stop = model.config.stop_id
    assert model._ar_groups(torch.tensor([5, 6, 7, 8])).tolist() == [[5, 6, 7], [8, stop, stop]]
    assert model._ar_groups(torch.tensor([5, 6, 7])).tolist() == [[5, 6, 7], [stop, stop, stop]]
    assert model._ar_groups(torch.tensor([], dtype=torch.long)).tolist() == [[stop, stop, stop]]


def test_grouped_training_scores_every_code_of_every_group():
    model = tiny(2)
    text, prompt, resps = batch()
    loss, stats = model({"text": text, "prompt": prompt, "resps": resps, "levels": torch.zeros(2, dtype=torch.long)})
    # 11 codes + STOP -> 6 groups of 2; 8 codes + STOP -> 5 groups of 2
    assert stats["ar.tokens"] == 2 * 6 + 2 * 5
    loss.backward()
    assert model.ar_head.weight.grad is not None and bool(torch.isfinite(model.ar_head.weight.grad).all())
    assert model.ar_emb.weight.shape[0] == 2 * (model.config.n_codes + 1)


def test_guided_attention_loss_is_a_share_of_the_attention():
    """The loss is the attention mass off the diagonal band: in [0, 1], 0 for a perfect diagonal,
    near 1 for attention on the wrong end, whatever the text length."""
    from vall_e.models.valle import _Targets

    model = tiny(1)
    for N, R in ((6, 30), (40, 200)):
        t = _Targets()
        t.add(0, torch.arange(R), torch.zeros(R, dtype=torch.long))
        t.done()
        j = (torch.arange(R) + 0.5) / R
        diag = torch.zeros(1, 1, R, N)
        diag[0, 0, torch.arange(R), (j * N).long().clamp(max=N - 1)] = 1.0
        wrong = torch.zeros(1, 1, R, N)
        wrong[0, 0, torch.arange(R), (N - 1 - (j * N).long()).clamp(min=0)] = 1.0
        text = [torch.zeros(N)]
        assert float(model._guided_attention_loss([diag], t, text)) < 0.05
        assert 0.5 < float(model._guided_attention_loss([wrong], t, text)) <= 1.0


def test_settings_are_checked():
    with pytest.raises(UserError, match="text_head_rate"):
        VALLEConfig(text_head_rate=4.0)  # needs text heads
    with pytest.raises(UserError, match="ar_group"):
        VALLEConfig(ar_group=0)
    with pytest.raises(UserError, match="ar_group"):
        VALLEConfig(ar_group=2.0)


@pytest.fixture(scope="module")
def grouped_tts(tmp_path_factory, tiny_encodec_dir):
    texts = ["Hello there.", "The quick brown fox jumps over the lazy dog."]
    symmap = Symmap.build([phonemize(t) for t in texts])
    cfg = VALLEConfig(kind="ar+nar", d_model=32, n_heads=2, n_layers=2, n_text_tokens=len(symmap) + 8, dropout=0.0,
                      text_heads=1, guided_attention=1.0, text_head_rate=5.0, ar_group=2)
    torch.manual_seed(0)
    path = export_tiny_model(tmp_path_factory.mktemp("grouped") / "model.safetensors", VALLE(cfg), cfg, symmap,
                             tiny_encodec_dir)
    return TTS.from_pretrained(path, device="cpu"), texts


def greedy(**kw) -> GenerationSettings:
    kw.setdefault("ar", replace(SamplingParams.ar_defaults(), temperature=0.0))
    return GenerationSettings(nar=replace(SamplingParams.nar_defaults(), temperature=0.0), **kw)


def test_engine_grouped_batch_equals_single(grouped_tts):
    tts, texts = grouped_tts
    assert tts.ar_model.config.ar_group == 2
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1024, (n, 8), generator=g) for n in (30, 45)]
    settings = greedy(max_ar_steps=21)  # odd: the last group is cut in its middle
    together = tts.generate_codes(texts, prompts, settings)
    alone = [tts.generate_codes([t], [p], settings)[0] for t, p in zip(texts, prompts)]
    for a, b in zip(together, alone):
        assert torch.equal(a, b)
        assert a.shape[0] <= 21 and a.shape[1] == 8
    # every sampler option runs frame by frame inside a group
    sampled = replace(settings, ar=replace(SamplingParams.ar_defaults(), temperature=0.9, top_k=20,
                                           repetition_penalty=1.3, seed=3))
    assert all(c.shape[0] <= 21 for c in tts.generate_codes(texts, prompts, sampled))


def test_engine_grouped_stop_floor_and_beam(grouped_tts):
    """STOP wanted at every frame: the floor still holds each row to its minimum frame count, also in
    the middle of a group; beam search is refused with a clear error."""
    tts, texts = grouped_tts
    model = tts.ar_model
    V = model.config.n_codes + 1
    saved = model.ar_head.bias.detach().clone()
    try:
        with torch.no_grad():
            for g in range(2):
                model.ar_head.bias[g * V + model.config.stop_id] = 1e4
        prompt = torch.randint(0, 1024, (20, 8), generator=torch.Generator().manual_seed(2))
        for floor in (3, 4):
            ids = [tts.encode_text(texts[0])]
            out = tts.generate_ar(ids, torch.zeros(1, dtype=torch.long), [prompt], greedy().ar, [50], 150, [floor])
            assert out[0].shape[0] == floor
    finally:
        with torch.no_grad():
            model.ar_head.bias.copy_(saved)
    with pytest.raises(UserError, match="beam search"):
        tts.generate_codes(texts[:1], [prompt], greedy(max_ar_steps=10, ar=replace(greedy().ar, beam_width=2)))


def test_engine_grouped_stream_equals_one_shot_ar(grouped_tts):
    """Streaming consumes the grouped AR frame by frame: its level-0 codes are the one-shot ones."""
    tts, texts = grouped_tts
    prompt = torch.randint(0, 1024, (25, 8), generator=torch.Generator().manual_seed(4))
    settings = greedy(max_ar_steps=30)
    ids = [tts.encode_text(texts[1])]
    langs = torch.zeros(1, dtype=torch.long)
    frames = [int(tok[0]) for _, tok, done in tts.ar_steps(ids, langs, [prompt], settings.ar, [30]) if not done[0]]
    one_shot = tts.generate_ar(ids, langs, [prompt], settings.ar, [30])[0]
    assert frames == one_shot.tolist()

"""Medusa heads: the config, the training loss, the frozen-backbone flag, and decoding that keeps the
one-step loop's output (greedy codes identical, sampling distribution unchanged)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from torch import Tensor

from vall_e.generation.sampling import SamplingParams
from vall_e.generation.tts import TTS
from vall_e.models.valle import VALLE, VALLEConfig
from vall_e.utils.errors import UserError

N_TEXT, N_CODES = 40, 64


def tiny(K: int = 3, G: int = 1, n_codes: int = N_CODES, **kw) -> VALLE:
    torch.manual_seed(0)
    cfg = VALLEConfig(kind="ar+nar", d_model=32, n_heads=2, n_layers=2, n_text_tokens=N_TEXT, n_codes=n_codes,
                      n_levels=2, dropout=0.0, ar_group=G, medusa_heads=K, **kw)
    return VALLE(cfg).eval()


def engine(model: VALLE) -> TTS:
    return TTS({"ar+nar": model}, {"symmap": None}, codec=None)


def inputs(B: int, seed: int = 1, n_codes: int = N_CODES):
    g = torch.Generator().manual_seed(seed)
    texts = [torch.randint(1, N_TEXT, (5 + 3 * i,), generator=g) for i in range(B)]
    prompts = [torch.randint(0, n_codes, (8 + 2 * i, 2), generator=g) for i in range(B)]
    return texts, torch.zeros(B, dtype=torch.long), prompts


class Oracle:
    """Heads that propose the one-step loop's own continuation, found by matching the hidden state with
    those the one-step loop passed through, every `wrong`-th proposal corrupted: decoding then takes
    both the accept and the reject paths, many times per sequence."""

    def __init__(self, model: VALLE, hidden: list[Tensor], steps: list[Tensor], wrong: int = 3) -> None:
        self.model, self.hidden, self.steps, self.wrong = model, hidden, steps, wrong

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        c = self.model.config
        K, G, V = c.medusa_heads, c.ar_group, c.n_codes + 1
        out = torch.full((h.shape[0], K, G, V), -10.0)
        for b in range(h.shape[0]):
            j = int((self.hidden[b] - h[b]).norm(dim=-1).argmin())  # h is the state after step j - 1
            for k in range(K):
                t = j + 1 + k  # head k proposes step j + 1 + k
                code = self.steps[b][t] if t < len(self.steps[b]) else torch.full((G,), c.stop_id)
                if (t + b) % self.wrong == 0:
                    code = (code + 1) % V
                out[b, k, torch.arange(G), code] = 10.0
        return out if G > 1 else out[:, :, 0]


def plain_trace(model: VALLE, texts, langs, prompts, steps: int, G: int):
    """The one-step loop's hidden states and fed steps per row, by greedy decoding with `ar_step`."""
    with torch.inference_mode():
        logits, state = model.ar_prefill(texts, langs, prompts, max_length=steps + 2)
        hidden, fed = [state.hidden.clone()], []
        for _ in range(steps):
            tok = logits.argmax(-1)
            fed.append(tok)
            logits, state = model.ar_step(tok, state)
            hidden.append(state.hidden.clone())
    B = len(texts)
    return ([torch.stack([h[b] for h in hidden]) for b in range(B)],
            [torch.stack([f[b] for f in fed]).view(-1, G) for b in range(B)])


def greedy_both(model: VALLE, B: int, steps: int = 40, seed: int = 1, **kw):
    tts = engine(model)
    texts, langs, prompts = inputs(B, seed)
    p = SamplingParams(temperature=0.0, medusa=False, **kw)
    plain = tts.generate_ar(texts, langs, prompts, p, [steps] * B, 150, [4] * B)
    fast = tts.generate_ar(texts, langs, prompts, replace(p, medusa=True), [steps] * B, 150, [4] * B)
    return plain, fast, tts.ar_stats


# ---------------------------------------------------------------- config, heads, training


def test_config_checks_and_round_trip():
    cfg = VALLEConfig(kind="ar", medusa_heads=2, d_model=32, n_heads=2, n_layers=1)
    assert VALLEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UserError, match="medusa_heads"):
        VALLEConfig(medusa_heads=5)
    with pytest.raises(UserError, match="no AR"):
        VALLEConfig(kind="nar", medusa_heads=1)
    from vall_e.config.model import ModelConfig
    nets = ModelConfig(kind="ar,nar", size="tiny", medusa_heads=2).networks()
    assert nets["ar"].medusa_heads == 2 and nets["nar"].medusa_heads == 0


@pytest.mark.parametrize("G", [1, 2])
def test_heads_start_as_the_ar_head_and_train(G):
    model = tiny(K=2, G=G).train()
    h = torch.randn(3, 32)
    ar = model.ar_head(h).view(3, G, -1) if G > 1 else model.ar_head(h)
    heads = model.medusa_logits(h)
    assert heads.shape == ((3, 2, G, N_CODES + 1) if G > 1 else (3, 2, N_CODES + 1))
    assert torch.allclose(heads[:, 0], ar) and torch.allclose(heads[:, 1], ar)
    g = torch.Generator().manual_seed(0)
    batch = {"text": [torch.randint(1, N_TEXT, (6,), generator=g) for _ in range(2)],
             "prompt": [torch.randint(0, N_CODES, (5, 2), generator=g) for _ in range(2)],
             "resps": [torch.randint(0, N_CODES, (9, 2), generator=g) for _ in range(2)], "levels": torch.tensor([0, 0])}
    loss, stats = model(batch)
    assert {"medusa1.nll", "medusa2.nll", "medusa1.acc"} <= set(stats)
    loss.backward()
    assert model.medusa_heads[1].block.weight.grad.abs().sum() > 0
    model.zero_grad()
    loss_nar, stats_nar = model({**batch, "levels": torch.tensor([1, 1])})
    assert "medusa1.nll" not in stats_nar  # NAR samples have no next steps to propose


def _ar_batch(B: int = 2, T: int = 9, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"text": [torch.randint(1, N_TEXT, (6 + i,), generator=g) for i in range(B)],
            "prompt": [torch.randint(0, N_CODES, (5, 2), generator=g) for _ in range(B)],
            "resps": [torch.randint(0, N_CODES, (T + 2 * i, 2), generator=g) for i in range(B)],
            "levels": torch.zeros(B, dtype=torch.long)}


class _ShiftedAR(torch.nn.Module):
    """A stand-in for Medusa head k: the AR head's logits at the position `shift` steps after the
    hidden state it is given (found among the forward's hidden states), i.e. exactly what
    self-distillation asks head k to learn."""

    def __init__(self, model: VALLE, shift: int) -> None:
        super().__init__()
        self.model, self.shift, self.hidden = model, shift, None

    def forward(self, h: Tensor) -> Tensor:
        H = self.hidden  # [B, S, d]
        flat = H.reshape(-1, H.shape[-1])
        idx = torch.cdist(h.detach(), flat.detach()).argmin(-1)
        b, t = idx // H.shape[1], (idx % H.shape[1] + self.shift).clamp_max(H.shape[1] - 1)
        return self.model.ar_head(H[b, t])


def _with_shifted_heads(model: VALLE, offset: int = 0) -> list[_ShiftedAR]:
    heads = [_ShiftedAR(model, k + offset) for k in range(1, len(model.medusa_heads) + 1)]
    model.medusa_heads = torch.nn.ModuleList(heads)

    def grab(module, args, out):
        for head in heads:
            head.hidden = out.hidden

    model.backbone.register_forward_hook(grab)
    return heads


def test_distill_config():
    cfg = VALLEConfig(kind="ar", medusa_heads=2, medusa_distill=True, d_model=32, n_heads=2, n_layers=1)
    assert VALLEConfig.from_dict(cfg.to_dict()) == cfg and VALLEConfig().medusa_distill is False
    with pytest.raises(UserError, match="medusa_distill"):
        VALLEConfig(medusa_heads=1, medusa_distill="yes")


@pytest.mark.parametrize("G", [1, 2])
def test_distill_loss_is_zero_for_heads_that_are_the_shifted_ar(G):
    """With `medusa_distill`, heads that give the AR head's distribution k steps on (same group slot)
    have zero KL and full agreement; heads off by one step do not; the true-code loss stays as it was."""
    batch = _ar_batch()
    model = tiny(K=2, G=G, medusa_distill=True)
    with torch.no_grad():
        model.ar_head.weight.mul_(50.0)  # a peaked AR distribution: the argmax is well defined
    _with_shifted_heads(model)
    with torch.no_grad():
        _, stats = model(batch)
    for k in (1, 2):
        assert stats[f"medusa{k}.kl"] < 1e-5 and stats[f"medusa{k}.acc"] == 1.0
        assert stats[f"medusa{k}.nll"] > 0.1  # still the cross-entropy against the true code
    _with_shifted_heads(model, offset=1)  # head k proposes step k + 1 instead: wrong
    with torch.no_grad():
        _, off = model(batch)
    assert off["medusa1.kl"] > 0.1 and off["medusa1.acc"] < 0.9
    model.config = replace(model.config, medusa_distill=False)  # the default: true codes, no KL
    _with_shifted_heads(model)
    with torch.no_grad():
        _, true_code = model(batch)
    assert "medusa1.kl" not in true_code and true_code["medusa1.nll"] > 0.1


@pytest.mark.parametrize("G", [1, 2])
def test_distill_targets_are_detached(G):
    """No gradient reaches the AR head or the hidden states through the distillation target: with
    heads whose output does not depend on the hidden state, the Medusa loss has no gradient but the
    heads' biases'."""
    model = tiny(K=2, G=G, medusa_distill=True).train()
    batch = _ar_batch()
    levels = batch["levels"]
    seqs, starts, resp_t, _ = model._training_layout(batch, levels)
    x, valid = model._pad(seqs)
    with torch.no_grad():
        h = model.backbone(x, model._mask(levels == 0, valid, batch["text"], starts)).hidden
    h = h.clone().requires_grad_(True)
    with torch.no_grad():
        for head in model.medusa_heads:
            head.out.weight.zero_()
            head.block.weight.zero_()
    loss = model._medusa_loss(h, resp_t, levels[resp_t.sample], {})
    assert loss > 0
    loss.backward()
    assert model.ar_head.weight.grad is None and model.ar_head.bias.grad is None
    assert h.grad is None or not h.grad.any()
    assert all(head.out.bias.grad.abs().sum() > 0 for head in model.medusa_heads)


def test_distill_training_raises_agreement_with_the_ar():
    """A few optimiser steps on the heads alone (the rest frozen, as `trainer.medusa_only`) raise their
    agreement with the AR head's argmax at the shifted step and lower the KL."""
    from vall_e.models.build import freeze_all_but_medusa

    model = tiny(K=2, medusa_distill=True)
    with torch.no_grad():
        model.ar_head.weight.mul_(50.0)
    model.init_medusa_from_ar()
    freeze_all_but_medusa(model)
    batch = _ar_batch(B=4, T=12)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.no_grad():
        _, before = model(batch)
    for _ in range(40):
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, after = model(batch)
    for k in (1, 2):
        assert after[f"medusa{k}.acc"] > before[f"medusa{k}.acc"] + 0.3, (before, after)
        assert after[f"medusa{k}.kl"] < 0.5 * before[f"medusa{k}.kl"]


def test_medusa_only_freezes_all_but_the_heads():
    from vall_e.models.build import freeze_all_but_medusa

    model = tiny(K=2)
    freeze_all_but_medusa(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("medusa_heads.") for n in trainable)
    with pytest.raises(UserError, match="medusa_heads"):
        freeze_all_but_medusa(tiny(K=0))


# ---------------------------------------------------------------- greedy: identical codes


@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("G", [1, 2])
def test_greedy_with_heads_equals_greedy_without(B, G):
    """The codes of plain greedy decoding, on several texts, with the heads' own (random) proposals and
    with oracle proposals that are right two times in three."""
    kw = {"text_heads": 1, "text_head_rate": 2.0} if G > 1 else {}
    model = tiny(K=3, G=G, **kw)
    plain, fast, stats = greedy_both(model, B)
    assert [len(c) for c in plain] == [len(c) for c in fast]
    assert all(torch.equal(a, b) for a, b in zip(plain, fast))
    assert stats["passes"] > 0
    texts, langs, prompts = inputs(B)
    hidden, fed = plain_trace(model, texts, langs, prompts, steps=45 // G + 2, G=G)
    model.medusa_logits = Oracle(model, hidden, fed)
    plain2, fast2, stats2 = greedy_both(model, B)
    assert all(torch.equal(a, b) for a, b in zip(plain, fast2))
    assert stats2["steps_per_pass"] > 1.5  # the oracle's proposals were used


def test_greedy_equal_with_penalties_and_repeat_guard():
    """Rows at different frames still get the one-step loop's penalties, STOP floor, caps and repeat guard."""
    model = tiny(K=2)
    plain, fast, _ = greedy_both(model, 3, steps=50, repetition_penalty=1.3, length_penalty=0.5)
    assert all(torch.equal(a, b) for a, b in zip(plain, fast))
    tts = engine(model)
    texts, langs, prompts = inputs(2)
    p = SamplingParams(temperature=0.0, medusa=False)
    a = tts.generate_ar(texts, langs, prompts, p, [60, 60], max_repeat_frames=3)
    b = tts.generate_ar(texts, langs, prompts, replace(p, medusa=True), [60, 60], max_repeat_frames=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert max(len(x) for x in a) < 60  # the repeat guard ended them


def test_rollback_leaves_the_cache_of_plain_decoding():
    """After verification and rollback, the kept slots hold what one-step decoding writes there."""
    model = tiny(K=3)
    texts, langs, prompts = inputs(1)
    with torch.inference_mode():
        _, plain = model.ar_prefill(texts, langs, prompts, max_length=10)
        for tok in (5, 9, 7):
            model.ar_step(torch.tensor([tok]), plain)
        _, spec = model.ar_prefill(texts, langs, prompts, max_length=10)
        _, hidden = model.ar_verify(torch.tensor([[5, 9, 3, 1]]), spec, torch.zeros(1, dtype=torch.long))
        model.ar_rollback(spec, spec.length - 2, hidden[:, 1])  # keep 5, 9
        model.ar_step(torch.tensor([7]), spec)
    assert spec.length == plain.length and spec.cache.length == plain.cache.length
    assert torch.equal(spec.valid, plain.valid)
    n = plain.length
    for k1, k2 in zip(spec.cache.k_layers + spec.cache.v_layers, plain.cache.k_layers + plain.cache.v_layers):
        assert torch.allclose(k1[:, :, :n], k2[:, :, :n], atol=1e-5)
    assert torch.allclose(spec.hidden, plain.hidden, atol=1e-5)


# ---------------------------------------------------------------- sampling: the same distribution


def _chi2_two_sample(a: torch.Tensor, b: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test that two samples share one distribution (a 2 x cells
    contingency table; the p-value is the chi-square survival function, gammaincc(df/2, x/2))."""
    cells = torch.unique(torch.cat([a, b]))
    table = torch.stack([(a[:, None] == cells).sum(0), (b[:, None] == cells).sum(0)]).double()
    table = table[:, table.sum(0) >= 10]  # sparse cells make the statistic unreliable
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    statistic = ((table - expected) ** 2 / expected).sum()
    df = torch.tensor(float(table.shape[1] - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, statistic / 2))


def test_speculative_sampling_keeps_the_distribution():
    """Chi-square test over many draws: the joint distribution of three sampled frames (64 cells) from
    speculative sampling matches the one-step sampler's. The AR head is sharpened and the heads are
    near it, so proposals are accepted and rejected often; a sampler that kept every proposal fails.
    (Checked once at 20000 draws: p = 0.67.)"""
    V = 4
    model = tiny(K=2, n_codes=V)
    with torch.no_grad():  # a peaked AR, and heads that propose roughly what it would
        model.ar_head.weight.mul_(20)
        for head in model.medusa_heads:
            head.out.weight.copy_(model.ar_head.weight + 0.3 * torch.randn_like(head.out.weight))
    tts = engine(model)
    N = 3000
    text, lang, prompt = inputs(1, n_codes=V)
    texts, langs, prompts = text * N, lang.repeat(N), prompt * N
    params = SamplingParams(temperature=1.0, ras_window=0, seed=7)

    def joint(p):
        codes = tts.generate_ar(texts, langs, prompts, p, [3] * N, 150, [3] * N)
        c = torch.stack(codes)
        return c[:, 0] * V * V + c[:, 1] * V + c[:, 2], dict(tts.ar_stats)

    plain, _ = joint(replace(params, medusa=False))
    fast, stats = joint(replace(params, medusa=True, seed=8))
    assert 1.1 < stats["steps_per_pass"] < 2.5  # both accepted and rejected proposals
    assert _chi2_two_sample(plain, fast) > 1e-3
    # the test can fail: the heads' own distribution (every proposal kept) is told apart
    with torch.inference_mode():
        _, state = model.ar_prefill(text * N, lang.repeat(N), prompt * N, max_length=4)
        q = torch.softmax(model.medusa_logits(state.hidden)[:, 0], -1)
    drafted = torch.multinomial(q, 1, generator=torch.Generator().manual_seed(0))[:, 0]
    assert _chi2_two_sample(plain // V % V, drafted) < 1e-6


# ---------------------------------------------------------------- streaming, STOP, fallbacks


def streamed_frames(tts: TTS, texts, langs, prompts, p: SamplingParams) -> tuple[list[int], list | None]:
    """The frames `ar_steps` yields for one sample up to STOP, and its return value (None when it
    yielded STOP first)."""
    seen, codes = [], None
    steps = tts.ar_steps(texts, langs, prompts, p, [40], 150, [4])
    while True:
        try:
            _, tokens, done = next(steps)
        except StopIteration as end:
            codes = end.value
            break
        if bool(done[0]):
            break
        seen.append(int(tokens[0]))
    return seen, codes


def test_streaming_frames_and_stop(monkeypatch):
    """`ar_steps` yields every kept frame once, in order, ending with STOP, as the one-step loop does."""
    model = tiny(K=3)
    tts = engine(model)
    texts, langs, prompts = inputs(1)
    p = SamplingParams(temperature=0.0, medusa=True)
    seen, codes = streamed_frames(tts, texts, langs, prompts, p)
    plain = tts.generate_ar(texts, langs, prompts, replace(p, medusa=False), [40], 150, [4])
    assert seen == plain[0].tolist()
    assert len(seen) < 40 or codes is None  # it stopped by STOP or by its cap


def test_unsupported_settings_decode_one_step_at_a_time():
    from vall_e.generation.speculative import medusa_unsupported

    model = tiny(K=2)
    assert "turned off" in medusa_unsupported(model, SamplingParams())  # off by default
    on = SamplingParams(medusa=True)
    assert medusa_unsupported(model, on) is None
    assert "mirostat" in medusa_unsupported(model, replace(on, mirostat_tau=3.0))
    assert "max_ar_context" in medusa_unsupported(model, replace(on, max_ar_context=10))
    assert "no Medusa" in medusa_unsupported(tiny(K=0), on)
    tts = engine(model)
    texts, langs, prompts = inputs(1)
    tts.generate_ar(texts, langs, prompts, SamplingParams(temperature=0.0, max_ar_context=5, medusa=True), [20], 150, [2])
    assert tts.ar_stats == {}


def test_medusa_only_adds_heads_to_weights_trained_without_them():
    """`trainer.medusa_only` loads an AR's weights that have no heads: the heads start as its AR head."""
    from vall_e.models.weights import load_model_weights
    from vall_e.training.trainer import Trainer

    trained = tiny(K=0)
    with torch.no_grad():
        trained.ar_head.weight.add_(1.0)
    weights = trained.state_dict()
    model = tiny(K=2)
    completed = Trainer._with_heads(model, weights, medusa_only=True)
    load_model_weights(model, completed, strict=True, source="test")
    for head in model.medusa_heads:
        assert torch.equal(head.out.weight, trained.ar_head.weight) and not head.block.weight.any()
    assert Trainer._with_heads(model, weights, medusa_only=False) is weights  # strict loading would then refuse

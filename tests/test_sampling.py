"""Each sampler stage's defining behaviour on hand-made logits, plus beam search against brute force."""
from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch

from vall_e.generation.sampling import (
    PAD_ID,
    BeamSearch,
    Mirostat,
    SamplingParams,
    TokenSampler,
    apply_length_penalty,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    ban_tokens,
    categorical_draw,
    counter_uniform,
    sequence_keys,
    dynamic_temperature,
    recent_counts,
    repetition_aware_select,
)
from vall_e.utils.errors import UserError

torch.set_num_threads(1)
NEG = -math.inf


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.isfinite(row).nonzero().flatten().tolist() for row in logits]


# --- parameters -------------------------------------------------------------------------------

def test_params_defaults_and_validation():
    ar, nar = SamplingParams.ar_defaults(), SamplingParams.nar_defaults()
    assert ar.temperature == 0.95 and nar.temperature == 0.2
    assert ar.uses_ras and (ar.ras_window, ar.ras_ratio) == (10, 0.1) and not nar.uses_ras
    assert not ar.dynamic and SamplingParams(temperature=1.0, min_temperature=0.5).dynamic
    assert SamplingParams(temperature=0).greedy
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"min_p": 1.0}, {"top_k": -1},
                {"repetition_penalty": 0}, {"mirostat_tau": 3, "beam_width": 4}, {"seed": -1},
                {"temperature": math.nan}, {"top_k": 2.5}, {"dynamic_temperature_mode": "x"}):
        with pytest.raises(UserError, match=next(iter(bad))):
            SamplingParams(**bad)
    assert replace(SamplingParams(), top_k=5).top_k == 5
    with pytest.raises(UserError):  # a changed copy is validated too
        replace(SamplingParams(), top_p=2.0)


# --- processors ---------------------------------------------------------------------------------

def test_repetition_penalty_lowers_probability_for_either_sign():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    history = torch.tensor([[0, 1]])
    out = apply_repetition_penalty(logits, history, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, -3.0]]  # positive divided, negative multiplied
    before, after = logits.softmax(-1), out.softmax(-1)
    # docs/reference-differences.md #5: -1 -> -2, not -0.5
    assert after[0, 0] < before[0, 0] and after[0, 1] < before[0, 1]
    # a penalty < 1 favours repeats, again for either sign
    for token in (0, 1):
        fav = apply_repetition_penalty(logits, torch.tensor([[token]]), 0.5).softmax(-1)
        assert fav[0, token] > before[0, token]


def test_repetition_penalty_once_per_token_decay_padding_and_rows():
    logits = torch.full((2, 5), 4.0)
    history = torch.tensor([[3, 3, 3, 1, PAD_ID],   # 1 at distance 1, 3 at distance 2 (once)
                            [PAD_ID, PAD_ID, 2, 2, 2]])
    flat = apply_repetition_penalty(logits, history, 2.0)
    assert flat[0].tolist() == [4.0, 2.0, 4.0, 2.0, 4.0]  # 3 penalised once despite 3 occurrences
    assert flat[1].tolist() == [4.0, 4.0, 2.0, 4.0, 4.0]  # rows independent, pads ignored
    decayed = apply_repetition_penalty(logits, history, 2.0, decay=1.0)
    # factor = 2 ** (d ** -1): d=1 -> 2, d=2 -> sqrt 2; recent tokens are penalised more
    assert decayed[0, 1].item() == pytest.approx(2.0)
    assert decayed[0, 3].item() == pytest.approx(4.0 / math.sqrt(2))
    assert torch.equal(apply_repetition_penalty(logits, history, 1.0), logits)
    # [B, T, V] logits: the sequence's history applies to every frame
    out3 = apply_repetition_penalty(logits.unsqueeze(1).expand(2, 3, 5), history, 2.0)
    assert torch.equal(out3, flat.unsqueeze(1).expand(2, 3, 5))


def test_length_penalty_on_stop_only_either_sign():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, -3.0]])
    out = apply_length_penalty(logits, torch.tensor([3, 3]), stop_id=2, penalty=1.0)
    assert out[:, :2].tolist() == logits[:, :2].tolist()
    assert out[0, 2].item() == pytest.approx(0.75) and out[1, 2].item() == pytest.approx(-12.0)
    assert (out.softmax(-1)[:, 2] < logits.softmax(-1)[:, 2]).all()  # penalty > 0: STOP less likely
    longer = apply_length_penalty(logits, torch.tensor([30, 30]), 2, 1.0)
    assert (longer.softmax(-1)[:, 2] < out.softmax(-1)[:, 2]).all()  # and less so as length grows
    eager = apply_length_penalty(logits, torch.tensor([3, 3]), 2, -1.0)
    assert (eager.softmax(-1)[:, 2] > logits.softmax(-1)[:, 2]).all()


def test_top_k_top_p_min_p_keep_the_right_sets():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0], [0.0, 0.0, 9.0, 0.0, 5.0]])
    assert kept(apply_top_k(logits, 2)) == [[1, 2], [2, 4]]
    assert torch.equal(apply_top_k(logits, 0), logits)
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]])
    lp = probs.log()
    assert kept(apply_top_p(lp, 0.6)) == [[0, 1]]        # 0.5 < 0.6 -> add 0.25
    assert kept(apply_top_p(lp, 0.8)) == [[0, 1, 2]]     # 0.75 < 0.8 -> add 0.15
    assert kept(apply_top_p(lp, 0.45)) == [[0]]
    assert kept(apply_top_p(lp[:, [3, 1, 4, 0, 2]], 0.6)) == [[1, 3]]  # position independent
    assert kept(apply_min_p(lp, 0.4)) == [[0, 1]]        # p >= 0.2
    assert kept(apply_min_p(lp, 0.1)) == [[0, 1, 2, 3]]  # p >= 0.05
    assert torch.equal(apply_min_p(lp, 0.0), lp)


def test_temperature_and_dynamic_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    hot, cold = apply_temperature(logits, 2.0).softmax(-1), apply_temperature(logits, 0.5).softmax(-1)
    base = logits.softmax(-1)
    assert cold[0, 0] > base[0, 0] > hot[0, 0]
    with pytest.raises(ValueError):
        apply_temperature(logits, 0.0)
    rows = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # confident, flat
    for mode in ("pmax", "entropy"):
        t = dynamic_temperature(rows, 1.0, 0.2, mode)
        assert t.shape == (2,) and (t >= 0.2).all() and (t <= 1.0).all()
        assert t[0] < t[1] - 0.3, mode  # the confident row is colder
    assert dynamic_temperature(rows[1:], 1.0, 0.2, "entropy").item() == pytest.approx(1.0)
    certain = torch.tensor([[0.0, NEG, NEG, NEG]])
    for mode in ("pmax", "entropy"):  # min 0 on a certain row: a tiny but usable temperature
        t = dynamic_temperature(certain, 1.0, 0.0, mode)
        assert 0 < t.item() < 0.01 and torch.isfinite(apply_temperature(certain, t)[0, 0])
    # the reference's formula, checked by hand: p_max = 0.25 for the flat row
    assert dynamic_temperature(rows[1:], 1.0, 0.2, "pmax").item() == pytest.approx(
        1.0 - 0.8 / (1 + math.exp(-10 * (0.25 - 0.5))))


def test_ban_tokens_and_stop_never_sampled_in_nar():
    logits = torch.tensor([[0.0, 1.0, 5.0], [0.0, 1.0, 5.0]])
    assert kept(ban_tokens(logits, [2])) == [[0, 1], [0, 1]]
    assert kept(ban_tokens(logits, [2], rows=torch.tensor([True, False]))) == [[0, 1], [0, 1, 2]]
    nar = TokenSampler(SamplingParams.nar_defaults(temperature=5.0, seed=1), batch_size=2, banned_ids=[2])
    tokens = nar.sample(torch.tensor([0.0, 0.0, 20.0]).expand(2, 300, 3))
    assert tokens.shape == (2, 300) and not (tokens == 2).any() and (tokens == 0).any() and (tokens == 1).any()
    greedy = TokenSampler(SamplingParams(temperature=0), batch_size=2, banned_ids=[2])
    assert greedy.sample(logits).tolist() == [1, 1]


# --- the sampler ----------------------------------------------------------------------------------

def test_greedy_at_temperature_zero():
    logits = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    for seed in (0, 1, 2):
        s = TokenSampler(SamplingParams(temperature=0, seed=seed, top_k=3), batch_size=4)
        assert torch.equal(s.sample(logits), logits.argmax(-1))
    s3 = TokenSampler(SamplingParams(temperature=0), batch_size=2)
    l3 = torch.randn(2, 5, 7)
    assert torch.equal(s3.sample(l3), l3.argmax(-1))


def _run(sampler: TokenSampler, steps: int, V: int = 16, B: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    history = torch.empty(B, 0, dtype=torch.long)
    for _ in range(steps):
        tok = sampler.sample(torch.randn(B, V, generator=g), history)
        history = torch.cat([history, tok.unsqueeze(-1)], 1)
    return history


def test_seeded_reproducibility():
    params = SamplingParams(temperature=1.0, top_k=8, seed=7)
    a, b = _run(TokenSampler(params, batch_size=3), 12), _run(TokenSampler(params, batch_size=3), 12)
    c = _run(TokenSampler(replace(params, seed=8), batch_size=3), 12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(_run(TokenSampler(params, batch_size=3, generator=g1), 12),
                       _run(TokenSampler(params, batch_size=3, generator=g2), 12))


@pytest.mark.parametrize("use_generator", [False, True])
def test_draws_follow_the_distribution(use_generator):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    gen = torch.Generator().manual_seed(3) if use_generator else None
    s = TokenSampler(SamplingParams(temperature=1.0, seed=11, ras_window=0), batch_size=n, generator=gen)
    tokens = s.sample(probs.log().expand(n, 4))
    freq = torch.bincount(tokens, minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.015), freq  # ~4 standard errors
    assert tokens.unique().numel() == 4


def test_batch_independent_of_neighbours():
    """Sequence i sampled in a batch equals sequence i sampled alone (sequence_ids=[i])."""
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=3, repetition_penalty=1.3)
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(4, 32, generator=g) for _ in range(6)]
    batch = TokenSampler(params, batch_size=4)
    hist = torch.empty(4, 0, dtype=torch.long)
    for x in logits:
        hist = torch.cat([hist, batch.sample(x, hist).unsqueeze(-1)], 1)
    for i in range(4):
        alone = TokenSampler(params, batch_size=1, sequence_ids=[i])
        h = torch.empty(1, 0, dtype=torch.long)
        for x in logits:
            h = torch.cat([h, alone.sample(x[i:i + 1], h).unsqueeze(-1)], 1)
        assert torch.equal(h[0], hist[i])
    assert len({tuple(r) for r in hist.tolist()}) == 4  # different sequences differ
    # NAR [B, T, V]: padding the batch to a longer T does not change a sequence's frames
    nar = SamplingParams.nar_defaults(temperature=1.0, seed=4)
    x = torch.randn(2, 9, 32, generator=g)
    both = TokenSampler(nar, batch_size=2).sample(x)
    solo = TokenSampler(nar, batch_size=1, sequence_ids=[1]).sample(x[1:, :5])
    assert torch.equal(both[1, :5], solo[0])


def test_reorder_follows_rows():
    params = SamplingParams(temperature=1.0, seed=9, mirostat_tau=3.0)
    s = TokenSampler(params, batch_size=3)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    s.sample(x)
    mu = s.mirostat.mu.clone()
    s.reorder(torch.tensor([2, 0]))
    assert torch.equal(s.mirostat.mu, mu[[2, 0]]) and s.batch_size == 2
    ref = TokenSampler(params, batch_size=3)
    ref.sample(x)
    assert torch.equal(s.sample(x[[2, 0]]), ref.sample(x)[[2, 0]])
    s.reset(batch_size=4)  # new sequences: fresh state, and new random numbers
    assert s.batch_size == 4 and s.mirostat.mu.tolist() == [6.0] * 4
    fresh = TokenSampler(replace(params, mirostat_tau=0.0), batch_size=4)
    first = fresh.sample(torch.zeros(4, 1000))
    fresh.reset()
    assert not torch.equal(fresh.sample(torch.zeros(4, 1000)), first)


# --- mirostat ---------------------------------------------------------------------------------

def test_mirostat_state_per_sequence_starts_at_two_tau():
    tau, eta = 3.0, 0.5
    m = Mirostat(tau, eta, batch_size=2)
    assert m.mu.tolist() == [6.0, 6.0]  # 2 tau, not 2 eta
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    tokens = torch.tensor([0, 2])
    surprise = m.update(logits, tokens)
    expect = -logits.log_softmax(-1)[[0, 1], [0, 2]] / math.log(2)
    assert torch.allclose(surprise, expect)
    assert torch.allclose(m.mu, 6.0 - eta * (expect - tau))
    assert m.mu[0] != m.mu[1]
    # one row's update does not depend on the other row
    solo = Mirostat(tau, eta, batch_size=1)
    solo.update(logits[:1], tokens[:1])
    assert torch.allclose(solo.mu, m.mu[:1])


def test_mirostat_truncation_follows_mu():
    ranks = torch.arange(1, 201).float()
    zipf = (-1.2 * ranks.log()).unsqueeze(0).expand(2, 200)  # p ~ 1/r^1.2
    m = Mirostat(3.0, 0.1, batch_size=2)
    m.mu = torch.tensor([1.0, 10.0])
    k = m.top_k(zipf)
    assert k[0] < k[1] and k[0] >= 1
    # k follows the paper's formula with s = 1.2 for the row's μ
    s, n = 1.2, 200
    eps = s - 1
    assert k[1].item() == round(((eps * 2 ** 10.0) / (1 - n ** -eps)) ** (1 / s)) + 1
    assert kept(m.truncate(zipf)) == [list(range(k[0])), list(range(k[1]))]
    sampler = TokenSampler(SamplingParams(temperature=1.0, mirostat_tau=0.5, seed=0), batch_size=2)
    assert sampler.mirostat.mu.tolist() == [1.0, 1.0]
    sampler.sample(zipf)
    assert sampler.mirostat.mu.shape == (2,)


# --- repetition-aware sampling -------------------------------------------------------------

def test_ras_counts_and_select():
    history = torch.tensor([[5, 1, 2, 3, 4, 5, 6, 7, 8, 9, 7], [PAD_ID, PAD_ID, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    # row 0: token 5 occurs twice, but only once in the last 10
    assert recent_counts(history, torch.tensor([5, 1]), 10).tolist() == [1, 9]
    assert recent_counts(history, torch.tensor([5, 1]), 3).tolist() == [0, 3]
    tok, mask = repetition_aware_select(torch.tensor([5, 2]), torch.tensor([0, 0]), history, 10, 0.1)
    assert tok.tolist() == [0, 2] and mask.tolist() == [True, False]
    tok, mask = repetition_aware_select(torch.tensor([5, 1]), torch.tensor([0, 0]), history, 10, 0.5)
    assert tok.tolist() == [5, 0] and mask.tolist() == [False, True]


def test_ras_triggers_on_a_repeated_token_in_the_sampler():
    # nucleus (top_k=1) always picks token 3; the full distribution is nearly uniform over 8 tokens
    logits = torch.tensor([[0.1, 0, 0, 0.3, 0, 0, 0, 0]]).expand(2, 8)
    history = torch.tensor([[1, 2, 3], [1, 2, 4]])  # row 0 has just produced 3
    params = SamplingParams(temperature=1.0, top_k=1, ras_window=10, ras_ratio=0.1, seed=0)
    s = TokenSampler(params, batch_size=2)
    resampled = 0
    for _ in range(40):
        tok = s.sample(logits, history)
        assert s.last_resampled.tolist() == [True, False]
        assert tok[1].item() == 3
        resampled += int(tok[0].item() != 3)
    assert resampled > 20  # drawn from the full distribution, mostly another token
    off = TokenSampler(replace(params, ras_window=0), batch_size=2)
    assert off.sample(logits, history).tolist() == [3, 3]


# --- beam search --------------------------------------------------------------------------------

V, STOP = 4, 3


def random_model(seed: int):
    def logprobs(prefix: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((seed,) + prefix) % (2**31))
        return (torch.randn(V, generator=g) * 2).log_softmax(-1)
    return logprobs


def table_model(table: dict[tuple[int, ...], list[float]], default: list[float] = [0.25] * V):
    def logprobs(prefix: tuple[int, ...]) -> torch.Tensor:
        return torch.tensor(table.get(prefix, default)).log()
    return logprobs


def brute_force(model, max_length: int, alpha: float) -> tuple[tuple[int, ...], float]:
    best, best_score = None, -math.inf
    for k in range(max_length):
        for seq in itertools.product(range(V - 1), repeat=k):
            full = seq + (STOP,)
            total = sum(model(full[:i])[full[i]].item() for i in range(len(full)))
            score = total / len(full) ** alpha
            if score > best_score:
                best, best_score = seq, score
    return best, best_score


def greedy(model, max_length: int) -> tuple[int, ...]:
    seq: tuple[int, ...] = ()
    while len(seq) < max_length:
        t = int(model(seq).argmax())
        if t == STOP:
            break
        seq += (t,)
    return seq


def run_beam(models, width: int, max_length: int, alpha: float):
    B = len(models)
    beam = BeamSearch(B, width, STOP, max_length, alpha)
    caller_history = torch.empty(B * width, 0, dtype=torch.long)
    while not beam.all_done:
        rows = beam.tokens.tolist()
        lp = torch.stack([models[r // width](tuple(rows[r])) for r in range(B * width)])
        tokens, reorder = beam.step(lp)
        caller_history = torch.cat([caller_history[reorder], tokens.unsqueeze(-1)], 1)
        assert torch.equal(caller_history, beam.tokens)  # the caller's reordering matches
        # every live beam's score is the true log-prob of its (reordered) tokens
        for r, row in enumerate(beam.tokens.tolist()):
            b, w = divmod(r, width)
            score = beam.scores[b, w].item()
            if math.isfinite(score) and not beam.done[b]:
                true = sum(models[b](tuple(row[:i]))[row[i]].item() for i in range(len(row)))
                assert score == pytest.approx(true, abs=1e-4)
    return beam.best(), beam.best_scores()


# random models on which greedy decoding misses the best sequence (found by search)
@pytest.mark.parametrize("seed,alpha", [(2, 0.0), (19, 1.0), (26, 0.5), (31, 1.0), (36, 1.0)])
def test_exhaustive_beam_equals_brute_force(seed, alpha):
    model = random_model(seed)
    expect, expect_score = brute_force(model, 3, alpha)
    assert greedy(model, 3) != expect
    narrow, _ = run_beam([model], width=1, max_length=3, alpha=alpha)
    assert tuple(narrow[0].tolist()) != expect
    seqs, scores = run_beam([model], width=9, max_length=3, alpha=alpha)  # 9 = every 2-token prefix
    assert tuple(seqs[0].tolist()) == expect
    assert scores[0].item() == pytest.approx(expect_score, abs=1e-5)


def test_beam_beats_greedy_on_a_constructed_case():
    model = table_model({(): [0.5, 0.4, 0.05, 0.05],
                         (0,): [0.2, 0.2, 0.2, 0.4],     # greedy: 0 then STOP
                         (1,): [0.02, 0.02, 0.01, 0.95]})  # best: 1 then STOP
    for alpha in (0.0, 1.0):
        best, best_score = brute_force(model, 3, alpha)
        assert greedy(model, 3) == (0,) and best == (1,)
        seqs, scores = run_beam([model], width=2, max_length=3, alpha=alpha)
        assert seqs[0].tolist() == [1] and scores[0].item() == pytest.approx(best_score, abs=1e-5)


def test_beam_without_max_length_runs_until_the_caller_stops():
    model = random_model(19)
    expect, expect_score = brute_force(model, 3, 1.0)
    beam = BeamSearch(1, 9, STOP, max_length=None, length_alpha=1.0)
    for _ in range(3):  # the caller's own limit of 3 steps
        beam.step(torch.stack([model(tuple(r)) for r in beam.tokens.tolist()]))
    assert not beam.all_done  # alpha > 0 without max_length: never provably finished
    assert tuple(beam.best()[0].tolist()) == expect
    assert beam.best_scores()[0].item() == pytest.approx(expect_score, abs=1e-5)


def test_beam_batch_items_independent_and_limit():
    models = [random_model(10), random_model(11), random_model(12)]
    together, scores = run_beam(models, width=3, max_length=4, alpha=1.0)
    for b, model in enumerate(models):
        alone, s = run_beam([model], width=3, max_length=4, alpha=1.0)
        assert torch.equal(alone[0], together[b]) and s[0].item() == pytest.approx(scores[b].item())
    # a model that never wants to stop: the best unfinished sequence at the limit is returned
    never = table_model({}, default=[0.7, 0.2, 0.1, 0.0])
    seqs, _ = run_beam([never], width=2, max_length=3, alpha=1.0)
    assert seqs[0].tolist() == [0, 0, 0]


def test_beam_stops_early_when_nothing_can_beat_the_finished():
    model = table_model({(): [0.001, 0.001, 0.001, 0.997]})
    beam = BeamSearch(1, 2, STOP, max_length=50, length_alpha=1.0)
    beam.step(torch.stack([model(()), model(())]))
    assert beam.all_done and beam.length == 1
    seqs, scores = beam.best(), beam.best_scores()
    assert seqs[0].tolist() == [] and scores[0].item() == pytest.approx(math.log(0.997), abs=1e-6)


def test_sampler_wires_penalties_and_dynamic_temperature():
    # greedy: STOP (id 3) narrowly wins; a length penalty over a 9-token history flips it
    logits = torch.tensor([[1.0, 0.0, 0.0, 1.2]])
    history = torch.tensor([[0, 1, 2, 1, 2, 1, 2, 1, 2]])
    plain = TokenSampler(SamplingParams(temperature=0), stop_id=3)
    assert plain.sample(logits, history).item() == 3
    long = TokenSampler(SamplingParams(temperature=0, length_penalty=0.5), stop_id=3)
    assert long.sample(logits, history).item() == 0
    # and the repetition penalty: token 0 just produced, so 0 loses to token 1 at 0.9
    rep = TokenSampler(SamplingParams(temperature=0, repetition_penalty=2.0), stop_id=3)
    assert rep.sample(torch.tensor([[1.0, 0.9, 0.0, 0.0]]), torch.tensor([[0]])).item() == 1
    dyn = TokenSampler(SamplingParams(temperature=1.0, min_temperature=0.1, seed=0), batch_size=2)
    dyn.sample(torch.tensor([[12.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert dyn.last_temperature.shape == (2,) and dyn.last_temperature[0] < dyn.last_temperature[1]


def test_categorical_draw_edges_and_counter_uniform():
    u = torch.tensor([0.0, 0.25, 0.5, 0.75, 1 - 2.0**-53], dtype=torch.float64)
    tails = torch.tensor([NEG, 0.0, 0.0, NEG]).expand(5, 4)  # zero-probability first and last tokens
    assert categorical_draw(tails, u).tolist() == [1, 1, 2, 2, 2]
    # uniforms: in [0, 1), roughly uniform, independent of the batch around a key
    keys = sequence_keys(0, torch.arange(3))
    a = counter_uniform(keys, step=5, slot=0, shape=(2000,))
    assert a.shape == (3, 2000) and (a >= 0).all() and (a < 1).all()
    assert abs(a.mean().item() - 0.5) < 0.02 and abs(a.var().item() - 1 / 12) < 0.01
    assert torch.equal(counter_uniform(keys[1:2], 5, 0, (2000,)), a[1:2])
    assert not torch.equal(counter_uniform(keys, 6, 0, (2000,)), a)  # the step matters
    assert not torch.equal(counter_uniform(keys, 5, 1, (2000,)), a)  # and the slot


def test_seeded_random_streams_do_not_change():
    """A seed gives the same audio across versions: the counter-based uniforms are pinned."""
    keys = sequence_keys(1234, torch.arange(2))
    assert counter_uniform(keys, 0, 0).tolist() == [0.7841687865858922, 0.6451924756409041]
    assert counter_uniform(keys, 3, 1).tolist() == [0.11511934490478104, 0.34620554570382556]


def test_block_of_step_uniforms_equals_per_step_uniforms():
    """The AR sampler reads its uniforms from `counter_uniform_steps` blocks; they must be the very
    numbers `counter_uniform` gives step by step, so seeded outputs do not depend on the block size."""
    from vall_e.generation.sampling import _DRAWS, counter_uniform, counter_uniform_steps, sequence_keys

    keys = sequence_keys(1234, torch.arange(5))
    block = counter_uniform_steps(keys, 7, 10)
    assert block.shape == (5, 10, _DRAWS)
    for i in range(10):
        for slot in range(_DRAWS):
            assert torch.equal(block[:, i, slot], counter_uniform(keys, 7 + i, slot))

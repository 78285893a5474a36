"""Medusa's tree verification: the tree's shape, the candidate groups, the tree attention (each node
sees its ancestors), keeping one path of the cache, and greedy decoding that keeps the one-step loop's
codes while accepting more steps per pass than a chain."""
from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from tests.test_medusa import Oracle, engine, inputs, plain_trace, streamed_frames, tiny
from vall_e.generation.sampling import SamplingParams
from vall_e.generation.settings import settings_from
from vall_e.generation.speculative import parse_tree, top_groups
from vall_e.models.backbones import transformer as tr
from vall_e.utils.errors import UserError


# ---------------------------------------------------------------- the tree and its candidates


def test_tree_shape():
    t = parse_tree("3x2, 2,2", heads=3)
    # depth 1: 3 nodes; the best 2 expanded with 2 children each; the best child of each with 2
    assert t.widths == (3, 2, 2) and t.size == 1 + 3 + 4 + 4
    assert t.depth.tolist() == [0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert t.parent.tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 4, 4, 6, 6]
    assert [r.tolist() for r in t.ranks] == [[0, 1, 2], [0, 1, 0, 1], [0, 1, 0, 1]]
    # block: every node sees itself and its ancestors, nothing else
    for i in range(t.size):
        chain, j = {i}, i
        while j:
            j = int(t.parent[j])
            chain.add(j)
        assert set(torch.nonzero(t.block[i])[:, 0].tolist()) == chain | {0}
    assert t.frame_offsets(2).tolist()[:4] == [0, 1, 2, 3]  # root's step, then depth 1's


@pytest.mark.parametrize("spec, why", [("", "candidates per depth"), ("4,a", "W or WxE"), ("2x3", "W or WxE"),
                                       ("0", "W or WxE"), ("4,4,4", "3 depths; the model has 2"),
                                       ("200,200", "more than 256 nodes")])
def test_tree_spec_errors(spec, why):
    with pytest.raises(UserError, match=why):
        parse_tree(spec, heads=2)


def test_bad_tree_is_a_settings_error():
    with pytest.raises(UserError, match="medusa_tree='8,x'"):
        settings_from({"medusa_tree": "8,x"})
    assert settings_from({"medusa_tree": "8,4"}).ar.medusa_tree == "8,4"


@pytest.mark.parametrize("G", [1, 2, 3])
def test_top_groups_are_the_most_likely_groups(G):
    torch.manual_seed(G)
    lp = torch.randn(2, G, 7).log_softmax(-1)
    got = top_groups(lp, 10)
    for b in range(2):
        every = sorted(itertools.product(range(7), repeat=G),
                       key=lambda c: -sum(float(lp[b, g, c[g]]) for g in range(G)))
        assert [tuple(x) for x in got[b].tolist()] == every[:10]


# ---------------------------------------------------------------- tree attention and the cache


def _verify_tree_against_chains(model, spec: str, G: int) -> None:
    """Each node's logits from one tree pass equal those of a chain pass over its path."""
    texts, langs, prompts = inputs(2)
    tree = parse_tree(spec, model.config.medusa_heads)
    g = torch.Generator().manual_seed(3)
    feed = torch.randint(0, model.config.n_codes, (2, tree.size, G), generator=g)
    feed = feed if G > 1 else feed[..., 0]
    steps = torch.tensor([0, 0])
    with torch.inference_mode():
        _, state = model.ar_prefill(texts, langs, prompts, max_length=4 * tree.size)
        for tok in (3, 5):  # some response before the tree
            model.ar_step(torch.full((2, G), tok) if G > 1 else torch.full((2,), tok), state)
        L = state.length
        logits, _ = model.ar_verify(feed, state, steps + 2, tree.block)
        for i in range(tree.size):
            path, j = [i], i
            while j:
                j = int(tree.parent[j])
                path.insert(0, j)
            model.ar_rollback(state, L)
            chain, _ = model.ar_verify(feed[:, path], state, steps + 2)
            assert torch.allclose(logits[:, i], chain[:, -1], atol=1e-4), (spec, i)


@pytest.mark.parametrize("rows", [8, 64])  # the general forward, and the fused block path
@pytest.mark.parametrize("G", [1, 2])
def test_tree_pass_equals_each_path_as_a_chain(monkeypatch, rows, G):
    monkeypatch.setattr(tr, "BLOCK_ROWS", rows)
    kw = {"text_heads": 1, "text_head_rate": 2.0} if G > 1 else {}
    _verify_tree_against_chains(tiny(K=3, G=G, **kw), "3x2,2,2", G)


def test_tree_pass_equals_each_path_as_a_chain_llama():
    pytest.importorskip("transformers")
    _verify_tree_against_chains(tiny(K=2, backbone="llama"), "3,2", 1)


def test_keeping_a_path_leaves_the_cache_of_plain_decoding():
    """After a tree pass and `ar_keep` of one path per row (different lengths), the kept slots hold what
    one-step decoding writes there, and the next step's logits agree."""
    model = tiny(K=2, text_heads=1, text_head_rate=2.0)
    texts, langs, prompts = inputs(2)
    tree = parse_tree("3,2", 2)  # nodes: 0 | 1 2 3 | 4 5 (children of 1)
    feed = torch.tensor([[7, 5, 9, 11, 4, 8], [7, 2, 6, 13, 3, 1]])
    paths = [[7, 9], [7]]  # row 0 keeps node 2; row 1 keeps only the root
    with torch.inference_mode():
        _, spec = model.ar_prefill(texts, langs, prompts, max_length=20)
        L = spec.length
        _, hidden = model.ar_verify(feed, spec, torch.zeros(2, dtype=torch.long), tree.block)
        model.ar_keep(spec, L, torch.tensor([[0, 2], [0, 0]]), hidden[:, 0])
        spec.valid[1, L + 1] = False  # row 1 kept one step: its second slot is a hole
        out_spec, _ = model.ar_step(torch.tensor([1, 2]), spec)
        for b, path in enumerate(paths):
            _, plain = model.ar_prefill([texts[b]], langs[b:b + 1], [prompts[b]], max_length=20)
            for tok in path:
                model.ar_step(torch.tensor([tok]), plain)
            out_plain, _ = model.ar_step(torch.tensor([[1, 2][b]]), plain)
            assert torch.allclose(out_spec[b], out_plain[0], atol=1e-4)
            valid = spec.valid[b, :spec.length]
            for k1, k2 in zip(spec.cache.k_layers + spec.cache.v_layers, plain.cache.k_layers + plain.cache.v_layers):
                # left padding differs between the batch and alone: compare the valid slots in order
                assert torch.allclose(k1[b][:, :spec.length][:, valid], k2[0][:, :plain.length][:, plain.valid[0, :plain.length]],
                                      atol=1e-4)


# ---------------------------------------------------------------- greedy decoding over a tree


class RunnerUp(Oracle):
    """Oracle heads whose corrupted proposals keep the right code second: a chain rejects them, a tree
    with two candidates per depth accepts them."""

    def __call__(self, h):
        out = super().__call__(h)
        c = self.model.config
        K, G = c.medusa_heads, c.ar_group
        out = out if G > 1 else out[:, :, None]
        for b in range(h.shape[0]):
            j = int((self.hidden[b] - h[b]).norm(dim=-1).argmin())
            for k in range(K):
                t = j + 1 + k
                code = self.steps[b][t] if t < len(self.steps[b]) else torch.full((G,), c.stop_id)
                out[b, k, torch.arange(G), code] = torch.maximum(out[b, k, torch.arange(G), code], torch.tensor(5.0))
        return out if G > 1 else out[:, :, 0]


def _greedy(model, B, tree: str, steps: int = 40, **kw):
    tts = engine(model)
    texts, langs, prompts = inputs(B)
    p = SamplingParams(temperature=0.0, **kw)
    plain = tts.generate_ar(texts, langs, prompts, p, [steps] * B, 150, [4] * B)
    fast = tts.generate_ar(texts, langs, prompts, replace(p, medusa=True, medusa_tree=tree), [steps] * B, 150,
                           [4] * B)
    return plain, fast, tts.ar_stats


@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("G", [1, 2])
def test_greedy_over_a_tree_equals_greedy_without_heads(B, G):
    kw = {"text_heads": 1, "text_head_rate": 2.0} if G > 1 else {}
    model = tiny(K=3, G=G, **kw)
    plain, fast, _ = _greedy(model, B, "4x2,2,2")  # the heads' own (random) proposals
    assert all(torch.equal(a, b) for a, b in zip(plain, fast))
    texts, langs, prompts = inputs(B)
    hidden, fed = plain_trace(model, texts, langs, prompts, steps=45 // G + 2, G=G)
    model.medusa_logits = RunnerUp(model, hidden, fed, wrong=2)
    _, chain, chain_stats = _greedy(model, B, "")
    # every candidate group of two frames each among their top 2 is in a depth's top 4
    _, fast, tree_stats = _greedy(model, B, "4x4,4x4,4")
    assert all(torch.equal(a, b) for a, b in zip(plain, chain))
    assert all(torch.equal(a, b) for a, b in zip(plain, fast))
    assert chain_stats["steps_per_pass"] < 2.5 < 3.5 < tree_stats["steps_per_pass"]  # the runners-up were accepted


def test_greedy_over_a_tree_with_penalties_and_llama():
    """A history-reading processor sends a pass down the chain path; llama's cache keeps a path too."""
    model = tiny(K=2)
    plain, fast, _ = _greedy(model, 3, "3,2", steps=50, repetition_penalty=1.3, length_penalty=0.5)
    assert all(torch.equal(a, b) for a, b in zip(plain, fast))
    pytest.importorskip("transformers")
    plain, fast, stats = _greedy(tiny(K=2, backbone="llama"), 2, "3,2")
    assert all(torch.equal(a, b) for a, b in zip(plain, fast)) and stats["passes"] > 0


def test_a_tree_is_for_greedy_decoding_only():
    """Sampling verifies a chain (exact speculative sampling): the tree setting does not change its draws."""
    model = tiny(K=2)
    tts = engine(model)
    texts, langs, prompts = inputs(2)
    p = SamplingParams(temperature=0.9, seed=4, medusa=True)
    a = tts.generate_ar(texts, langs, prompts, p, [30, 30], 150, [4, 4])
    b = tts.generate_ar(texts, langs, prompts, replace(p, medusa_tree="4,2"), [30, 30], 150, [4, 4])
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(UserError, match="more candidates per depth"):
        tts.generate_ar(texts, langs, prompts, SamplingParams(temperature=0.0, medusa=True, medusa_tree="100"),
                        [30, 30], 150, [4, 4])


@pytest.mark.parametrize("cap", [7, 13])
def test_greedy_over_a_tree_stops_at_the_cap_mid_group(cap):
    """A cap that falls inside a group and inside an accepted path: the codes still end where one-step
    decoding ends them."""
    model = tiny(K=3, G=2, text_heads=1, text_head_rate=2.0)
    texts, langs, prompts = inputs(2)
    hidden, fed = plain_trace(model, texts, langs, prompts, steps=24, G=2)
    model.medusa_logits = RunnerUp(model, hidden, fed, wrong=2)
    plain, fast, _ = _greedy(model, 2, "4x4,4x4,4", steps=cap)
    assert [len(c) for c in plain] == [len(c) for c in fast] and max(len(c) for c in plain) <= cap
    assert all(torch.equal(a, b) for a, b in zip(plain, fast))


def test_streaming_over_a_tree_yields_the_frames_in_order():
    model = tiny(K=3)
    texts, langs, prompts = inputs(1)
    hidden, fed = plain_trace(model, texts, langs, prompts, steps=47, G=1)
    model.medusa_logits = RunnerUp(model, hidden, fed, wrong=2)
    tts = engine(model)
    p = SamplingParams(temperature=0.0, medusa=True, medusa_tree="4x4,4x4,4")
    seen, _ = streamed_frames(tts, texts, langs, prompts, p)
    plain = tts.generate_ar(texts, langs, prompts, replace(p, medusa=False), [40], 150, [4])
    assert seen == plain[0].tolist()

"""The transformer backbone and the static KV cache: masks per sample, padding, incremental decoding."""
from __future__ import annotations

import pytest
import torch

from vall_e.models.backbones import BackboneShape, Mask, build_backbone
from vall_e.models.backbones.kv_cache import KVCache
from vall_e.models.backbones.transformer import TransformerBackbone

torch.set_num_threads(1)
D, H, L = 32, 4, 2


@pytest.fixture
def model() -> TransformerBackbone:
    torch.manual_seed(0)
    return build_backbone("transformer", d_model=D, n_heads=H, n_layers=L, ffn_mult=4, dropout=0.0).eval()


def run(model, x, causal, valid=None):
    B, S, _ = x.shape
    valid = torch.ones(B, S, dtype=torch.bool) if valid is None else valid
    return model(x, Mask(torch.tensor(causal), valid)).hidden


def pad(seqs, left):
    S = max(len(s) for s in seqs)
    x = torch.zeros(len(seqs), S, D)
    valid = torch.zeros(len(seqs), S, dtype=torch.bool)
    for i, s in enumerate(seqs):
        sl = slice(S - len(s), S) if left else slice(0, len(s))
        x[i, sl], valid[i, sl] = s, True
    return x, valid


# ---------------------------------------------------------------- KV cache


def test_kv_cache_writes_in_place_and_returns_filled_views():
    cache = KVCache(n_layers=2, batch_size=3, n_heads=2, max_length=10, head_dim=4)
    ptrs = [k.data_ptr() for k in cache.k_layers + cache.v_layers]
    k1, v1 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    k, v = cache.update(1, k1, v1)
    assert k.shape == (3, 2, 4, 4) and torch.equal(k, k1) and torch.equal(v, v1)
    cache.advance(4)
    k2, v2 = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
    k, v = cache.update(1, k2, v2)
    assert k.shape == (3, 2, 5, 4)
    assert torch.equal(k[:, :, :4], k1) and torch.equal(k[:, :, 4:], k2) and torch.equal(v[:, :, 4:], v2)
    assert torch.equal(cache.k_layers[1][:, :, :5], k) and torch.equal(cache.v_layers[1][:, :, 4:5], v2)  # in place
    assert cache.k_layers[0].abs().sum() == 0 and cache.v_layers[0].abs().sum() == 0  # other layers untouched
    assert [k.data_ptr() for k in cache.k_layers + cache.v_layers] == ptrs  # no reallocation
    cache.advance(1)
    with pytest.raises(RuntimeError, match="full"):
        cache.update(0, torch.randn(3, 2, 6, 4), torch.randn(3, 2, 6, 4))
    cache.reorder(torch.tensor([2, 0]))
    assert cache.batch_size == 2 and torch.equal(cache.k_layers[1][0, :, :4], k1[2])
    assert torch.equal(cache.v_layers[1][1, :, :4], v1[0])
    k, _ = cache.update(1, torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 4))  # writes land in the reordered buffers
    assert torch.equal(k[0, :, :4], k1[2]) and k[:, :, 5].abs().sum() == 0
    cache.reset()
    assert cache.length == 0


# ---------------------------------------------------------------- masks


def test_causal_samples_ignore_the_future_and_nar_samples_see_it(model):
    torch.manual_seed(1)
    x = torch.randn(2, 12, D)
    x2 = x.clone()
    x2[:, 8:] = torch.randn(2, 4, D)  # change positions > 7
    h, h2 = run(model, x, [True, False]), run(model, x2, [True, False])
    assert torch.allclose(h[0, :8], h2[0, :8], atol=1e-6)  # AR sample: past unchanged
    assert not torch.allclose(h[1, :8], h2[1, :8], atol=1e-3)  # NAR sample: past changed


@pytest.mark.parametrize("left", [False, True])
def test_padding_is_invisible(model, left):
    torch.manual_seed(2)
    seqs = [torch.randn(n, D) for n in (5, 11, 8, 11)]
    causal = [True, False, False, True]
    x, valid = pad(seqs, left)
    h = run(model, x, causal, valid)
    for i, s in enumerate(seqs):
        alone = run(model, s[None], [causal[i]])[0]  # no padding: the is_causal / no-mask fast paths
        got = h[i, valid[i]]
        assert torch.allclose(got, alone, atol=1e-5), (i, (got - alone).abs().max())


# ---------------------------------------------------------------- incremental decoding


def test_prefill_then_steps_equal_full_forward(model):
    torch.manual_seed(3)
    prefixes = [torch.randn(n, D) for n in (6, 10)]
    steps = torch.randn(2, 7, D)
    x, valid = pad(prefixes, left=True)
    P = x.shape[1]
    cache = model.new_cache(2, P + 7, torch.device("cpu"), torch.float32)
    causal = torch.tensor([True, True])
    outs = [model(x, Mask(causal, valid), cache=cache, use_cache=True).hidden[:, -1]]
    valid_all = torch.cat([valid, torch.ones(2, 7, dtype=torch.bool)], 1)
    done = 0
    for n in (1, 3, 1, 2):  # single steps and a chunk
        K = P + done + n
        out = model(steps[:, done:done + n], Mask(causal, valid_all[:, :K]), cache=cache, use_cache=True)
        outs.append(out.hidden[:, -1])
        done += n
        assert out.cache.length == K
    for i, p in enumerate(prefixes):
        full = run(model, torch.cat([p, steps[i]])[None], [True])[0]
        want = full[[len(p) - 1, len(p), len(p) + 3, len(p) + 4, len(p) + 6]]
        got = torch.stack([o[i] for o in outs])
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_cache_requires_matching_mask_and_an_allocated_cache(model):
    x = torch.randn(1, 3, D)
    with pytest.raises(ValueError, match="new_cache"):
        model(x, Mask(torch.tensor([True]), torch.ones(1, 3, dtype=torch.bool)), use_cache=True)
    cache = model.new_cache(1, 8, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="expected"):
        model(x, Mask(torch.tensor([True]), torch.ones(1, 4, dtype=torch.bool)), cache=cache)


# ---------------------------------------------------------------- training features


def test_gradient_checkpointing_gives_the_same_gradients(model):
    torch.manual_seed(4)
    x = torch.randn(2, 9, D)
    x, valid = pad([x[0, :6], x[1]], left=False)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.train().gradient_checkpointing = flag
        run(model, x, [True, False], valid).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_dropout_only_in_training():
    torch.manual_seed(5)
    model = TransformerBackbone(BackboneShape(D, H, L, dropout=0.5))
    x = torch.randn(1, 6, D)
    assert not torch.allclose(run(model.train(), x, [True]), run(model, x, [True]))
    assert torch.equal(run(model.eval(), x, [True]), run(model, x, [True]))


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="heads"):
        TransformerBackbone(BackboneShape(30, 4, 1))
    with pytest.raises(ValueError, match="experts"):
        TransformerBackbone(BackboneShape(32, 4, 1, experts=4))

"""Backbone contract tests: per-sample causal/bidirectional masks, invisible padding, incremental
decoding equal to the full forward, MoE auxiliary losses, BitLinear quantisation and swap_linear.

Tiny fp32 models (d=32, 4 heads, 2 layers) so the whole file runs in seconds on one core.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import vall_e.models.bitlinear as bitlinear
from vall_e.models.backbones import Mask, build_backbone
from vall_e.models.bitlinear import BitLinear, activation_quant, swap_linear, weight_quant
from vall_e.utils.errors import UserError

D, H, L = 32, 4, 2

CASES = {
    "llama": ("llama", {}),
    "llama-eager": ("llama", {"attn_implementation": "eager"}),
    "mixtral": ("mixtral", {"experts": 4}),
    "retnet": ("retnet", {}),
    "retnet-moe": ("retnet", {"experts": 4}),
    "bitnet": ("bitnet", {}),
    # grouped-query attention (model.kv_heads): 2 key/value heads for 4 query heads
    "transformer-gqa": ("transformer", {"kv_heads": 2}),
    "llama-gqa": ("llama", {"kv_heads": 2}),
}
MOE_CASES = ["mixtral", "retnet-moe"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def make(case: str, seed: int = 0):
    name, kw = CASES[case]
    torch.manual_seed(seed)
    return build_backbone(name, d_model=D, n_heads=H, n_layers=L, **kw).eval()


def rand(*shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def full_mask(causal: list[bool], T: int) -> Mask:
    return Mask(torch.tensor(causal), torch.ones(len(causal), T, dtype=torch.bool))


@pytest.mark.parametrize("case", list(CASES))
def test_causal_and_bidirectional_in_one_batch(case):
    """Sample 0 is AR (causal), sample 1 NAR (bidirectional): perturb inputs after t in both."""
    m = make(case)
    T, t = 10, 4
    x = rand(2, T, D)
    y = x.clone()
    y[:, t + 1:] += rand(2, T - t - 1, D, seed=2)
    mask = full_mask([True, False], T)
    with torch.no_grad():
        a, b = m(x, mask).hidden, m(y, mask).hidden
    # (a) AR: outputs at positions <= t do not move
    torch.testing.assert_close(a[0, : t + 1], b[0, : t + 1], atol=1e-6, rtol=0)
    assert (a[0, t + 1:] - b[0, t + 1:]).abs().max() > 1e-3  # the perturbation itself is visible
    # (b) NAR: later inputs change earlier outputs
    assert (a[1, : t + 1] - b[1, : t + 1]).abs().amax(-1).min() > 1e-4


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("case", list(CASES))
def test_padding_is_invisible(case, side):
    """A padded batch mixing AR and NAR samples gives each sample's outputs when run alone."""
    m = make(case)
    specs = [(True, 7), (False, 4), (True, 5), (False, 6)]
    T = max(n for _, n in specs)
    x = rand(len(specs), T, D) * 3.0  # padding holds garbage, not zeros
    valid = torch.zeros(len(specs), T, dtype=torch.bool)
    spans = []
    for i, (_, n) in enumerate(specs):
        s = slice(0, n) if side == "right" else slice(T - n, T)
        valid[i, s] = True
        spans.append(s)
    causal = torch.tensor([c for c, _ in specs])
    with torch.no_grad():
        out = m(x, Mask(causal, valid)).hidden
        for i, (c, n) in enumerate(specs):
            alone = m(x[i : i + 1, spans[i]], full_mask([c], n)).hidden
            torch.testing.assert_close(out[i, spans[i]], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("case", list(CASES))
def test_incremental_decoding_matches_full_forward(case):
    """(d) left-padded batch of two lengths: prefill a prefix, then one token per step."""
    m = make(case)
    T, P = 40, 6
    lens = [T, T - 5]
    x = rand(2, T, D)
    valid = torch.zeros(2, T, dtype=torch.bool)
    for i, n in enumerate(lens):
        valid[i, T - n:] = True
    causal = torch.tensor([True, True])
    with torch.no_grad():
        full = m(x, Mask(causal, valid)).hidden
        cache = m.new_cache(2, T, x.device, x.dtype)
        o = m(x[:, :P], Mask(causal, valid[:, :P]), cache=cache, use_cache=True)
        steps, cache = [o.hidden], o.cache
        for t in range(P, T):
            o = m(x[:, t : t + 1], Mask(causal, valid[:, : t + 1]), cache=o.cache, use_cache=True)
            steps.append(o.hidden)
    inc = torch.cat(steps, 1)
    torch.testing.assert_close(inc[valid], full[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["retnet", "retnet-moe"])
def test_retnet_prefill_produces_the_recurrent_state(case):
    """The parallel (chunk) form of a prompt leaves the same state as feeding it token by token."""
    m = make(case)
    T = 9
    x = rand(2, T, D)
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    causal = torch.tensor([True, True])
    with torch.no_grad():
        par = m(x, Mask(causal, valid), cache=m.new_cache(2, T, x.device, x.dtype), use_cache=True).cache
        rec = m.new_cache(2, T, x.device, x.dtype)
        for t in range(T):
            m(x[:, t : t + 1], Mask(causal, valid[:, : t + 1]), cache=rec, use_cache=True)
    assert par.length == rec.length == T
    for a, b in zip(par.states + par.scales, rec.states + rec.scales):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["llama", "retnet"])
def test_cache_reorder(case):
    """Reordering the cache's batch rows (beam search) continues each row's own sequence."""
    m = make(case)
    T, P = 8, 5
    x = rand(2, T, D)
    causal = torch.tensor([True, True])
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[0, :2] = False
    idx = torch.tensor([1, 0])
    with torch.no_grad():
        full = m(x[idx], Mask(causal, valid[idx])).hidden
        cache = m(x[:, :P], Mask(causal, valid[:, :P]), cache=m.new_cache(2, T, x.device, x.dtype), use_cache=True).cache
        if hasattr(cache, "reorder"):
            cache = cache.reorder(idx)
        else:
            cache.reorder_cache(idx)
        for t in range(P, T):
            h = m(x[idx, t : t + 1], Mask(causal, valid[idx, : t + 1]), cache=cache, use_cache=True).hidden
            torch.testing.assert_close(h[:, 0], full[:, t], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["llama", "mixtral", "retnet-moe"])
def test_gradient_checkpointing_gives_same_gradients(case):
    grads = []
    for ckpt in (False, True):
        m = make(case).train()
        m.gradient_checkpointing = ckpt
        assert m.gradient_checkpointing == ckpt
        x = rand(2, 6, D)
        out = m(x, full_mask([True, False], 6))
        loss = out.hidden.pow(2).mean() + (out.aux_loss if out.aux_loss is not None else 0)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_retnet_without_cache_cannot_continue():
    m = make("retnet")
    with pytest.raises(ValueError):
        m(rand(1, 1, D), Mask(torch.tensor([True]), torch.ones(1, 3, dtype=torch.bool)))


@pytest.mark.parametrize("case", MOE_CASES)
def test_moe_aux_loss(case):
    """(e) finite positive aux loss in training, none in eval; gradients reach router and experts;
    padding content does not change it."""
    m = make(case).train()
    T = 8
    x = rand(2, T, D).requires_grad_(True)
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, 5:] = False
    mask = Mask(torch.tensor([True, False]), valid)
    out = m(x, mask)
    assert out.aux_loss is not None and out.aux_loss.dim() == 0
    assert torch.isfinite(out.aux_loss) and out.aux_loss > 0
    out.aux_loss.backward(retain_graph=True)
    router = [p for n, p in m.named_parameters() if "gate" in n and "proj" not in n]
    assert router and all(p.grad is not None and p.grad.abs().sum() > 0 for p in router)
    m.zero_grad()
    out.hidden[valid].pow(2).mean().backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not [n for n in no_grad if "expert" in n], no_grad

    y = x.detach().clone()
    y[1, 5:] = rand(3, D, seed=9) * 5
    with torch.no_grad():
        torch.testing.assert_close(m(y, mask).aux_loss, out.aux_loss.detach(), atol=0, rtol=1e-6)
        assert m.eval()(x.detach(), mask).aux_loss is None


# ------------------------------------------------------------------------------------ BitLinear


def test_bitlinear_forward_uses_ternary_weights_and_8bit_activations(monkeypatch):
    torch.manual_seed(0)
    layer = BitLinear(16, 8)
    x = rand(3, 5, 16)
    seen = {}
    real = bitlinear.F.linear

    def spy(inp, w, b=None):
        seen["x"], seen["w"] = inp.detach(), w.detach()
        return real(inp, w, b)

    monkeypatch.setattr(bitlinear.F, "linear", spy)
    y = layer(x)
    w = seen["w"]
    scale = layer.weight.detach().abs().mean()
    tern = w / scale
    torch.testing.assert_close(tern, tern.round(), atol=1e-5, rtol=0)
    assert set(tern.round().unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert len(set(tern.round().unique().tolist())) == 3
    # activations: per token, an integer grid of step absmax/127 within [-128, 127]
    xq = seen["x"]
    step = xq.abs().amax(-1, keepdim=True) / 127
    grid = xq / step
    torch.testing.assert_close(grid, grid.round(), atol=1e-3, rtol=0)
    assert grid.abs().max() <= 128
    # and the layer's output is exactly that product
    xn = nn.functional.layer_norm(x, (16,), eps=1e-5)
    torch.testing.assert_close(y, real(activation_quant(xn), layer.quantized_weight(), layer.bias))
    t, s = weight_quant(layer.weight)
    torch.testing.assert_close(t * s, layer.quantized_weight())


def test_bitlinear_straight_through_gradients():
    torch.manual_seed(0)
    layer = BitLinear(16, 8, bias=False)
    x = rand(4, 16).requires_grad_(True)
    g = rand(4, 8, seed=3)
    layer(x).backward(g)
    # STE: dL/dW is the gradient of a plain linear at the quantised activations
    xq = activation_quant(nn.functional.layer_norm(x.detach(), (16,), eps=1e-5))
    torch.testing.assert_close(layer.weight.grad, g.t() @ xq, atol=1e-5, rtol=1e-5)
    assert x.grad is not None and x.grad.abs().sum() > 0
    # an optimiser step moves the latent (full precision) weights
    before = layer.weight.detach().clone()
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    assert not torch.equal(before, layer.weight.detach())


def plain_linears(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, BitLinear)]


@pytest.mark.parametrize("case", ["llama", "mixtral", "retnet-moe"])
def test_swap_linear_replaces_every_linear(case):
    m = make(case)
    x = rand(1, 6, D)
    mask = full_mask([True], 6)
    before = plain_linears(m)
    assert before
    q_weight = dict(m.named_parameters())[before[0] + ".weight"].detach().clone()
    n = swap_linear(m, "bitnet")
    assert n == len(before) and plain_linears(m) == []
    torch.testing.assert_close(dict(m.named_parameters())[before[0] + ".weight"], q_weight)  # weights copied
    with torch.no_grad():
        assert torch.isfinite(m(x, mask).hidden).all()
    assert swap_linear(m, "bitnet") == 0  # idempotent


def test_swap_linear_skip_and_bitnet_backbone():
    net = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2))
    assert swap_linear(net, "bitnet", skip=["2"]) == 2
    assert plain_linears(net) == ["2"]
    bn = make("bitnet")
    assert bn.n_bitlinear > 0 and plain_linears(bn) == []


def test_swap_linear_errors():
    with pytest.raises(UserError):
        swap_linear(nn.Linear(2, 2), "int3")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="bitsandbytes is not installed"):
            swap_linear(nn.Sequential(nn.Linear(2, 2)), "bnb8")


def test_unknown_backbone():
    with pytest.raises(UserError):
        build_backbone("bogus", d_model=D, n_heads=H, n_layers=L)


@pytest.mark.parametrize("name", ["llama", "bitnet"])
def test_experts_rejected_where_unsupported(name):
    with pytest.raises(UserError):
        build_backbone(name, d_model=D, n_heads=H, n_layers=L, experts=4)

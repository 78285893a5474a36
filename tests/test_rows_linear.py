"""The batched-rows linear of the decode step: same values as F.linear for every layout and row count."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vall_e.models import rows_linear
from vall_e.models.rows_linear import MAX_DOT_ROWS, decode_linear, row_major_weight


def _linear(n_in: int, n_out: int, bias: bool, column_major: bool) -> nn.Linear:
    torch.manual_seed(0)
    m = nn.Linear(n_in, n_out, bias=bias)
    if column_major:  # what vall_e.generation.tts.cpu_decode_layout does to wide weights
        m.weight.data = m.weight.data.t().contiguous().t()
    return m


@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 5, 16, MAX_DOT_ROWS, MAX_DOT_ROWS + 1])
def test_equals_f_linear(rows, bias, column_major):
    m = _linear(48, 96, bias, column_major)
    x = torch.randn(rows, 48)
    with torch.inference_mode():
        y = decode_linear(m, x)
    assert y.shape == (rows, 96) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(x, m.weight, m.bias), atol=1e-5, rtol=1e-5)


def test_takes_a_strided_input():
    m = _linear(32, 64, True, True)
    x = torch.randn(32, 6).t()  # [6, 32], not contiguous
    torch.testing.assert_close(decode_linear(m, x), F.linear(x, m.weight, m.bias), atol=1e-5, rtol=1e-5)


def test_batched_rows_use_the_dot_form(monkeypatch):
    """With several rows the product is W @ x.T (counted), with one row it is F.linear."""
    m = _linear(32, 64, False, True)
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(rows_linear.torch, "mm", lambda a, b: calls.append(a.shape) or real_mm(a, b))
    decode_linear(m, torch.randn(1, 32))
    assert calls == []
    decode_linear(m, torch.randn(4, 32))
    assert calls == [torch.Size([64, 32])]


def test_row_major_copy_follows_the_weight():
    m = _linear(16, 40, False, True)
    first = row_major_weight(m)
    assert first.is_contiguous() and torch.equal(first, m.weight)
    assert row_major_weight(m) is first  # cached: made once
    with torch.no_grad():
        m.weight.mul_(2.0)  # changed in place: the copy is remade
    assert torch.equal(row_major_weight(m), m.weight)
    m.weight = nn.Parameter(torch.randn(40, 16).t().contiguous().t())  # replaced
    assert torch.equal(row_major_weight(m), m.weight)
    row = _linear(16, 40, False, False)
    assert row_major_weight(row) is row.weight  # already row-major: no copy


def test_other_modules_are_called():
    class Doubler(nn.Module):
        def forward(self, x):
            return 2 * x

    x = torch.randn(4, 8)
    assert torch.equal(decode_linear(Doubler(), x), 2 * x)


def test_weight_made_under_inference_mode():
    """A weight re-laid inside torch.inference_mode is an inference tensor (no version counter)."""
    m = _linear(16, 40, True, False)
    with torch.inference_mode():
        m.weight.data = m.weight.data.t().contiguous().t()
        x = torch.randn(3, 16)
        torch.testing.assert_close(decode_linear(m, x), F.linear(x, m.weight, m.bias), atol=1e-5, rtol=1e-5)

"""BitNet b1.58 linear layer, and a swap of every `nn.Linear` in a module for it (or for bitsandbytes' 8-bit one).

BitLinear (Ma et al. 2024, "The Era of 1-bit LLMs"; Wang et al. 2023, "BitNet"):
- the input goes through a LayerNorm without affine parameters (the paper's SubLN before activation
  quantisation), then is quantised to 8 bits per token with an absmax scale;
- the weights are quantised to ternary {-1, 0, +1} times one absmean scale per matrix;
- both quantisers use the straight-through estimator, so gradients update the full-precision latent
  weights (the ones kept in `weight`) as if no rounding had happened.
Written here because the `bitnet` package pulls several GB of dependencies (docs/architecture.md).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vall_e.utils.errors import UserError

_EPS = 1e-5


def weight_quant(w: Tensor) -> tuple[Tensor, Tensor]:
    """(ternary [same shape as w] in {-1, 0, 1}, scale []) with w ~= ternary * scale (absmean)."""
    scale = w.abs().mean().clamp_min(_EPS)
    return (w / scale).round().clamp(-1, 1), scale


def activation_quant(x: Tensor, bits: int = 8) -> Tensor:
    """Per-token absmax quantisation to `bits` bits, returned dequantised (same dtype as x)."""
    q_max = 2 ** (bits - 1) - 1
    scale = q_max / x.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS)
    return (x * scale).round().clamp(-q_max - 1, q_max) / scale


class BitLinear(nn.Linear):
    """`nn.Linear` whose forward uses ternary weights and 8-bit activations (STE for both)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, bits: int = 8):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.bits = bits

    def quantized_weight(self) -> Tensor:
        """The weight the forward actually uses: ternary times the absmean scale (no STE)."""
        ternary, scale = weight_quant(self.weight)
        return ternary * scale

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x, (self.in_features,), eps=_EPS)
        x = x + (activation_quant(x, self.bits) - x).detach()
        w = self.weight
        w = w + (self.quantized_weight() - w).detach()
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits={self.bits}, weights=ternary"


def _bnb_linear(old: nn.Linear) -> nn.Module:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError("bitsandbytes is not installed: pip install vall-e[bitsandbytes]") from None
    new = bnb.nn.Linear8bitLt(
        old.in_features, old.out_features, bias=old.bias is not None, has_fp16_weights=True, threshold=6.0
    )
    new.weight = bnb.nn.Int8Params(old.weight.data.clone(), requires_grad=old.weight.requires_grad, has_fp16_weights=True)
    if old.bias is not None:
        new.bias = nn.Parameter(old.bias.data.clone(), requires_grad=old.bias.requires_grad)
    return new


def _bit_linear(old: nn.Linear) -> nn.Module:
    new = BitLinear(old.in_features, old.out_features, bias=old.bias is not None,
                    device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    return new


_KINDS = {"bitnet": _bit_linear, "bnb8": _bnb_linear}


def swap_linear(module: nn.Module, kind: str = "bitnet", skip: Iterable[str] = ()) -> int:
    """Replace every `nn.Linear` inside `module` (in place) by a BitLinear ("bitnet") or bitsandbytes'
    Linear8bitLt ("bnb8"), copying weights. Submodules whose qualified name starts with one of `skip`
    are left alone. Returns how many layers were replaced."""
    if kind not in _KINDS:
        raise UserError(f"unknown linear kind {kind!r}; choose one of {', '.join(_KINDS)}")
    make = _KINDS[kind]
    skip = tuple(skip)
    todo = []
    for name, child in module.named_modules():
        if name and skip and name.startswith(skip):
            continue
        for cname, sub in child.named_children():
            full = f"{name}.{cname}" if name else cname
            if skip and full.startswith(skip):
                continue
            if not isinstance(sub, nn.Linear) or isinstance(sub, BitLinear) or type(sub).__name__ == "Linear8bitLt":
                continue
            if isinstance(child, nn.MultiheadAttention):
                # its out_proj weight is read directly by F.multi_head_attention_forward: a swap
                # would silently do nothing, so refuse rather than pretend.
                raise ValueError(f"cannot swap the linears of nn.MultiheadAttention ({name or 'root'})")
            todo.append((child, cname, sub))
    for parent, cname, sub in todo:
        setattr(parent, cname, make(sub))
    return len(todo)

"""A linear layer for the few rows of a batched decode step on the CPU.

Why: a decode step multiplies one row per sample by every weight matrix. With 2 to 64 rows, MKL's
`x @ W.T` (what `F.linear` runs) reads a weight that is not in cache far slower than for a single
row; the same product computed as `(W @ x.T).T` from a row-major weight streams it faster
(benchmarks/README.md, "Measurements behind code choices"). One row keeps `F.linear`, which
`vall_e.generation.tts.cpu_decode_layout` tunes with column-major weights for wide matrices; those get a
row-major copy here, made on the first batched step (so batch-1 users never pay its memory) and
remade when the weight changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Up to this many rows the (W @ x.T).T form wins or ties on the CPUs it was measured on; beyond it
# loses for small models (benchmarks/README.md, "Measurements behind code choices").
MAX_DOT_ROWS = 64


def decode_linear(m: nn.Module, x: Tensor) -> Tensor:
    """m(x) for x [rows, in]: a plain nn.Linear runs as a functional op (no module-call cost), with
    the batched-rows form on the CPU for 2..MAX_DOT_ROWS rows; other modules (BitLinear, a quantized
    linear) are called as modules.

    With several rows the result is copied back to row-major: the norms and adds downstream run
    worse on the transposed view (benchmarks/README.md)."""
    if type(m) is not nn.Linear:
        return m(x)
    rows = x.shape[0]
    if (1 < rows <= MAX_DOT_ROWS and x.ndim == 2 and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.compiler.is_compiling()):
        w = row_major_weight(m)
        xt = x.contiguous().t()  # [in, rows], column-major: the layout that makes MKL stream W
        y = torch.mm(w, xt) if m.bias is None else torch.addmm(m.bias[:, None], w, xt)
        return y.t().contiguous()
    return F.linear(x, m.weight, m.bias)


def row_major_weight(m: nn.Linear) -> Tensor:
    """m.weight if it is row-major, else a row-major copy kept on the module (remade if the weight
    is replaced or changed in place)."""
    w = m.weight
    if w.is_contiguous():
        return w
    # An inference tensor (a weight made under torch.inference_mode) tracks no version: its key is
    # its storage alone.
    version = -1 if w.is_inference() else w._version
    key = (w.data_ptr(), version, w.device, w.dtype, tuple(w.shape))
    cached = m.__dict__.get("_row_major_weight")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, w.detach().contiguous())
        m.__dict__["_row_major_weight"] = cached
    return cached[1]

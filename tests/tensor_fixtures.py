"""Test fixtures of tensors stored as JSON text (the repository keeps no binary files): the expected
outputs of other projects' code, made by scripts that cannot run in CI. Floats are written with the
fewest digits that give the same float32 back, so the round trip is exact."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

_DTYPES = {"float32": np.float32, "int64": np.int64}


def _values(a: np.ndarray) -> str:
    if a.dtype == np.float32:
        return "[" + ",".join(np.format_float_positional(x, unique=True, trim="0") for x in a.ravel()) + "]"
    return json.dumps([int(x) for x in a.ravel()])


def write_tensor_json(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    parts = []
    for name, t in sorted(tensors.items()):
        a = t.detach().cpu().numpy()
        if a.dtype.name not in _DTYPES:
            raise ValueError(f"{name}: dtype {a.dtype} is not one of {', '.join(_DTYPES)}")
        parts.append(f'{json.dumps(name)}: {{"dtype": "{a.dtype.name}", "shape": {json.dumps(list(a.shape))}, '
                     f'"data": {_values(a)}}}')
    text = '{"metadata": ' + json.dumps(metadata, sort_keys=True) + ',\n"tensors": {\n' + ",\n".join(parts) + "}}\n"
    Path(path).write_text(text, encoding="utf-8")


def read_tensor_json(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    obj = json.loads(Path(path).read_text(encoding="utf-8"))
    tensors = {name: torch.from_numpy(np.asarray(t["data"], dtype=_DTYPES[t["dtype"]]).reshape(t["shape"]))
               for name, t in obj["tensors"].items()}
    return tensors, obj["metadata"]

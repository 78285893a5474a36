"""Datasets for VALL-E: folder and HDF5 readers, metadata, prompts, length-bucketing sampler, collate.

`python -m vall_e.data yaml=... --action metadata|hdf5|symmap|sample` prepares and inspects them.
Names are imported lazily, so `vall_e.data.synthetic` does not pull in torch and h5py.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "VALLEDataset": "dataset", "held_out": "dataset", "load_symmap": "dataset",
    "build_hdf5": "hdf5", "open_hdf5": "hdf5",
    "Utterance": "listing", "list_split": "listing", "list_utterances": "listing",
    "sample_prompt": "prompts", "trim": "prompts", "trim_or_repeat": "prompts",
    "ItemKey": "sampler", "LengthBucketSampler": "sampler",
    "collate": "collate", "make_dataloader": "collate", "make_sampler": "collate", "batch_frames": "collate",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"vall_e.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'vall_e.data' has no attribute {name!r}")

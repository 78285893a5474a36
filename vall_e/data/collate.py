"""Batches for the model, and the DataLoader that makes them.

The collate function keeps variable-length tensors as lists (the model pads inside, as in the
reference); the loader uses the length-bucketing sampler and deterministic per-worker seeds.
"""
from __future__ import annotations

import random
from functools import partial
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from vall_e.data.sampler import LengthBucketSampler


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """{text: [LongTensor], lang: LongTensor[B], prompt: [[Tp, L]], resps: [[T, L]], speaker, path,
    key, index, frames} plus the sampler position (`epoch`, `position`) of the batch."""
    batch: dict[str, Any] = {
        "text": [it["text"] for it in items],
        "lang": torch.tensor([int(it["lang"]) for it in items], dtype=torch.long),
        "prompt": [it["prompt"] for it in items],
        "resps": [it["resps"] for it in items],
        "speaker": [it["speaker"] for it in items],
        "path": [it["path"] for it in items],
        "key": [it.get("key", it["path"]) for it in items],
        "index": torch.tensor([int(it.get("index", -1)) for it in items], dtype=torch.long),
        "frames": torch.tensor([int(it["resps"].shape[0]) for it in items], dtype=torch.long),
    }
    if items and "epoch" in items[0]:
        batch["epoch"] = int(items[0]["epoch"])
        batch["position"] = int(items[0]["position"])
    return batch


def batch_frames(batch: dict[str, Any]) -> int:
    """Padded size of a batch: the longest text + prompt + response, times the batch size."""
    lens = [t.shape[0] + p.shape[0] + r.shape[0] for t, p, r in zip(batch["text"], batch["prompt"], batch["resps"])]
    return max(lens, default=0) * len(lens)


def _seed_worker(base_seed: int, worker_id: int) -> None:
    """Each worker's global RNGs get a seed from (base seed, worker); items use their own seeds anyway."""
    s = (base_seed * 1000 + worker_id) % 2**32
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def make_sampler(dataset: Any, cfg: Any, split: str = "train", rank: int = 0, world_size: int = 1,
                 ) -> LengthBucketSampler:
    """The bucketing sampler for `dataset` with the config's batch settings."""
    train = split == "train"
    hp = cfg.hyperparameters
    batch_size = hp.batch_size if train else cfg.evaluation.batch_size
    return LengthBucketSampler(
        dataset.costs, batch_size=batch_size, frames_per_batch=hp.frames_per_batch, shuffle=train,
        seed=cfg.seed, rank=rank, world_size=world_size, drop_last=train, epoch_items=dataset.epoch_items,
    )


def make_dataloader(dataset: Any, cfg: Any, split: str = "train", rank: int = 0, world_size: int = 1,
                    ) -> DataLoader:
    """A DataLoader of model batches; its `batch_sampler` holds the resumable position
    (`loader.batch_sampler.state_dict(last_batch)` / `.load_state_dict(state)`)."""
    workers = int(cfg.dataset.workers)
    sampler = make_sampler(dataset, cfg, split, rank, world_size)
    gen = torch.Generator()
    gen.manual_seed(int(cfg.seed) + rank)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        worker_init_fn=partial(_seed_worker, int(cfg.seed) + 7919 * rank),
        generator=gen,
    )

"""The length-bucketing batch sampler: frame budget, coverage, sharding, determinism, resumption."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from vall_e.config import load_config
from vall_e.data.collate import batch_frames, make_dataloader
from vall_e.data.dataset import VALLEDataset
from vall_e.data.sampler import ItemKey, LengthBucketSampler

from tests.test_data import make_corpus

torch.set_num_threads(1)


def spread_costs(n: int = 500, seed: int = 0) -> list[int]:
    """Costs with a 10x spread (e.g. 1 s .. 10 s of frames plus text and prompt)."""
    rng = random.Random(seed)
    return [rng.randint(100, 1000) for _ in range(n)]


def flat(batches) -> list[int]:
    return [k.index if isinstance(k, ItemKey) else k for b in batches for k in b]


def test_batches_stay_within_frame_budget_and_cover_everything() -> None:
    costs = spread_costs()
    assert max(costs) >= 9 * min(costs)
    s = LengthBucketSampler(costs, frames_per_batch=4000, seed=1)
    for epoch in range(3):
        batches = list(s)
        assert s.epoch == epoch + 1
        for b in batches:
            assert max(costs[k.index] for k in b) * len(b) <= 4000
            assert all(k.epoch == epoch for k in b)
        assert sorted(flat(batches)) == list(range(len(costs)))
    # sizes adapt to lengths: short items travel in bigger batches
    batches = s.rank_batches(0)
    short = [len(b) for b in batches if max(costs[i] for i in b) < 250]
    long = [len(b) for b in batches if min(costs[i] for i in b) > 800]
    assert min(short) > max(long)


def test_bucketing_wastes_less_padding_than_random_batches() -> None:
    costs = spread_costs()
    s = LengthBucketSampler(costs, frames_per_batch=4000, seed=0)
    batches = s.rank_batches(0)
    used = sum(costs[i] for b in batches for i in b)
    padded = sum(max(costs[i] for i in b) * len(b) for b in batches)
    rng = random.Random(0)
    order = list(range(len(costs)))
    rng.shuffle(order)
    sizes = [len(b) for b in batches]
    rand_batches, pos = [], 0
    for n in sizes:
        rand_batches.append(order[pos:pos + n])
        pos += n
    rand_padded = sum(max(costs[i] for i in b) * len(b) for b in rand_batches)
    assert used / padded > 0.9
    assert padded < 0.75 * rand_padded


def test_fixed_batch_size_mode() -> None:
    costs = spread_costs(103)
    s = LengthBucketSampler(costs, batch_size=8, seed=0)
    sizes = [len(b) for b in s.rank_batches(0)]
    assert sizes.count(8) == 12 and sum(sizes) == 103
    d = LengthBucketSampler(costs, batch_size=8, seed=0, drop_last=True)
    assert [len(b) for b in d.rank_batches(0)] == [8] * 12
    tiny = LengthBucketSampler([5, 6, 7], batch_size=8, drop_last=True)
    assert [len(b) for b in tiny.rank_batches(0)] == [3]  # a tiny dataset still trains


def test_determinism_and_epochs_differ() -> None:
    costs = spread_costs(200)
    a = LengthBucketSampler(costs, frames_per_batch=3000, seed=5)
    b = LengthBucketSampler(costs, frames_per_batch=3000, seed=5)
    assert a.rank_batches(0) == b.rank_batches(0)
    assert a.rank_batches(0) != a.rank_batches(1)
    assert a.rank_batches(0) != LengthBucketSampler(costs, frames_per_batch=3000, seed=6).rank_batches(0)
    keys = next(iter(a))
    assert keys == next(iter(b)) and len({k.seed for k in keys}) == len(keys)


def test_state_round_trip_resumes_exactly() -> None:
    costs = spread_costs(150)
    ref = LengthBucketSampler(costs, frames_per_batch=3000, seed=3)
    expected = [b for _ in range(3) for b in ref]  # three whole epochs
    for stop in (0, 1, 7, len(expected) // 3, len(expected) // 3 + 2, len(expected) - 1):
        s = LengthBucketSampler(costs, frames_per_batch=3000, seed=3)
        got: list = []
        while len(got) < stop:
            for b in s:
                got.append(b)
                if len(got) == stop:
                    break
        state = s.state_dict()
        r = LengthBucketSampler(costs, frames_per_batch=3000, seed=0)  # seed comes from the state
        r.load_state_dict(state)
        while len(got) < len(expected):
            got.extend(r)
        assert got == expected, stop


def test_state_from_a_consumed_batch(tmp_path: Path) -> None:
    """With prefetching workers the sampler runs ahead; the last trained batch gives the position."""
    y = make_corpus(tmp_path, extra_yaml="hyperparameters:\n  batch_size: 2\n")
    cfg = load_config(y, {"dataset.sample_type": "path", "dataset.workers": "2"})
    ds = VALLEDataset(cfg, "train")
    full = [b["key"] for b in make_dataloader(ds, cfg, "train")]
    loader = make_dataloader(ds, cfg, "train")
    it = iter(loader)
    seen = [next(it) for _ in range(3)]
    state = loader.batch_sampler.state_dict(seen[-1])
    assert loader.batch_sampler.state_dict()["position"] > state["position"]  # ran ahead
    del it
    resumed = make_dataloader(VALLEDataset(cfg, "train"), cfg, "train")
    resumed.batch_sampler.load_state_dict(state)
    rest = [b["key"] for b in resumed]
    assert [b["key"] for b in seen] + rest == full


@pytest.mark.parametrize("drop_last", [True, False])
def test_sharding_across_ranks(drop_last: bool) -> None:
    costs = spread_costs(301)
    world = 3
    shards = [LengthBucketSampler(costs, frames_per_batch=3000, seed=2, rank=r, world_size=world,
                                  drop_last=drop_last) for r in range(world)]
    per_rank = [s.rank_batches(0) for s in shards]
    assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of steps
    items = [flat(b) for b in per_rank]
    n_global = len(LengthBucketSampler(costs, frames_per_batch=3000, seed=2).rank_batches(0))
    if drop_last:
        every = [i for r in items for i in r]
        assert len(every) == len(set(every))  # no overlap
        assert n_global - world < len(per_rank[0]) * world <= n_global
        assert len(set(every)) >= len(costs) - (n_global % world) * max(len(b) for r in per_rank for b in r)
    else:
        assert set().union(*map(set, items)) == set(range(len(costs)))  # full coverage
        glob = shards[0].global_batches(0)
        pad = (world - n_global % world) % world
        assert len(glob) == n_global + pad and glob[n_global:] == glob[:pad]
        assert sum(len(r) for r in items) - len(costs) == sum(len(b) for b in glob[:pad])  # only padding repeats
    # a rank's shard is the same slice of the one global order every rank computes
    glob = shards[0].global_batches(0)
    for r in range(world):
        assert per_rank[r] == glob[r::world]


def test_sharding_exact_partition_when_divisible() -> None:
    costs = [100] * 120
    shards = [LengthBucketSampler(costs, batch_size=10, seed=0, rank=r, world_size=4) for r in range(4)]
    items = [flat(s.rank_batches(0)) for s in shards]
    assert sorted(i for r in items for i in r) == list(range(120))


def test_oversized_items_are_skipped_with_a_warning() -> None:
    costs = [100, 200, 5000, 300]
    with pytest.warns(UserWarning, match="exceed frames_per_batch"):
        s = LengthBucketSampler(costs, frames_per_batch=1000)
    assert sorted(flat(s.rank_batches(0))) == [0, 1, 3]


def test_dataset_batches_respect_budget_with_10x_spread(tmp_path: Path) -> None:
    """The real tensors (text + prompt + response) of every batch fit the frame budget."""
    y = make_corpus(tmp_path, per_speaker=8)
    cfg = load_config(y, {"hyperparameters.frames_per_batch": "2200", "dataset.sample_type": "path"})
    ds = VALLEDataset(cfg, "train")
    frames = [u.frames for u in ds.utterances]
    assert max(frames) >= 10 * min(frames) * 0.9
    loader = make_dataloader(ds, cfg, "train")
    sizes = []
    for epoch in range(2):
        for batch in loader:
            assert batch_frames(batch) <= 2200
            sizes.append(len(batch["resps"]))
    assert max(sizes) > min(sizes)  # batch sizes follow the lengths
